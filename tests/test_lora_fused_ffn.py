"""The FFN's runtime LoRA branches inside its GELU pass (issue 13; wanfit.runtime.lora_ffn,
Plan.lora_fused_ffn, off unless the user sets it): the same output as the separate GEMMs, given up
cleanly when the kernel fails, traced by torch.compile, and the Triton kernel itself under the
interpreter (fp16: the interpreter's bf16 dot is wrong in Triton 3.9, so bf16 is checked on the GPU
by the kernel's smoke test and benchmarks/bench_lora.py --ffn-tiles)."""

import warnings

import pytest
import torch

from tests.helpers.interpreted import run_interpreted
from tests.test_lora_plan import planned
from tests.test_lora_runtime import forward, inputs, make_lora, partial_lora, rig, tiny_dit
from wanfit.demo import tiny_pipeline
from wanfit.errors import ConfigError
from wanfit.models.configs import WAN_TINY
from wanfit.plan.plan import Plan
from wanfit.runtime import lora_ffn
from wanfit.runtime.lora import FusedFeedForward


def branched(dtype, fused: bool, loras=None):
    dit = tiny_dit(dtype)
    for block in dit.blocks:
        block.ffn_gelu_in_place = True
    rig(dit)[1].apply(loras or [(make_lora(), 0.8)], "runtime", fused_ffn=fused)
    return dit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_fused_ffn_gives_the_separate_gemms_output(dtype):
    loras = [(make_lora(), 0.8), (partial_lora(), -0.6)]  # two LoRAs stacked on the FFN's Linears
    separate, fused = branched(dtype, False, loras), branched(dtype, True, loras)
    state = rig(fused)[1]
    assert set(state.fused_ffns) == set(range(WAN_TINY.num_layers))
    want, got = forward(separate).float(), forward(fused).float()
    assert all(f.calls == 1 for f in state.fused_ffns.values())  # each block's FFN ran through it
    base = forward(tiny_dit(dtype)).float()
    diff = (got - want).abs().mean()
    # The activations' rounding in another order: under a step of the output dtype (bf16: 2^-8).
    assert diff < 2.0**-8 * want.abs().mean()
    assert (want - base).abs().mean() > 30 * diff  # the LoRAs move the output far beyond that


def test_fp32_weights_and_an_ffn_without_both_branches_run_linear_by_linear():
    dit = branched(torch.float32, True)
    state = rig(dit)[1]
    assert torch.equal(forward(dit), forward(branched(torch.float32, False)))
    assert all(f.calls == 0 for f in state.fused_ffns.values())  # fp32: not the kernel's
    only_first = partial_lora(skip=("ffn.2",))
    half = branched(torch.bfloat16, True, [(only_first, 1.0)])
    assert rig(half)[1].fused_ffns == {}  # ffn.2 has no branch: nothing to fuse
    assert all(block.ffn_low_rank is None for block in half.blocks)


def test_unloading_and_switching_it_off_clear_the_blocks_slots():
    dit = branched(torch.bfloat16, True)
    state = rig(dit)[1]
    assert all(block.ffn_low_rank is not None for block in dit.blocks)
    state.set_fused_ffn(False)
    assert state.fused_ffns == {} and all(block.ffn_low_rank is None for block in dit.blocks)
    state.set_fused_ffn(True)
    assert all(block.ffn_low_rank is not None for block in dit.blocks)
    state.apply(state.loras, "merge")  # a merge has no branches to fuse
    assert all(block.ffn_low_rank is None for block in dit.blocks)
    state.apply(state.loras, "runtime")
    assert all(block.ffn_low_rank is not None for block in dit.blocks)  # the setting kept
    state.remove()
    assert all(block.ffn_low_rank is None for block in dit.blocks)


def test_a_kernel_that_raises_is_given_up_once_and_the_output_is_the_separate_gemms(monkeypatch):
    want = forward(branched(torch.bfloat16, False))
    dit = branched(torch.bfloat16, True)
    placement, state = rig(dit)

    def broken(*args, **kwargs):
        raise RuntimeError("PTX JIT compilation failed\nmore")

    monkeypatch.setattr(lora_ffn, "gelu_low_rank", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = forward(dit)
        again = forward(dit)
    assert torch.equal(got, want) and torch.equal(again, want)
    told = [str(w.message) for w in caught if "fused LoRA FFN" in str(w.message)]
    assert len(told) == 1  # once for every block and call
    assert "RuntimeError: PTX JIT compilation failed;" in told[0]
    assert placement.failures["lora_fused_ffn"].endswith("the FFNs' LoRA branches run as separate GEMMs")
    assert all(f.failure is not None and f.calls == 0 for f in state.fused_ffns.values())
    state.apply(state.loras, "runtime")  # a new LoRA set in the same process: not tried again
    assert state.fused_ffns == {} and all(block.ffn_low_rank is None for block in dit.blocks)


def test_a_failed_smoke_test_is_given_up_before_the_blocks_run(monkeypatch):
    fused = FusedFeedForward(None, None)  # the check alone: no branch is called
    monkeypatch.setattr(lora_ffn, "smoke_test", lambda device: "its output differs from the torch ops")
    told = []
    fused.on_failure = told.append
    assert fused.check(torch.device("cpu"))  # no smoke test off CUDA: the torch ops run there
    assert not fused.check(torch.device("cuda", 0))
    assert told == ["the fused LoRA FFN kernel failed its smoke test (its output differs from the torch ops)"]


def test_under_torch_compile_the_fused_ffn_gives_the_eager_output():
    from wanfit.runtime.compile import compile_blocks, forward_with

    dit = branched(torch.bfloat16, True)
    with torch.no_grad():
        eager = dit(*inputs())
        torch.compiler.reset()
        compiled = forward_with(dit, compile_blocks(dit.blocks, backend="aot_eager"), *inputs())
        for block in dit.blocks:
            block.ffn_gelu_in_place = False  # the out-of-place op
        torch.compiler.reset()
        out_of_place = forward_with(dit, compile_blocks(dit.blocks, backend="aot_eager"), *inputs())
    torch.compiler.reset()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(out_of_place, eager, rtol=0, atol=0)


# --- the plan ---------------------------------------------------------------------------------------------


def test_the_fused_ffn_is_the_users_to_set_where_the_triton_kernels_run():
    streamed = planned("h100", vram="3GiB", settings=["lora_mode=runtime"])  # streamed blocks, the branch
    assert streamed.plan.lora_mode == "runtime" and not streamed.plan.lora_fused_ffn  # off unless set
    assert "GELU pass" not in streamed.lora_summary
    on = planned("h100", vram="3GiB", settings=["lora_mode=runtime", "lora_fused_ffn=true"])
    assert on.plan.lora_mode == "runtime" and on.plan.lora_fused_ffn
    assert "Each FFN's two branches run inside its GELU pass" in on.lora_summary
    assert on.plan.dit_blocks_resident == streamed.plan.dit_blocks_resident  # the same plan otherwise
    with pytest.raises(ConfigError) as err:  # the per-call merge has no branches to fuse
        planned("h100", vram="3GiB", settings=["lora_fused_ffn=true"])
    assert str(err.value) == (
        "--set lora_fused_ffn=true fuses the runtime LoRA branches, but this plan applies the LoRAs as "
        "merge_per_call; add --set lora_mode=runtime to run the branches."
    )
    with pytest.raises(ConfigError) as err:
        planned("cpu", settings=["lora_mode=runtime", "lora_fused_ffn=true"])
    assert str(err.value) == (
        "--set lora_fused_ffn=true was asked for, but the fused kernels run on CUDA GPUs only."
    )


def test_the_pipeline_follows_the_plans_setting():
    pipe = tiny_pipeline(plan=Plan(device="cpu"))
    pipe.load_lora(make_lora(), mode="runtime")  # the plan's setting: off
    assert not pipe.lora.fused_ffn and not pipe.plan.lora_fused_ffn and not pipe.lora.fused_ffns
    pipe.apply_plan(Plan(device="cpu", lora_mode="runtime", lora_fused_ffn=True))
    assert pipe.lora.fused_ffn and pipe.lora.fused_ffns
    assert pipe.run_record()["plan"]["lora_fused_ffn"] is True
    pipe.apply_plan(Plan(device="cpu", lora_mode="runtime"))
    assert not pipe.lora.fused_ffn and not pipe.lora.fused_ffns


# --- the kernel, under Triton's interpreter ---------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(
        "lora_ffn_interpreted.py", "Triton is not installed: the kernel is not tested here"
    )


def test_the_kernel_matches_the_torch_ops_on_ragged_shapes(interpreted):
    for case in interpreted["cases"]:
        assert case["gelu_max_abs"] <= 2.0**-10 * max(1.0, case["gelu_max"]), case  # one fp16 step
        assert case["down_rel"] <= 2e-3, case
        assert case["in_place_equal"], case


def test_the_tiny_dit_with_the_kernel_gives_the_separate_gemms_output(interpreted):
    model = interpreted["model"]
    assert model["kernel_calls"] == WAN_TINY.num_layers
    assert model["rel_l2_vs_separate"] < 2e-3 < model["lora_rel_l2"]
