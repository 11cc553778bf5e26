"""Compile by default when it pays: the planner weighs steps x the saving per step against the compile,
from what runs measured on this card (the user cache dir) or, unmeasured, the H100's numbers."""

import json
from dataclasses import replace

import pytest
import torch

from wanfit.hardware.probe import probe
from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B
from wanfit.plan import compile_costs as C
from wanfit.plan import planner as P
from wanfit.plan.estimates import Request

GIB = 1024**3
H200 = P.DeviceBudget("cuda", "NVIDIA H200", (9, 0), 140 * GIB, 139 * GIB, 256 * GIB, True, compilable=True)
REQ = Request(WAN_T2V_1_3B)  # 832x480x81, guidance on: batched, 2 samples per call


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path / "cache"))


def key_of(request: Request = REQ, cfg_batch: bool = True, fp8: bool = False) -> str:
    return C.job(
        request.config,
        request.tokens,
        guidance=request.guidance,
        cfg_batch=cfg_batch,
        dtype="bfloat16",
        fp8_gemm=fp8,
    )[0]


def planned(request=REQ, device=H200, steps=None, **overrides):
    return P.plan_run(device, replace(request, steps=steps), overrides=overrides)


def test_unmeasured_the_h100_numbers_decide_and_the_note_says_so():
    # 1.3B at 480p: 0.14 s saved per step, 17 s to compile: pays past 121 steps.
    assert not planned(steps=50).plan.compile_dit
    assert not planned(steps=121).plan.compile_dit
    result = planned(steps=122)
    assert result.plan.compile_dit
    note = next(n for n in result.notes if "compiles the DiT's blocks" in n)
    assert "122 steps" in note and "H100" in note
    # 14B does about 4.4 times the fused work per step: compiling pays at the default 50 steps.
    big = planned(request=Request(WAN_T2V_14B), steps=None)
    assert big.plan.compile_dit and any("50 steps" in n for n in big.notes)


def test_with_the_fused_eager_kernels_the_unmeasured_saving_is_the_h200s_against_them():
    fused = replace(H200, fused_elementwise_refused=None)  # the kernels passed their smoke test
    # 0.014 s saved per step against 17 s to compile: pays only past 1214 steps.
    result = planned(device=fused, steps=1000)
    assert not result.plan.compile_dit and result.plan.fused_elementwise
    note = next(n for n in result.notes if "runs the DiT eagerly" in n)
    assert "0.014 s saved per step" in note and "fused eager blocks" in note
    assert not planned(device=fused, request=Request(WAN_T2V_14B), steps=None).plan.compile_dit
    # The user keeps torch's ops: the H100's saving (against plain eager blocks) decides again.
    plain = planned(device=fused, steps=122, fused_elementwise=False)
    assert plain.plan.compile_dit and not plain.plan.fused_elementwise


def test_measured_costs_on_this_card_decide_and_the_latest_compile_counts():
    measured = {key_of(): {"eager_step_s": 1.2, "compiled_step_s": 1.0, "compile_s": [19.0, 3.0]}}
    device = replace(H200, compile_measured=measured)
    # 0.2 s per step against a warm-cache compile of 3 s: pays past 15 steps.
    assert planned(device=device, steps=16).plan.compile_dit
    assert not planned(device=device, steps=15).plan.compile_dit
    note = next(n for n in planned(device=device, steps=50).notes if "compiles" in n)
    assert "measured on this card" in note and "3 s to compile" in note


def test_a_compile_that_saves_nothing_is_never_chosen():
    measured = {key_of(): {"eager_step_s": 1.0, "compiled_step_s": 1.05, "compile_s": [0.5]}}
    assert not planned(device=replace(H200, compile_measured=measured), steps=1000).plan.compile_dit


def test_another_jobs_first_compile_stands_in_for_an_unmeasured_one():
    other = {"eager_step_s": 9.0, "compiled_step_s": 8.0, "compile_s": [40.0, 4.0]}
    work = C.job(WAN_T2V_1_3B, REQ.tokens, guidance=True, cfg_batch=True, dtype="bfloat16")[1]
    costs = C.costs_for({"some other job": other}, key_of(), work)
    assert costs.compile_s == 40.0 and "another job" in costs.source
    assert costs.saving_per_step_s == pytest.approx(
        C.H100_SAVING_S
    )  # this job's work is the H100 reference's


@pytest.mark.parametrize(
    "device, overrides",
    [
        (replace(H200, compilable=False), {}),  # no Triton, or an emulated card
        (H200, {"dit_blocks_resident": 4}),  # streamed blocks are never compiled
        (H200, {"storage_dtype": "float8_e4m3fn"}),
        (H200, {"dit_sharding": "fsdp", "cfg_parallel": 2}),  # FSDP hooks, like the streamer, untraced
    ],
)
def test_only_a_resident_dit_on_a_compilable_card_compiles(device, overrides):
    assert not planned(device=device, steps=10_000, **overrides).plan.compile_dit


def test_what_the_user_set_wins_both_ways():
    assert planned(steps=2, compile_dit=True).plan.compile_dit
    assert not planned(request=Request(WAN_T2V_14B), steps=500, compile_dit=False).plan.compile_dit


def test_the_fast_tier_always_compiles_its_resident_blocks():
    assert planned(steps=2, fp8_gemm=True).plan.compile_dit
    eager = planned(steps=2, fp8_gemm=True, compile_dit=False)
    assert not eager.plan.compile_dit
    assert any("fused only in compiled blocks" in n for n in eager.notes)
    assert not any("fused only" in n for n in planned(steps=2, fp8_gemm=True).notes)


def test_a_run_records_eager_then_compiled_and_the_planner_reads_it_back():
    hw = probe(emulate="h100")
    key = key_of()
    assert C.load_measured(hw) == {}
    assert not C.record_run(hw, key, compiled=False, step_s=[2.0, 1.0])  # too few steps to tell
    assert C.record_run(hw, key, compiled=False, step_s=[1.9, 1.2, 1.2, 1.3])
    assert C.record_run(hw, key, compiled=True, step_s=[20.7, 1.0, 1.0, 1.1])
    assert C.record_run(hw, key, compiled=True, step_s=[4.7, 1.0, 1.0, 1.0])
    entry = C.load_measured(hw)[key]
    assert entry["eager_step_s"] == 1.2 and entry["eager_first_extra_s"] == pytest.approx(0.7)
    assert entry["compiled_step_s"] == 1.0
    # The compile is the first step's extra time less what an eager first step costs anyway.
    assert entry["compile_s"] == pytest.approx([19.0, 3.0])
    costs = C.costs_for(C.load_measured(hw), key, 1)
    assert (costs.compile_s, costs.saving_per_step_s) == (pytest.approx(3.0), pytest.approx(0.2))
    saved = json.loads(C.costs_path().read_text())
    assert list(saved["devices"]) == [C.device_key(hw)]  # per card and torch build
    assert C.load_measured(probe(emulate="a100")) == {}


def test_an_unreadable_cost_file_is_ignored_with_a_warning():
    C.costs_path().parent.mkdir(parents=True, exist_ok=True)
    C.costs_path().write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable compile cost cache"):
        assert C.load_measured(probe(emulate="h100")) == {}


def test_the_job_key_tells_apart_what_changes_a_steps_cost():
    keys = {
        key_of(),
        key_of(cfg_batch=False),
        key_of(fp8=True),
        key_of(request=REQ.resized(480, 320, 33)),
        key_of(request=replace(REQ, guidance=False)),
    }
    assert len(keys) == 5
    _, batched = C.job(WAN_T2V_1_3B, 100, guidance=True, cfg_batch=True, dtype="bfloat16")
    _, sequential = C.job(WAN_T2V_1_3B, 100, guidance=True, cfg_batch=False, dtype="bfloat16")
    _, single = C.job(WAN_T2V_1_3B, 100, guidance=False, cfg_batch=True, dtype="bfloat16")
    assert batched == sequential == 2 * single


def test_the_step_clock_times_each_step_and_passes_the_state_on():
    seen = []
    clock = C.StepClock("cpu")
    clock.start()
    tick = clock.wrap(seen.append)
    for step in range(3):
        torch.ones(10).sum()
        tick(step)
    assert seen == [0, 1, 2] and len(clock.step_s) == 3 and all(s >= 0 for s in clock.step_s)


def test_a_cpu_run_keeps_step_times_but_records_no_compile_costs():
    from wanfit.demo import tiny_pipeline

    pipe = tiny_pipeline()
    pipe("a fox", height=32, width=48, num_frames=5, num_inference_steps=3, progress=False)
    assert pipe.timings["denoise_step_s"] > 0 and pipe.timings["denoise_first_step_extra_s"] >= 0
    assert not C.costs_path().exists()
