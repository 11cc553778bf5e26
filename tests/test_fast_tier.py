"""The fast tier end to end on the CPU: who may ask for it (one sentence otherwise), the placement that
puts the fp8 GEMMs in and takes them out, its fallbacks, the record, and what `wanfit doctor` says."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.helpers.hardware import emulated
from tests.test_placement import CountingBackend, dit_state, make_dit, nothing_stuck_on
from wanfit.cli import main
from wanfit.commands import common
from wanfit.errors import ConfigError, WanfitWarning
from wanfit.plan.lora import lora_mode_rule
from wanfit.plan.plan import Plan
from wanfit.plan.planning import Constraints, model_request, plan_for
from wanfit.runtime import fp8_linear
from wanfit.runtime.placement import DiTLayout

FAST = Plan(fp8_gemm=True)
TINY = dict(height=32, width=48, num_frames=5, num_inference_steps=2, progress=False)


@pytest.fixture
def dit_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 6, 10, generator=g)
    return x, torch.tensor([700.0]), torch.randn(1, 16, 32, generator=g)


def rel_l2(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- planning ---------------------------------------------------------------------------------------


def test_fast_is_refused_in_one_sentence_where_there_are_no_fp8_tensor_cores():
    request = model_request("1.3B")
    for card, words in (("cpu", "runs on the CPU"), ("t4", "sm_75"), ("a100", "sm_80")):
        with pytest.raises(ConfigError, match=words) as info:
            plan_for(request, Constraints(fast=True), emulated(card))
        text = str(info.value)
        assert text.startswith("--fast was asked for, but") and text.count(". ") == 0 and text.endswith(".")
    with pytest.raises(ConfigError, match=r"^--set fp8_gemm=true was asked for"):
        plan_for(request, Constraints.from_options(settings=["fp8_gemm=true"]), emulated("t4"))


def test_fast_on_a_capable_card_is_a_user_setting_named_in_the_plan():
    result = plan_for(model_request("1.3B"), Constraints(fast=True), emulated("h100"))
    assert result.plan.fp8_gemm and result.plan.tier == "fast" and "fp8_gemm" in result.frozen
    assert any("fast tier" in note and "lossy" in note for note in result.notes)
    exact = plan_for(model_request("1.3B"), Constraints(), emulated("h100"))
    assert not exact.plan.fp8_gemm and exact.plan.tier == "exact"


def test_fast_computes_in_bf16_only():
    with pytest.raises(ConfigError, match="computes in bfloat16, and this run computes in float16"):
        plan_for(model_request("1.3B"), Constraints(fast=True, dtype="fp16"), emulated("h100"))


def test_a_plan_that_streams_the_dit_says_its_blocks_run_exact():
    result = plan_for(model_request("1.3B"), Constraints(fast=True, vram=4 * 1024**3), emulated("h100"))
    assert result.plan.dit_blocks_resident is not None
    assert any("streams, shards or fp8-stores it, so its blocks run exact" in n for n in result.notes)
    assert not DiTLayout.from_plan(result.plan).fp8_gemm


# --- placement --------------------------------------------------------------------------------------


def test_placing_the_fast_tier_and_back_ends_as_a_fresh_placement(dit_inputs):
    placement = make_dit()
    exact = make_dit()
    exact.place(Plan())
    with torch.no_grad():
        expected = exact(*dit_inputs)
        placement.place(FAST)
        assert placement.tier == "fast" and placement.fp8_gemm_bytes > 0
        fast = placement(*dit_inputs)
        assert 1e-4 < rel_l2(fast, expected) < 5e-2
        placement.apply(Plan())
        assert placement.tier == "exact"
        assert torch.equal(placement(*dit_inputs), expected)
    assert dit_state(placement) == dit_state(exact)
    assert all(m.gemm is None for m in fp8_linear.block_linears(placement.dit.blocks))
    assert nothing_stuck_on(placement.dit)


def test_the_fast_tier_with_compiled_blocks_runs_the_fp8_gemms_through_the_graphs(dit_inputs):
    backend = CountingBackend()
    placement = make_dit(backend)
    eager = make_dit()
    eager.place(FAST)
    placement.place(replace(FAST, compile_dit=True))
    with torch.no_grad():
        compiled = placement(*dit_inputs)
        expected = eager(*dit_inputs)
    assert backend.runs > 0 and placement.compiled_blocks is not None
    assert torch.equal(compiled, expected)


def test_streaming_drops_the_fp8_gemms():
    placement = make_dit()
    placement.place(FAST)
    placement.apply(replace(FAST, dit_blocks_resident=1))
    assert placement.tier == "exact" and placement.streamer is not None
    assert all(m.gemm is None for m in fp8_linear.block_linears(placement.dit.blocks))


def test_an_fp8_gemm_failing_its_smoke_test_leaves_the_blocks_exact_with_one_warning(dit_inputs, monkeypatch):
    monkeypatch.setattr(fp8_linear, "smoke_test", lambda device: "torch._scaled_mm raised RuntimeError: no")
    placement = make_dit()
    with pytest.warns(WanfitWarning, match="fp8 GEMM failed its smoke test"):
        placement.place(FAST)
    assert placement.tier == "exact" and "scaled_mm raised" in placement.failures["fp8_gemm"]
    exact = make_dit()
    exact.place(Plan())
    with torch.no_grad():
        assert torch.equal(placement(*dit_inputs), exact(*dit_inputs))


def test_a_failing_compile_falls_back_to_eager_once_and_for_all(dit_inputs):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("InductorError: something the compiler could not do")

    placement = make_dit(broken_backend)
    placement.place(Plan(compile_dit=True))
    eager = make_dit()
    eager.place(Plan())
    with torch.no_grad(), pytest.warns(WanfitWarning, match="compiling the DiT's blocks failed"):
        out = placement(*dit_inputs)
    with torch.no_grad():
        assert torch.equal(out, eager(*dit_inputs))
    assert placement.compiled_blocks is None and "InductorError" in placement.failures["compile"]
    placement.apply(replace(Plan(compile_dit=True), ffn_chunk=16))  # re-placed: no second attempt
    assert placement.compiled_blocks is None


def test_new_weights_are_quantised_again(dit_inputs):
    placement = make_dit()
    placement.place(FAST)
    with torch.no_grad():
        before = placement(*dit_inputs)
        block = placement.dit.blocks[0]
        block.ffn[0].weight.mul_(2.0)  # as a merged LoRA rewrites a weight
        placement.weights_changed()
        assert placement.tier == "exact"  # stale copies dropped at once
        placement.place(FAST)
        after = placement(*dit_inputs)
    assert placement.tier == "fast" and not torch.equal(before, after)


def test_loras_sit_beside_the_fp8_gemms_not_merged_into_stale_copies():
    assert lora_mode_rule(FAST)[0] == "runtime" and lora_mode_rule(Plan())[0] == "merge"


# --- the pipeline's record --------------------------------------------------------------------------


def test_a_fast_run_says_so_in_its_record_and_differs_from_exact_by_a_little():
    from wanfit.demo import tiny_pipeline

    exact = tiny_pipeline(plan=Plan())
    fast = tiny_pipeline(plan=FAST)
    a = exact("a fox", seed=3, **TINY)
    b = fast("a fox", seed=3, **TINY)
    assert exact.run_record()["tier"] == "exact" and fast.run_record()["tier"] == "fast"
    assert fast.run_record()["plan"]["fp8_gemm"] is True and fast.run_record()["given_up"] == {}
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()
    assert 0 < diff < 8  # of 255


# --- the command line -------------------------------------------------------------------------------


@pytest.fixture
def fixed_hosts(monkeypatch):
    monkeypatch.setattr(common, "hardware_from_args", lambda args: emulated(args.emulate or "cpu", 64))


def test_generate_fast_on_a_cpu_is_one_line_and_exit_2(capsys, tmp_path):
    from tests.test_cli_generate import files_in, one_error_line

    assert main(["generate", "--fast", "--out", str(tmp_path / "v.mp4")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--fast was asked for" in line and "CPU" in line
    assert files_in(tmp_path) == []


def test_plan_fast_shows_the_tier(fixed_hosts, capsys):
    assert main(["plan", "--json", "--fast", "--emulate", "h100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["fp8_gemm"] is True and "fp8_gemm" in out["user_set"]
    assert main(["plan", "--fast", "--emulate", "rtx3060"]) == 2
    assert "sm_86" in capsys.readouterr().err


def test_doctor_says_which_tier_a_card_gets_and_why(fixed_hosts, capsys):
    assert main(["doctor", "--json", "--emulate", "h100"]) == 0
    tiers = json.loads(capsys.readouterr().out)["tiers"]
    assert tiers["exact"]["available"] and tiers["fast"]["available"]
    assert "fp8 e4m3" in tiers["fast"]["why"] and "sm_90" in tiers["fast"]["why"]
    assert main(["doctor", "--emulate", "t4"]) == 0
    text = capsys.readouterr().out
    assert "tier fast   no   --fast is refused" in text and "sm_75" in text
    assert "tier exact  yes" in text
