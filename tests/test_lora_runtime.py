"""Applying LoRAs to a DiT: merge, per-call merge and runtime branch, unload, streamed and fp8 blocks,
several LoRAs."""

import copy

import pytest
import torch

from tests.helpers import tiny_lora
from wanfit.models.configs import WAN_TINY
from wanfit.models.dit import WanDiT
from wanfit.plan.lora import lora_mode_rule
from wanfit.plan.plan import Plan
from wanfit.runtime.lora import DiTLoras, parameter_shapes
from wanfit.runtime.placement import DiTPlacement
from wanfit.weights import lora_keys

# Each DiT with its placement and LoRA state, as a pipeline holds them (by id: the tests' DiTs live on).
_RIGS: dict[int, tuple[DiTPlacement, DiTLoras]] = {}


def rig(dit) -> tuple[DiTPlacement, DiTLoras]:
    if id(dit) not in _RIGS or _RIGS[id(dit)][0].dit is not dit:
        placement = DiTPlacement(dit, pin_memory=False)
        _RIGS[id(dit)] = (placement, DiTLoras(dit, placement))
    return _RIGS[id(dit)]


def apply_loras(dit, loras, mode):
    rig(dit)[1].apply(loras, mode)


def remove_loras(dit):
    rig(dit)[1].remove()


def place(dit, plan):
    """Place the DiT as `plan` says (the pipeline's move at a phase start or a step-down); its streamer."""
    placement = rig(dit)[0]
    placement.place(plan)
    return placement.streamer


def tiny_dit(dtype=torch.float32):
    torch.manual_seed(0)
    return WanDiT(WAN_TINY).to(dtype).eval().requires_grad_(False)


def inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, WAN_TINY.in_dim, 2, 4, 6, generator=gen)
    return x, torch.tensor([700.0]), torch.randn(1, 16, WAN_TINY.text_dim, generator=gen)


def make_lora(seed=3, alpha=2.0, biases=True, extra=None):
    """A ComfyUI-style LoRA over every block Linear, with bias and norm/modulation/embedding diffs."""
    shapes = parameter_shapes(WAN_TINY)
    factors = tiny_lora.random_factors(WAN_TINY.num_layers, WAN_TINY.dim, WAN_TINY.ffn_dim, seed=seed)
    state = tiny_lora.comfy(factors, alpha=alpha, biases=tiny_lora.random_biases(factors) if biases else None)
    gen = torch.Generator().manual_seed(seed + 100)
    state["diffusion_model.blocks.0.norm3.diff"] = 0.2 * torch.randn(WAN_TINY.dim, generator=gen)
    state["diffusion_model.blocks.1.modulation.diff"] = 0.2 * torch.randn(1, 6, WAN_TINY.dim, generator=gen)
    state["diffusion_model.text_embedding.0.lora_down.weight"] = 0.3 * torch.randn(
        4, WAN_TINY.text_dim, generator=gen
    )
    state["diffusion_model.text_embedding.0.lora_up.weight"] = 0.3 * torch.randn(
        WAN_TINY.dim, 4, generator=gen
    )
    state.update(extra or {})
    lora = lora_keys.convert(state, shapes)
    lora_keys.check_fits(lora, shapes)
    return lora


def forward(dit):
    with torch.no_grad():
        return dit(*inputs())


def state_of(dit):
    return {k: v.clone() for k, v in dit.state_dict().items()}


@pytest.mark.parametrize("mode", ["runtime", "merge_per_call"])
def test_merge_and_runtime_modes_give_the_same_output(mode):
    lora = make_lora()
    merged, branched = tiny_dit(), tiny_dit()
    base = forward(merged)
    apply_loras(merged, [(lora, 0.8)], "merge")
    apply_loras(branched, [(lora, 0.8)], mode)
    a, b = forward(merged), forward(branched)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - base).abs().mean() > 100 * (a - b).abs().mean()  # the LoRA acts far beyond the tolerance
    # Both leave the block Linears as stored: only diffs and non-block weights merged.
    assert torch.equal(branched.blocks[0].self_attn.q.weight, tiny_dit().blocks[0].self_attn.q.weight)
    assert not torch.equal(merged.blocks[0].self_attn.q.weight, tiny_dit().blocks[0].self_attn.q.weight)


def test_merge_is_fp32_math_rounded_once_to_the_storage_dtype():
    lora = make_lora()
    dit = tiny_dit(torch.bfloat16)
    base = dit.blocks[1].ffn[2].weight.clone()
    apply_loras(dit, [(lora, 0.5)], "merge")
    expected = (base.float() + 0.5 * lora.low_rank["blocks.1.ffn.2"].delta()).to(torch.bfloat16)
    assert torch.equal(dit.blocks[1].ffn[2].weight, expected)
    bias = dit.blocks[1].ffn[2].bias
    assert bias.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["merge", "merge_per_call", "runtime"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unload_restores_the_base_weights_bit_for_bit(mode, dtype):
    dit = tiny_dit(dtype)
    before, out_before = state_of(dit), forward(dit)
    apply_loras(dit, [(make_lora(), 1.0)], mode)
    apply_loras(dit, [(make_lora(), 1.0), (make_lora(seed=4), -0.5)], mode)  # a second set: from the base
    assert not torch.equal(forward(dit), out_before)
    remove_loras(dit)
    after = state_of(dit)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(forward(dit), out_before)  # no branch left behind
    assert all(
        getattr(m, "low_rank", None) is None and getattr(m, "gemm", None) is None for m in dit.modules()
    )


def test_two_loras_add():
    one, two = make_lora(seed=3), make_lora(seed=5, biases=False)
    dit = tiny_dit()
    base = state_of(dit)
    apply_loras(dit, [(one, 0.7), (two, -0.4)], "merge")
    for module in ("blocks.0.self_attn.q", "blocks.1.ffn.0"):
        expected = (
            base[f"{module}.weight"] + 0.7 * one.low_rank[module].delta() - 0.4 * two.low_rank[module].delta()
        )
        torch.testing.assert_close(dit.get_parameter(f"{module}.weight"), expected, rtol=0, atol=1e-6)
    expected_norm = (
        base["blocks.0.norm3.weight"]
        + 0.7 * one.diffs["blocks.0.norm3.weight"]
        - 0.4 * two.diffs["blocks.0.norm3.weight"]
    )
    torch.testing.assert_close(dit.blocks[0].norm3.weight, expected_norm, rtol=0, atol=1e-6)
    # The order does not matter, and the runtime branch and the per-call merge stack them alike.
    swapped, branched, per_call = tiny_dit(), tiny_dit(), tiny_dit()
    apply_loras(swapped, [(two, -0.4), (one, 0.7)], "merge")
    apply_loras(branched, [(one, 0.7), (two, -0.4)], "runtime")
    apply_loras(per_call, [(one, 0.7), (two, -0.4)], "merge_per_call")
    torch.testing.assert_close(forward(swapped), forward(dit), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forward(branched), forward(dit), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forward(per_call), forward(dit), rtol=1e-5, atol=1e-5)


def streamed_plan(**kw):
    return Plan(device="cpu", dit_blocks_resident=0, **kw)


@pytest.mark.parametrize("mode", ["merge", "merge_per_call", "runtime"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_streamed_plus_lora_equals_resident_plus_lora(mode, when):
    """Merged before the streamer copied the weights, or written into its host copies after; or merged
    into the streamed copies at each call, whose host copies stay the base weights."""
    lora = make_lora()
    resident = tiny_dit()
    apply_loras(resident, [(lora, 0.8)], "merge")
    expected = forward(resident)

    dit = tiny_dit()
    if when == "before":
        apply_loras(dit, [(lora, 0.8)], mode)
    streamer = place(dit, streamed_plan())
    assert dit.blocks[0].self_attn.q.weight.numel() == 0  # a placeholder: the weights live in the streamer
    forward(dit)  # the streamer now holds a prefetched copy of block 0
    if when == "after":
        apply_loras(dit, [(lora, 0.8)], mode)
    torch.testing.assert_close(forward(dit), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forward(dit), expected, rtol=1e-5, atol=1e-5)  # and again (prefetch path)
    if mode == "runtime":  # the streamed blocks' q, k, v shared their down-projection too
        assert rig(dit)[1].shared and all(s.computed >= 2 for s in rig(dit)[1].shared)
        with _Gemms() as gemms:  # and on the streamed weights the base GEMM went last
            forward(dit)
        ks = {shape[0] for op, _, shape in gemms.calls if op is torch.ops.aten.addmm_.default}
        assert ks == {WAN_TINY.dim, WAN_TINY.ffn_dim}  # K: the Linears' input widths, not the rank
    if mode == "merge_per_call":  # the host copies were never written
        base = tiny_dit()
        slot = streamer.find_slot(dit.blocks[0].ffn[0], "weight")[1]
        assert torch.equal(slot.stored, base.blocks[0].ffn[0].weight)
    remove_loras(dit)
    place(dit, Plan(device="cpu"))  # back to resident
    assert streamer is not None and rig(dit)[0].streamer is None
    base = state_of(tiny_dit())
    assert all(torch.equal(v, base[k]) for k, v in state_of(dit).items())


def test_fp8_blocks_with_a_lora_and_exact_unload():
    """fp8 storage: merged into each upcast copy, the branch beside the fp8 weights, or a merge
    re-quantised; unload restores the bits."""
    lora = make_lora()
    reference = tiny_dit(torch.bfloat16)
    apply_loras(reference, [(lora, 0.8)], "merge")
    expected = forward(reference).float()
    plan = Plan(device="cpu", compute_dtype="bfloat16", storage_dtype="float8_e4m3fn")
    assert lora_mode_rule(plan)[0] == "merge_per_call" and lora_mode_rule(Plan())[0] == "merge"
    outputs = {}
    for mode in ("merge_per_call", "runtime", "merge"):
        dit = tiny_dit(torch.bfloat16)
        streamer = place(dit, plan)
        stored = [
            (s.stored.clone(), None if s.scale is None else s.scale.clone()) for s in streamer._slots[0]
        ]
        apply_loras(dit, [(lora, 0.8)], mode)
        outputs[mode] = forward(dit).float()
        error = (outputs[mode] - expected).abs().mean() / expected.abs().mean()
        assert error < 0.08, (mode, float(error))  # fp8's own error on the tiny model
        remove_loras(dit)
        for slot, (tensor, scale) in zip(streamer._slots[0], stored):
            assert torch.equal(slot.stored.view(torch.uint8) if slot.stored.dtype.itemsize == 1 else slot.stored,
                               tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 else tensor)  # fmt: skip
            assert (slot.scale is None and scale is None) or torch.equal(slot.scale, scale)
    # The per-call merge and the branch add the update to the same fp8 base (to bf16 rounding); the
    # merge rounds the update into fp8 with the weight.
    near = (outputs["merge_per_call"] - outputs["runtime"]).abs().mean()
    assert near < 0.3 * (outputs["merge"] - outputs["runtime"]).abs().mean()


def test_a_placement_change_after_a_merge_keeps_the_lora():
    """The OOM guard may re-place the DiT mid-run: merged weights travel with it."""
    lora = make_lora()
    expected_dit = tiny_dit()
    apply_loras(expected_dit, [(lora, 1.0)], "merge")
    expected = forward(expected_dit)
    dit = tiny_dit()
    apply_loras(dit, [(lora, 1.0)], "merge")
    place(dit, Plan(device="cpu"))
    place(dit, streamed_plan())  # stepped down to streaming
    torch.testing.assert_close(forward(dit), expected, rtol=1e-6, atol=1e-6)
    remove_loras(dit)
    place(dit, Plan(device="cpu"))
    base = copy.deepcopy(tiny_dit())
    torch.testing.assert_close(forward(dit), forward(base), rtol=0, atol=0)


def test_releasing_the_dit_drops_the_branch_copies_and_the_next_call_makes_them_again():
    lora = make_lora()
    dit = tiny_dit()
    loras = rig(dit)[1]
    apply_loras(dit, [(lora, 0.8)], "runtime")
    expected = forward(dit)
    branches = list(loras.branches)
    assert len(branches) == WAN_TINY.num_layers * 10 and all(b._up.held for b in branches)
    loras.release_device_copies()
    assert not any(c.held for b in branches for c in b.device_copies)
    torch.testing.assert_close(forward(dit), expected, rtol=0, atol=0)
    remove_loras(dit)
    assert loras.branches == []
    assert not any(k.startswith("_wanfit") for m in dit.modules() for k in vars(m))


def test_a_lora_on_a_sharded_dit_is_refused_in_one_sentence():
    from dataclasses import replace

    from wanfit.demo import tiny_pipeline
    from wanfit.errors import ConfigError

    pipe = tiny_pipeline(device="cpu")
    pipe.plan = replace(pipe.plan, dit_sharding="fsdp")
    with pytest.raises(ConfigError, match=r"cannot be applied to a DiT sharded across processes"):
        pipe.load_lora(make_lora(), 0.5)
    assert pipe.loras == []


# --- the runtime branch's fused add and shared down-projection ----------------------------------


def partial_lora(rank=8, seed=7, skip=("self_attn.k", "cross_attn.v")):
    """A LoRA of another rank that leaves some of the Linears sharing an input alone."""
    factors = tiny_lora.random_factors(
        WAN_TINY.num_layers, WAN_TINY.dim, WAN_TINY.ffn_dim, rank=rank, seed=seed
    )
    factors = {m: f for m, f in factors.items() if not m.endswith(skip)}
    shapes = parameter_shapes(WAN_TINY)
    return lora_keys.convert(tiny_lora.comfy(factors, alpha=3.0), shapes)


SHARING = ("self_attn.q", "self_attn.k", "self_attn.v", "cross_attn.k", "cross_attn.v")


@pytest.mark.parametrize("stack", ["one", "two", "partial"])
def test_the_branch_shares_one_down_projection_per_input_and_equals_the_merge(stack):
    loras = {
        "one": [(make_lora(), 0.8)],
        "two": [(make_lora(), 0.8), (partial_lora(), -0.6)],  # ranks differ between the members
        "partial": [(partial_lora(), 0.5)],  # q, v share; cross-attention's k alone has a branch
    }[stack]
    merged, branched = tiny_dit(), tiny_dit()
    apply_loras(merged, loras, "merge")
    apply_loras(branched, loras, "runtime")
    state = rig(branched)[1]
    # Per block: self-attention's q, k, v and cross-attention's k, v (the context), one GEMM each.
    groups = [2] if stack == "partial" else [3, 2]
    assert [len(s.members) for s in state.shared] == groups * WAN_TINY.num_layers
    with torch.inference_mode():
        out = branched(*inputs())
    torch.testing.assert_close(out, forward(merged), rtol=1e-5, atol=1e-5)
    assert all(s.computed == 1 for s in state.shared)  # one stacked GEMM per group and forward
    # ... and none of their own: no sharing member ever made a device copy of its down factor.
    for i in range(WAN_TINY.num_layers):
        for name in SHARING:
            branch = branched.blocks[i].get_submodule(name).low_rank
            if stack == "partial" and name in ("self_attn.k", "cross_attn.v"):
                assert branch is None
                continue
            alone = stack == "partial" and name == "cross_attn.k"
            assert (branch.shared is None) == alone and branch._down.held == alone
    assert all(s._input is None and s._result is None for s in state.shared)  # nothing kept after use
    forward(branched)
    assert all(s.computed == 2 for s in state.shared)  # a new forward computes afresh


def test_a_shared_down_projection_is_never_reused_for_another_or_a_changed_input():
    lora = make_lora()
    merged, branched = tiny_dit(), tiny_dit()
    apply_loras(merged, [(lora, 0.8)], "merge")
    apply_loras(branched, [(lora, 0.8)], "runtime")
    shared = rig(branched)[1].shared[0]
    attn, reference = branched.blocks[0].self_attn, merged.blocks[0].self_attn
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(1, 5, WAN_TINY.dim, generator=gen), torch.randn(1, 5, WAN_TINY.dim, generator=gen)
    with torch.no_grad():
        checks = [
            (attn.q(x), reference.q(x)),
            (attn.k(y), reference.k(y)),  # another input: computed afresh
            (attn.k(y), reference.k(y)),  # k took its share already: afresh
            (attn.v(y), reference.v(y)),  # v and q share the last
            (attn.q(y), reference.q(y)),
        ]
        x.mul_(2)  # changed in place after q read it: k must not take the old result
        checks += [(attn.q(x), reference.q(x)), (attn.k(x.mul_(0.5)), reference.k(x))]
    for got, expected in checks:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert shared.computed == 5


class _Gemms(torch.utils._python_dispatch.TorchDispatchMode):
    """The addmm / addmm_ calls under it: (op, the result's data_ptr, mat2's shape)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
            self.calls.append((func, out.data_ptr(), tuple(args[2].shape)))
        return out


def test_on_its_own_weight_the_base_gemm_adds_into_the_up_projections_output():
    """No autograd, no `gemm`: y = b + h B^T first, then the base GEMM adds x W^T into y in place;
    the same output as the product-then-add order (taken beside a replaced product)."""
    aten = torch.ops.aten
    dit = tiny_dit()
    apply_loras(dit, [(make_lora(), 0.8)], "runtime")
    layer = dit.blocks[0].ffn[2]
    branch = layer.low_rank
    x = torch.randn(3, WAN_TINY.ffn_dim, generator=torch.Generator().manual_seed(5))
    weight_t, up_t = tuple(layer.weight.t().shape), tuple(branch.up.t().shape)
    with torch.no_grad():
        expected = (
            torch.nn.functional.linear(x, layer.weight, layer.bias) + branch.down_projection(x) @ branch.up.T
        )
        with _Gemms() as gemms:
            out = layer(x)
        # The small GEMM wrote the output; the base GEMM added into that buffer, which is returned.
        assert [(op, shape) for op, _, shape in gemms.calls] == [
            (aten.addmm.default, up_t),
            (aten.addmm_.default, weight_t),
        ]
        assert gemms.calls[0][1] == gemms.calls[1][1] == out.data_ptr()
        # The other order, as beside a replaced product: the up-projection adds into its output.
        layer.gemm = lambda x: torch.nn.functional.linear(x, layer.weight, layer.bias)
        with _Gemms() as gemms:
            other = layer(x)
        layer.gemm = None
        assert [(op, shape) for op, _, shape in gemms.calls] == [
            (aten.addmm.default, weight_t),
            (aten.addmm_.default, up_t),
        ]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, other, rtol=1e-6, atol=1e-6)
    assert (out - torch.nn.functional.linear(x, layer.weight, layer.bias)).abs().mean() > 0.01
    with torch.enable_grad(), _Gemms() as gemms:
        added = layer(x)
    assert all(op is not aten.addmm_.default for op, _, _ in gemms.calls)  # out of place
    torch.testing.assert_close(added, expected, rtol=1e-6, atol=1e-6)


def test_with_autograd_the_branch_adds_out_of_place_and_gives_the_same_gradients():
    lora = make_lora()
    merged, branched = tiny_dit(), tiny_dit()
    apply_loras(merged, [(lora, 0.8)], "merge")
    apply_loras(branched, [(lora, 0.8)], "runtime")
    results = []
    for dit in (merged, branched):
        x, t, context = inputs()
        x.requires_grad_(True)
        out = dit(x, t, context)
        out.square().sum().backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)


def test_the_branch_beside_the_fast_tiers_fp8_gemm_adds_its_update_to_the_gemms_output():
    from wanfit.runtime import fp8_linear

    lora = make_lora(biases=False)  # a bias diff would be merged into the bias the GEMM shares
    dit = tiny_dit(torch.bfloat16)
    fp8_linear.install(dit.blocks, matmul="emulated")
    layer = dit.blocks[1].ffn[0]
    x = torch.randn(1, 7, WAN_TINY.dim, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        base = layer(x)
        apply_loras(dit, [(lora, 0.8)], "runtime")
        got = layer(x)
        remove_loras(dit)
        assert torch.equal(layer(x), base)  # the fp8 GEMM's own state was not written into
    update = lora.low_rank["blocks.1.ffn.0"]
    expected = base.float() + 0.8 * update.scale * (x.float() @ update.down.float().T) @ update.up.float().T
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)  # bf16 rounding
    assert (got.float() - base.float()).abs().mean() > 0.1


def test_the_per_call_merge_multiplies_by_a_merged_copy_and_never_writes_the_weight():
    """One addmm merges U D into a new weight (K = the rank), then one GEMM over the Linear's input
    with it (K = the input width): no GEMM over the input at the rank, the stored weight unchanged."""
    aten = torch.ops.aten
    lora = make_lora()
    dit = tiny_dit()
    apply_loras(dit, [(lora, 0.8)], "merge_per_call")
    layer = dit.blocks[1].ffn[2]
    stored = layer.weight.clone()
    update = lora.low_rank["blocks.1.ffn.2"]
    x = torch.randn(3, WAN_TINY.ffn_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), _Gemms() as gemms:
        out = layer(x)
    rank = update.rank
    assert [(op, shape) for op, _, shape in gemms.calls] == [
        (aten.addmm.default, (rank, WAN_TINY.ffn_dim)),  # U [out, R] @ D [R, in] onto W
        (aten.addmm.default, (WAN_TINY.ffn_dim, WAN_TINY.dim)),  # x @ W'^T + b
    ]
    assert torch.equal(layer.weight, stored)
    merged = stored + 0.8 * update.delta()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, merged, layer.bias), rtol=1e-6, atol=1e-6)
    # With autograd the gradients are the merged weights' too.
    merged_dit = tiny_dit()
    apply_loras(merged_dit, [(lora, 0.8)], "merge")
    grads = []
    for model in (merged_dit, dit):
        x, t, context = inputs()
        x.requires_grad_(True)
        model(x, t, context).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_the_per_call_merge_in_bf16_rounds_once_from_the_fp32_product():
    """W' = round(W + U D): the product of the compute-dtype factors accumulated in fp32 and rounded
    once with W, so it is about as near the fp32 merge as the merge's own rounding."""
    lora = make_lora()
    dit = tiny_dit(torch.bfloat16)
    apply_loras(dit, [(lora, 0.5)], "merge_per_call")
    layer = dit.blocks[0].self_attn.q
    branch = layer.low_rank
    got = branch.merged_weight(layer)
    up, down = (c.on(got.device, torch.bfloat16).float() for c in (branch._up, branch._down))
    once = (layer.weight.float() + up @ down).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and (got != once).float().mean() < 0.01
    exact = layer.weight.float() + 0.5 * lora.low_rank["blocks.0.self_attn.q"].delta()
    merge_error = (exact.to(torch.bfloat16).float() - exact).abs().mean()
    # 1.31x here, where the tiny LoRA's update is as large as W itself: the factors' own rounding.
    assert (got.float() - exact).abs().mean() < 1.5 * merge_error
    assert not torch.equal(got, layer.weight)


def test_the_per_call_merge_beside_the_fast_tiers_fp8_gemm_runs_as_the_branch():
    """The fp8 GEMM holds its own quantised copy: the update is added to its output, as the branch does."""
    from wanfit.runtime import fp8_linear

    lora = make_lora(biases=False)
    dit, branched = tiny_dit(torch.bfloat16), tiny_dit(torch.bfloat16)
    for model, mode in ((dit, "merge_per_call"), (branched, "runtime")):
        fp8_linear.install(model.blocks, matmul="emulated")
        apply_loras(model, [(lora, 0.8)], mode)
    layer = dit.blocks[1].ffn[0]
    assert layer.low_rank.merged_weight(layer) is None
    x = torch.randn(1, 7, WAN_TINY.dim, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), branched.blocks[1].ffn[0](x), rtol=0, atol=0)


def test_a_placement_change_keeps_the_per_call_merge_and_the_stored_weights_stay_base():
    """The OOM guard re-places the DiT mid-run (resident -> streamed -> fp8): the slots travel with the
    modules, the streamer's copies get the update at each call, and nothing stored is ever merged."""
    lora = make_lora()
    expected_dit = tiny_dit()
    apply_loras(expected_dit, [(lora, 1.0)], "merge")
    expected = forward(expected_dit)
    dit = tiny_dit()
    apply_loras(dit, [(lora, 1.0)], "merge_per_call")
    torch.testing.assert_close(forward(dit), expected, rtol=1e-5, atol=1e-5)
    streamer = place(dit, streamed_plan())
    torch.testing.assert_close(forward(dit), expected, rtol=1e-5, atol=1e-5)
    base = tiny_dit()
    assert torch.equal(streamer.find_slot(dit.blocks[1].ffn[2], "weight")[1].stored, base.blocks[1].ffn[2].weight)
    place(dit, Plan(device="cpu"))
    assert torch.equal(dit.blocks[1].ffn[2].weight, base.blocks[1].ffn[2].weight)
    torch.testing.assert_close(forward(dit), expected, rtol=1e-5, atol=1e-5)


def test_the_fast_tier_placed_after_a_branch_keeps_it_and_its_removal_keeps_the_fast_tier():
    """The slots are separate: fp8 GEMMs installed or dropped under a branch leave it in place, and
    removing the LoRA leaves the fp8 GEMM (the placement may re-place the DiT at any time)."""
    from wanfit.runtime import fp8_linear

    lora = make_lora(biases=False)
    dit = tiny_dit(torch.bfloat16)
    layer = dit.blocks[1].ffn[0]
    x = torch.randn(1, 7, WAN_TINY.dim, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        apply_loras(dit, [(lora, 0.8)], "runtime")
        exact = layer(x)  # the branch on the bf16 weight: the base GEMM last
        fp8_linear.install(dit.blocks, matmul="emulated")
        gemm = layer.gemm
        fast = layer(x)
        fast_base = gemm(x)
        remove_loras(dit)
        assert layer.low_rank is None and layer.gemm is gemm
        assert torch.equal(layer(x), fast_base)
        fp8_linear.uninstall(dit.blocks)
        apply_loras(dit, [(lora, 0.8)], "runtime")
        fp8_linear.install(dit.blocks, matmul="emulated")
        fp8_linear.uninstall(dit.blocks)
        assert torch.equal(layer(x), exact)  # the branch outlived the fast tier
    update = lora.low_rank["blocks.1.ffn.0"]
    branch = 0.8 * update.scale * (x.float() @ update.down.float().T) @ update.up.float().T
    torch.testing.assert_close(fast.float(), fast_base.float() + branch, rtol=2e-2, atol=2e-2)
    assert branch.abs().mean() > 0.1


class _GraphCounter:
    """aot_eager (functionalises in-place ops as Inductor does, without generating code), counting the
    graphs it compiles and the Linear calls in them."""

    def __init__(self):
        from torch._dynamo.backends.registry import lookup_backend

        self.inner, self.graphs, self.linears = lookup_backend("aot_eager"), 0, 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        self.linears += sum(node.target is torch._C._nn.linear for node in graph.graph.nodes)
        return self.inner(graph, example_inputs)


def test_the_branch_under_torch_compile_of_the_blocks_gives_the_eager_output_with_no_extra_graphs():
    from wanfit.runtime.compile import compile_blocks, forward_with

    loras = [(make_lora(), 0.8), (partial_lora(), -0.6)]
    dit = tiny_dit()
    backends = []
    with torch.no_grad():
        for applied in (False, True):
            if applied:
                apply_loras(dit, loras, "runtime")
            eager = forward(dit)
            torch.compiler.reset()
            backends.append(_GraphCounter())
            compiled = forward_with(dit, compile_blocks(dit.blocks, backend=backends[-1]), *inputs())
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.compiler.reset()
    state = rig(dit)[1]
    base, branched = backends
    assert branched.graphs == base.graphs  # the branch breaks no graph
    # Shared inside the graphs too: one down-projection per group (the blocks share their graphs).
    # The graphs' F.linear calls are those alone: each Linear's own product runs in the in-place op.
    downs = len(state.branches) - sum(len(s.members) - 1 for s in state.shared)
    assert base.linears == len(state.branches) // WAN_TINY.num_layers
    assert branched.linears == downs // WAN_TINY.num_layers
    assert all(s._input is None for s in state.shared)


def test_a_branch_attached_after_the_blocks_were_compiled_runs_and_its_removal_too():
    # torch's default skips hook guards, so a graph traced without the LoRA's hooks kept running
    # without them (the H200 run of 2026-12-02 timed such a graph as the "compiled branch").
    from wanfit.runtime.compile import compile_blocks, forward_with

    dit = tiny_dit()
    with torch.no_grad():
        base = forward(dit)
        torch.compiler.reset()
        blocks = compile_blocks(dit.blocks, backend="aot_eager")
        torch.testing.assert_close(forward_with(dit, blocks, *inputs()), base, rtol=1e-5, atol=1e-5)
        apply_loras(dit, [(make_lora(), 1.0)], "runtime")
        eager = forward(dit)
        assert (eager - base).abs().max() > 0.1  # the LoRA moves the output
        torch.testing.assert_close(forward_with(dit, blocks, *inputs()), eager, rtol=1e-5, atol=1e-5)
        remove_loras(dit)
        torch.testing.assert_close(forward_with(dit, blocks, *inputs()), base, rtol=1e-5, atol=1e-5)
    torch.compiler.reset()


def test_compiled_blocks_with_a_branch_compile_once_for_any_number_of_blocks():
    # More blocks than dynamo's recompile limit (8): a guard failing at each forward or block would
    # recompile until the limit left the blocks eager (the H200 run of 2026-12-02: the compiled
    # branch took 2.4x the compiled base). New LoRA sets, one after another, reuse the graphs too.
    from wanfit.runtime.compile import compile_blocks, forward_with

    config = WAN_TINY.with_overrides(num_layers=12)
    torch.manual_seed(0)
    dit = WanDiT(config).eval().requires_grad_(False)
    factors = tiny_lora.random_factors(config.num_layers, config.dim, config.ffn_dim, seed=3)
    lora = lora_keys.convert(tiny_lora.comfy(factors, alpha=2.0), parameter_shapes(config))
    loras = DiTLoras(dit)
    torch.compiler.reset()
    backend = _GraphCounter()
    blocks = compile_blocks(dit.blocks, backend=backend)
    x, t, context = inputs()
    graphs = []  # graphs compiled so far, after each compiled forward with a branch
    with torch.no_grad():
        base = forward_with(dit, blocks, x, t, context)
        base_graphs = backend.graphs
        for strength in (1.0, 0.5, -0.7, 0.3, 1.2, 0.9, -0.2, 0.6, 0.8, 1.1):
            loras.apply([(lora, strength)], "runtime")
            eager = dit(x, t, context)
            assert (eager - base).abs().max() > 0.1  # the LoRA moves the output
            for _ in range(3):
                compiled = forward_with(dit, blocks, x, t, context)
                torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
                graphs.append(backend.graphs)
            loras.remove()
            torch.testing.assert_close(forward_with(dit, blocks, x, t, context), base, rtol=1e-5, atol=1e-5)
    torch.compiler.reset()
    assert base_graphs < config.num_layers  # the blocks share their graphs
    # The first forward with the branch traced the blocks with hooks, in no more graphs than the
    # base's (the branch breaks none); nothing was traced after it.
    assert 0 < graphs[0] - base_graphs <= base_graphs
    assert graphs == [graphs[0]] * len(graphs)


class _PostGradGraphs:
    """Inductor's graphs after its post-grad passes (re-inplacing included), one per compile."""

    def __init__(self):
        from torch._inductor.custom_graph_pass import CustomGraphPass

        graphs = self.graphs = []

        class Record(CustomGraphPass):
            def __call__(self, graph):
                graphs.append(graph)

            def uuid(self):
                return None

        self.record = Record()

    def patch(self):
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        # No caches: a cached graph would skip the passes (and this count).
        return inductor_config.patch(post_grad_custom_post_pass=self.record, fx_graph_cache=False), (
            functorch_config.patch(enable_autograd_cache=False)
        )

    def count(self, graphs, *targets) -> int:
        return sum(node.target in targets for graph in graphs for node in graph.nodes)


def test_inductor_runs_the_compiled_branch_in_place_and_traces_it_once_after_apply():
    # Traced, the eager branch's addmm_ became an out-of-place addmm reading the Linear's output,
    # which cuBLAS copies before its GEMM (two extra passes over every Linear output, the 2026-12-02c
    # H200 compiled branch's +13%); and the first compiled forward after `apply` copied the factors in
    # its graph, so the next traced again.
    from wanfit.runtime.compile import compile_blocks, forward_with

    aten = torch.ops.aten
    dit = tiny_dit()
    loras = DiTLoras(dit)
    recorder = _PostGradGraphs()
    patch_inductor, patch_autograd_cache = recorder.patch()
    torch.compiler.reset()
    with torch.no_grad(), patch_inductor, patch_autograd_cache:
        blocks = compile_blocks(dit.blocks)
        base = forward_with(dit, blocks, *inputs())
        base_graphs = list(recorder.graphs)
        compiles = []  # graphs compiled so far, after each compiled forward with a branch
        for strength in (0.8, -0.5):
            loras.apply([(make_lora(), strength)], "runtime")
            for _ in range(2):  # no eager forward first: `apply` made the device copies
                compiled = forward_with(dit, blocks, *inputs())
                compiles.append(len(recorder.graphs))
            torch.testing.assert_close(compiled, dit(*inputs()), rtol=1e-5, atol=1e-5)
            loras.remove()
            torch.testing.assert_close(forward_with(dit, blocks, *inputs()), base, rtol=0, atol=0)
        assert len(recorder.graphs) == compiles[0]  # the base's graphs ran again
    torch.compiler.reset()
    branched = recorder.graphs[len(base_graphs) :]
    # One trace of the hooked graphs, none after it: not per forward, nor per LoRA set.
    assert 0 < len(branched) <= len(base_graphs) and compiles == [compiles[0]] * len(compiles)
    # Per block (the blocks share their graphs): one down-projection per branch or shared group,
    # each up-projection one GEMM writing the Linear's output (b + h B^T, as the base's addmm did),
    # and each base GEMM one in-place GEMM into it (K: the Linear's input width, not the rank); no
    # copy, no out-of-place addmm, no op left functionalised.
    block_linears = 10
    groups = [2, 3]  # cross-attention's k, v; self-attention's q, k, v
    in_place = torch.ops.wanfit.add_low_rank_product_.default
    assert recorder.count(branched, in_place) == block_linears
    widths = {
        node.args[2].meta["val"].shape
        for graph in branched
        for node in graph.nodes
        if node.target is in_place
    }
    assert widths == {
        (WAN_TINY.dim, WAN_TINY.dim),
        (WAN_TINY.ffn_dim, WAN_TINY.dim),
        (WAN_TINY.dim, WAN_TINY.ffn_dim),
    }
    assert recorder.count(branched, aten.addmm.default) == recorder.count(base_graphs, aten.addmm.default)
    downs = block_linears - sum(n - 1 for n in groups)
    assert recorder.count(branched, aten.mm.default) - recorder.count(base_graphs, aten.mm.default) == downs
    copies = (aten.copy_.default, aten.copy.default, aten.clone.default)
    assert recorder.count(branched, *copies) == recorder.count(base_graphs, *copies)
    functionalised = torch.ops.higher_order.auto_functionalized, torch.ops.higher_order.auto_functionalized_v2
    assert recorder.count(branched, *functionalised) == 0


# --- where the base weights are kept (Plan.lora_base_copy) ------------------------------------------------


@pytest.mark.parametrize("where", ["device", "host"])
def test_a_kept_base_copy_gives_the_same_merge_and_restores_bit_for_bit(where):
    first, second = [(make_lora(), 1.0)], [(make_lora(seed=4), 0.7), (make_lora(seed=5), -0.3)]
    reference = tiny_dit(torch.bfloat16)
    DiTLoras(reference).apply(second, "merge")  # from the base at once
    dit = tiny_dit(torch.bfloat16)
    before = state_of(dit)
    loras = DiTLoras(dit)
    loras.apply(first, "merge", where)
    assert loras.base_copy == where and loras.originals
    q = dit.blocks[0].self_attn.q.weight
    kept = loras.originals["blocks.0.self_attn.q.weight"].tensor
    assert kept.data_ptr() != q.data_ptr() and torch.equal(kept, before["blocks.0.self_attn.q.weight"])
    loras.apply(second, "merge")  # a second set: computed from the base, not from the first merge
    expected = state_of(reference)
    assert all(torch.equal(v, expected[k]) for k, v in state_of(dit).items())
    loras.remove()
    assert all(torch.equal(v, before[k]) for k, v in state_of(dit).items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_a_base_copy_the_merge_is_the_same_and_unloading_subtracts_the_deltas(dtype):
    lora_set = [(make_lora(), 0.8), (make_lora(seed=4), -0.5)]
    reference = tiny_dit(dtype)
    DiTLoras(reference).apply(lora_set, "merge", "host")
    dit = tiny_dit(dtype)
    base, out_base = state_of(dit), forward(dit)
    loras = DiTLoras(dit)
    loras.apply(lora_set, "merge", "none")
    assert loras.originals == {} and loras.base_copy == "none"
    merged = state_of(dit)
    assert all(torch.equal(v, merged[k]) for k, v in state_of(reference).items())  # the same bits
    out_merged = forward(dit)
    loras.remove()
    # Back to the base within one rounding of the merged weight (none at all in fp32 arithmetic's sense).
    for name, value in state_of(dit).items():
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-22
        bound = ulp * merged[name].float().abs().max() + 1e-30
        assert (value.float() - base[name].float()).abs().max() <= bound, name
    moved, back = (out_merged - out_base).abs().mean(), (forward(dit) - out_base).abs().mean()
    assert back < moved / 50


def test_without_a_base_copy_a_switch_to_the_runtime_branch_keeps_the_output():
    """An out-of-memory step-down may re-apply the LoRAs in another mode mid-run."""
    lora_set = [(make_lora(), 0.8)]
    dit = tiny_dit()
    loras = DiTLoras(dit)
    loras.apply(lora_set, "merge", "none")
    merged = forward(dit)
    loras.apply(lora_set, "runtime")
    assert loras.branches and loras.mode == "runtime"
    torch.testing.assert_close(forward(dit), merged, rtol=1e-5, atol=1e-5)


def test_the_base_copy_moves_where_the_plan_says_and_a_dropped_one_stays_dropped():
    dit = tiny_dit(torch.bfloat16)
    before = state_of(dit)
    loras = DiTLoras(dit)
    loras.apply([(make_lora(), 1.0)], "merge", "device")
    loras.keep_base("host")
    assert loras.base_copy == "host"
    assert all(o.tensor.device.type == "cpu" for o in loras.originals.values())
    loras.keep_base("none")
    assert loras.originals == {} and loras.base_copy == "none"
    loras.keep_base("device")  # nothing to copy from while the LoRAs are merged
    assert loras.base_copy == "none"
    with pytest.raises(ValueError, match="base_copy must be one of"):
        loras.keep_base("disk")
    loras.remove()  # subtracts: the base to a rounding
    assert max(float((v.float() - before[k].float()).abs().max()) for k, v in state_of(dit).items()) < 0.05
    rounded = state_of(dit)
    loras.apply([(make_lora(), 1.0)], "merge", "host")  # with nothing merged, a copy is kept again
    assert loras.base_copy == "host" and loras.originals
    loras.remove()
    assert all(torch.equal(v, rounded[k]) for k, v in state_of(dit).items())
