"""Plan.fused_elementwise (wanfit.runtime.fused_elementwise): the Triton kernels against the torch ops
(under Triton's interpreter, when Triton is installed), the blocks' slots (None: today's torch ops
bit for bit; used only eagerly, without autograd, in the Linear's dtype), the planner's rule and the
placement that sets the slots."""

import importlib.util
from dataclasses import replace

import pytest
import torch

from tests.helpers.hardware import emulated
from tests.helpers.interpreted import run_interpreted
from tests.test_placement import CountingBackend, make_dit
from wanfit.errors import ConfigError, WanfitWarning
from wanfit.models import dit as D
from wanfit.models.configs import WAN_TINY
from wanfit.plan.plan import Plan
from wanfit.plan.planning import Constraints, model_request, plan_for
from wanfit.runtime import fused_elementwise as fe
from wanfit.runtime.placement import DiTLayout

NO_TRITON = (
    "Triton is not installed (CI does not install it): the kernels run only under its interpreter here"
)
FUSED = Plan(fused_elementwise=True)


@pytest.fixture
def dit_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 6, 10, generator=g)
    return x, torch.tensor([700.0]), torch.randn(1, 16, WAN_TINY.text_dim, generator=g)


def tiny_model(dtype=torch.float32) -> D.WanDiT:
    torch.manual_seed(0)
    model = D.WanDiT(WAN_TINY).to(dtype).eval()
    with torch.no_grad():  # norm weights of ones would hide a missing weight
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


# --- the torch path, as it was before the slots ------------------------------------------------------


def todays_self_attention(attn: D.SelfAttention, x, rope):
    dtype = attn.q.weight.dtype
    x = x.to(dtype)
    q = attn.norm_q(attn.q(x)).unflatten(-1, (attn.num_heads, -1))
    k = attn.norm_k(attn.k(x)).unflatten(-1, (attn.num_heads, -1))
    v = attn.v(x).unflatten(-1, (attn.num_heads, -1))
    q, k = D.apply_rope(q, rope).to(dtype), D.apply_rope(k, rope).to(dtype)
    out = D.attention(q, k, v.to(dtype), dispatcher=attn.dispatcher).flatten(2)
    return attn.o(out.to(dtype))


def todays_block(block: D.WanBlock, x, e, context, rope):
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (block.modulation.float() + e).unbind(1)
    h = D.modulate(block.norm1(x), shift_sa, scale_sa)
    x = torch.addcmul(x, todays_self_attention(block.self_attn, h, rope), gate_sa.unsqueeze(1))
    x = x + block.cross_attn(block.norm3(x), context)
    h = D.modulate(block.norm2(x), shift_ff, scale_ff)
    return torch.addcmul(x, D.linear(block.ffn, h), gate_ff.unsqueeze(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_no_kernels_set_the_blocks_compute_todays_torch_ops_bit_for_bit(dit_inputs, dtype):
    model = tiny_model(dtype)
    with torch.no_grad():
        inputs = model.embed(*dit_inputs)
        got = expected = inputs.tokens
        for block in model.blocks:
            assert block.elementwise is None and block.self_attn.elementwise is None
            got = block(got, inputs.e, inputs.context, inputs.rope)
            expected = todays_block(block, expected, inputs.e, inputs.context, inputs.rope)
    assert torch.equal(got, expected)


# --- the slots, with torch stand-ins for the kernels (no Triton needed) ------------------------------


class TorchKernels:
    """The kernels' contract in torch ops (the module's own fallback, TORCH_OPS), recording each call's
    dtypes (in, out)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        op = getattr(fe.TORCH_OPS, name)

        def call(x, *args):
            out = op(x, *args)
            self.calls.append((name, x.dtype, out.dtype))
            return out

        return call


def test_the_slots_take_over_the_norms_and_rope_and_write_the_linears_dtype(dit_inputs):
    model = tiny_model(torch.bfloat16)
    kernels = TorchKernels()
    with torch.no_grad():
        expected = model(*dit_inputs)
        fe.install(model.blocks, kernels)
        got = model(*dit_inputs)
    # Per block: norm1, norm3 and norm2 (fp32 in, the linears' bf16 out); self-attention's q and k and
    # cross-attention's q (bf16 in and out; the text's k stays torch ops).
    per_block = [
        ("layer_norm_modulate", torch.float32, torch.bfloat16),
        ("rms_norm_rope", torch.bfloat16, torch.bfloat16),
        ("rms_norm_rope", torch.bfloat16, torch.bfloat16),
        ("layer_norm_affine", torch.float32, torch.bfloat16),
        ("rms_norm", torch.bfloat16, torch.bfloat16),
        ("layer_norm_modulate", torch.float32, torch.bfloat16),
    ]
    assert kernels.calls == per_block * len(model.blocks)
    assert torch.equal(got, expected)  # the same math, the cast the Linear made moved into the kernel


def test_the_slots_are_not_used_under_autograd_or_when_compiled(dit_inputs):
    model = tiny_model()
    kernels = TorchKernels()
    fe.install(model.blocks, kernels)
    out = model(*dit_inputs)  # autograd on: the kernels have no backward
    out.sum().backward()
    assert kernels.calls == [] and model.blocks[0].self_attn.q.weight.grad is not None
    torch.compiler.reset()
    backend = CountingBackend()
    compiled = torch.compile(model.blocks[0], backend=backend, dynamic=False)
    with torch.no_grad():
        inputs = model.embed(*dit_inputs)
        compiled(inputs.tokens, inputs.e, inputs.context, inputs.rope)
    assert backend.runs > 0 and kernels.calls == []  # the graph keeps the torch ops (Inductor fuses them)


def test_install_sets_and_clears_every_slot():
    model = tiny_model()
    fe.install(model.blocks)
    slots = lambda b: (b.elementwise, b.self_attn.elementwise, b.cross_attn.elementwise)  # noqa: E731
    assert all(slots(b) == (fe.KERNELS,) * 3 for b in model.blocks)
    fe.install(model.blocks, None)
    assert all(slots(b) == (None,) * 3 for b in model.blocks)


def test_a_rope_of_another_length_is_refused_before_any_kernel_runs():
    rope = D.rope_frequencies((1, 4, 1), 4)  # 4 tokens, for an x of 5
    with pytest.raises(ValueError, match="does not match 2 heads"):
        fe.rms_norm_rope(torch.zeros(1, 5, 8), torch.ones(8), rope, 2, 1e-6)


# --- the Triton kernels, under the interpreter -------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """What tests/helpers/fused_interpreted.py measures under Triton's interpreter (a process of its
    own: the interpreter must be chosen before Triton is first imported)."""
    return run_interpreted("fused_interpreted.py", NO_TRITON)


# One rounding step of the output dtype at the largest |value| (the interpreter's fp32 -> bf16 cast
# truncates, so a whole step, not half); fp32: the reductions' different order.
STEP = {"bfloat16": 2.0**-7, "float16": 2.0**-10}


def within_a_step(case: dict) -> bool:
    scale = 2.0 ** int(torch.tensor(case["max_abs_fp32"]).log2().floor())
    return case["max_abs_vs_fp32"] <= STEP.get(case["dtype"], 1e-6) * scale


def test_layer_norm_modulate_matches_the_torch_ops(interpreted):
    cases = interpreted["layer_norm"]
    assert [c["dtype"] for c in cases] == ["bfloat16", "float16", "float32", "bfloat16"]
    for case in cases:
        assert case["shape_ok"] and within_a_step(case), case


def test_rms_norm_rope_matches_the_torch_ops(interpreted):
    for case in interpreted["rope"]:
        channels, heads, dtype = case["case"]
        assert case["dtype"] == dtype and case["shape"] == [2, 37, heads, channels // heads]
        assert within_a_step(case), case
        assert case["rotation_matters"] > 1.0  # the rope shard rotates the pairs: an unrotated result fails


def test_the_affine_layer_norm_and_the_plain_rms_norm_match_the_torch_ops(interpreted):
    cases = interpreted["plain"]
    assert [c["case"] for c in cases] == [["layer_norm_affine", "bfloat16"], ["rms_norm", "bfloat16"]]
    for case in cases:
        assert case["shape_ok"] and case["dtype"] == "bfloat16" and within_a_step(case), case


def test_the_whole_model_with_the_kernels_is_close_to_the_torch_ops(interpreted):
    model = interpreted["model"]
    assert model["float32"]["rel_l2"] < 1e-5
    assert model["bfloat16"]["rel_l2"] < 1e-2  # bf16 rounding moved to other places (and truncated here)
    assert model["float32"]["cleared_equal"] and model["bfloat16"]["cleared_equal"]
    assert interpreted["smoke_test"] is None


# --- the planner --------------------------------------------------------------------------------------


def planned(card: str, **overrides):
    return plan_for(model_request("1.3B"), Constraints(overrides=overrides), emulated(card))


def test_an_emulated_h200_running_eagerly_plans_the_kernels_from_its_declarations():
    result = planned("h200")
    assert not result.plan.compile_dit and result.plan.fused_elementwise
    assert any("fused Triton kernels" in n and "emulated: not run" in n for n in result.notes)


def test_the_cpu_and_cards_before_ampere_keep_the_torch_ops():
    assert not plan_for(
        model_request("1.3B"), Constraints(device="cpu"), emulated("cpu")
    ).plan.fused_elementwise
    t4 = planned("t4")
    assert not t4.plan.fused_elementwise
    assert any("compute capability 8.0 or newer" in n and "sm_75" in n for n in t4.notes)


def test_compiled_blocks_keep_the_torch_ops():
    result = planned("h200", compile_dit=True)
    assert result.plan.compile_dit and not result.plan.fused_elementwise
    assert any("compiled blocks fuse them already" in n for n in result.notes)
    forced = planned("h200", compile_dit=True, fused_elementwise=True)
    assert any("run as torch ops: the compiled blocks fuse them already" in n for n in forced.notes)
    # Forced on with compiled blocks, the placement still leaves the slots empty.
    assert not DiTLayout.from_plan(replace(FUSED, compile_dit=True)).fused_elementwise
    assert DiTLayout.from_plan(FUSED).fused_elementwise


def test_the_users_setting_wins():
    result = planned("h200", fused_elementwise=False)
    assert not result.plan.fused_elementwise
    assert any("--set fused_elementwise=false" in n for n in result.notes)
    with pytest.raises(ConfigError, match=r"fused_elementwise=true was asked for, but .*compute capability"):
        planned("t4", fused_elementwise=True)


def test_the_plan_is_the_same_on_any_machine_under_emulation(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # as if no Triton here
    assert planned("h200").plan.fused_elementwise


# --- the placement --------------------------------------------------------------------------------------


def test_the_placement_sets_the_slots_after_the_smoke_test_and_clears_them(monkeypatch):
    monkeypatch.setattr(fe, "runtime_failure", lambda device: None)
    placement = make_dit()
    placement.place(FUSED)
    guarded = placement.dit.blocks[0].elementwise
    assert isinstance(guarded, fe.GuardedKernels) and guarded.kernels is fe.KERNELS
    assert all(b.elementwise is guarded for b in placement.dit.blocks)
    placement.release()  # on the host: the torch ops
    assert all(b.elementwise is None for b in placement.dit.blocks)
    placement.place(FUSED)
    assert all(isinstance(b.self_attn.elementwise, fe.GuardedKernels) for b in placement.dit.blocks)
    placement.apply(Plan())
    assert all(b.elementwise is None and b.self_attn.elementwise is None for b in placement.dit.blocks)


def test_kernels_that_cannot_run_leave_the_torch_ops_with_one_warning(dit_inputs):
    placement = make_dit()  # the CPU: no kernels
    with pytest.warns(
        WanfitWarning, match="fused elementwise kernels run on CUDA GPUs only; the blocks run the torch ops"
    ):
        placement.place(FUSED)
    assert "CUDA GPUs only" in placement.failures["fused_elementwise"]
    assert all(b.elementwise is None for b in placement.dit.blocks)
    exact = make_dit()
    exact.place(Plan())
    with torch.no_grad():
        assert torch.equal(placement(*dit_inputs), exact(*dit_inputs))


# --- a kernel that raises at run time: given up for the process, the call and later ones run torch ops --


class RaisingKernels:
    def __init__(self, error):
        self.error, self.calls = error, 0

    def __getattr__(self, name):
        def call(*args):
            self.calls += 1
            raise self.error

        return call


def test_a_kernel_that_raises_is_given_up_once_and_the_blocks_get_the_torch_ops_result(dit_inputs):
    model = tiny_model(torch.bfloat16)
    raising, told = RaisingKernels(RuntimeError("PTX JIT failed\nmore")), []
    guarded = fe.GuardedKernels(kernels=raising, on_failure=told.append)
    with torch.no_grad():
        fe.install(model.blocks, TorchKernels())
        expected = model(*dit_inputs)
        fe.install(model.blocks, guarded)
        got = model(*dit_inputs)
        again = model(*dit_inputs)
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert raising.calls == 1  # after the first failure no kernel is tried again
    assert told == ["the fused layer_norm_modulate kernel raised RuntimeError: PTX JIT failed"]
    assert guarded.failure == told[0]


def test_out_of_memory_in_a_kernel_is_not_given_up_but_passed_to_the_runtime():
    guarded = fe.GuardedKernels(kernels=RaisingKernels(torch.OutOfMemoryError("CUDA out of memory")))
    x = torch.randn(1, 4, 8)
    with pytest.raises(torch.OutOfMemoryError):
        guarded.rms_norm(x, torch.ones(8), 1e-6)
    assert guarded.failure is None
    with pytest.raises(AttributeError):
        guarded.not_a_kernel  # noqa: B018  only the four kernels' names


def test_the_placement_records_and_warns_once_when_a_kernel_gives_up(monkeypatch):
    from wanfit.runtime.placement import DiTPlacement

    monkeypatch.setattr(fe, "runtime_failure", lambda device: None)  # as if it passed on a GPU
    placement = DiTPlacement(tiny_model())
    placement._place_fused_elementwise(replace(DiTLayout.from_plan(FUSED), device="cpu"))
    slot = placement.dit.blocks[0].elementwise
    assert isinstance(slot, fe.GuardedKernels) and placement.dit.blocks[1].self_attn.elementwise is slot
    slot.kernels = RaisingKernels(ValueError("bad rope"))
    with pytest.warns(WanfitWarning, match="fused rms_norm kernel raised ValueError: bad rope"):
        slot.rms_norm(torch.randn(1, 4, 8), torch.ones(8), 1e-6)
    assert "torch ops for the rest of the process" in placement.failures["fused_elementwise"]
