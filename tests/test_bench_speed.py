"""The speed benchmark end to end on the CPU (--dry-run: tiny models, every stage and variant)."""

import json

from benchmarks.bench_speed import LONG_PRIORITY, VARIANTS, main


def test_dry_run_measures_every_variant_and_states_the_fast_tiers_error(tmp_path, capsys):
    out = tmp_path / "speed.json"
    result = main(["--dry-run", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["errors"] == {} and saved["skipped"] == []
    assert set(saved["forward"]["b1"]) == set(VARIANTS)
    assert set(saved["forward"]["b2"]) == {"diffusers_eager", "wanfit_eager", "wanfit_compiled"}
    assert set(saved["jobs"]["2"]) == set(VARIANTS) and set(saved["jobs"]["3"]) == set(LONG_PRIORITY)
    fast = saved["forward"]["b1"]["wanfit_fast"]
    assert fast["tier"] == "fast" and fast["compiled"] and fast["given_up"] == {}
    assert saved["jobs"]["2"]["wanfit_fast"]["tier"] == "fast"
    assert saved["jobs"]["2"]["wanfit_eager"]["tier"] == "exact"
    errors = saved["errors_vs_exact"]
    assert 1e-4 < errors["forward_b1_rel_l2_wanfit_fast_vs_wanfit_eager"] < 5e-2
    assert errors["forward_b1_rel_l2_wanfit_compiled_vs_wanfit_eager"] < 1e-5  # fp32, same math
    assert errors["forward_b1_rel_l2_diffusers_eager_vs_wanfit_eager"] < 1e-4  # the same weights
    assert 0 < errors["job2_mean_abs_uint8_wanfit_fast_vs_exact"] < 8
    assert errors["job2_mean_abs_uint8_wanfit_compiled_vs_exact"] < 0.5
    assert result["ratios"]["forward_b1_diffusers_compiled_over_diffusers_compiled"] == 1.0
    assert set(saved["jobs_extrapolated"]) == set(VARIANTS) and all(
        v > 0 for v in saved["jobs_extrapolated"].values()
    )
    compile_ = saved["compile"]
    assert compile_["cold_s"] >= 0 and compile_["warm_s"] >= 0
    assert "steps x" in compile_["planner_3_steps_second_run"]["why"]
    text = capsys.readouterr().out
    assert "| wanfit_fast | fast, compiled, " in text and "x diffusers eager" in text


def test_forwards_only_times_the_fast_tier_with_each_asked_for_self_attention(tmp_path, capsys):
    out = tmp_path / "speed.json"
    result = main(["--dry-run", "--forwards-only", "--fast-attention", "sdpa_math", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["errors"] == {} and saved["jobs"] == {}
    b1 = saved["forward"]["b1"]
    assert set(b1) == {"diffusers_eager", "diffusers_compiled", "wanfit_eager", "wanfit_fast", "wanfit_fast@sdpa_math"}
    assert b1["wanfit_fast@sdpa_math"]["self_attention"] == "sdpa_math"  # the user's field, obeyed
    assert b1["wanfit_fast@sdpa_math"]["tier"] == "fast"
    errors = saved["errors_vs_exact"]
    assert 1e-4 < errors["forward_b1_rel_l2_wanfit_fast@sdpa_math_vs_wanfit_eager"] < 5e-2
    assert result["ratios"]["forward_b1_wanfit_fast@sdpa_math_over_diffusers_compiled"] > 0
    assert "| wanfit_fast@sdpa_math | fast, compiled, sdpa_math |" in capsys.readouterr().out


def test_a_stage_that_would_end_past_the_budget_is_skipped_and_said(monkeypatch):
    import torch

    from benchmarks.bench_speed import Run, extrapolated, parse_args

    run = Run(parse_args(["--budget-s", "100"]), torch.device("cpu"))
    monkeypatch.setattr(run, "elapsed", lambda: 60.0)
    assert run.fits("a 30 s stage", 30.0)
    assert not run.fits("a 30 s stage with 20 s kept for later", 30.0, reserve_s=20.0)
    assert not run.fits("a 50 s stage", 50.0)
    assert [s["what"] for s in run.result["skipped"]] == [
        "a 30 s stage with 20 s kept for later",
        "a 50 s stage",
    ]
    assert "predicted 50 s at 60 s of 100" in run.result["skipped"][1]["why"]
    jobs = {"a": {"total_s": 20.0, "median_step_s": 1.5}, "b": {"total_s": 9.0, "median_step_s": None}}
    assert extrapolated(jobs, 10, 50) == {"a": 80.0}
