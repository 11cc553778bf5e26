"""The step-cache benchmark's logic on the CPU (--tiny: tiny models, 12 steps)."""

import json

from benchmarks.bench_cache import BOOKKEEPING, main


def test_tiny_run_reports_step_costs_and_the_cached_job(tmp_path, capsys):
    out = tmp_path / "bench_cache.json"
    result = main(["--tiny", "--skip-diffusers", "--out", str(out)])
    assert (
        json.loads(out.read_text()) == json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    )
    costs = result["step_cost"]
    assert set(costs) == {"none", *BOOKKEEPING} and all(c["median_s"] > 0 for c in costs.values())
    assert all("overhead_pct" in costs[name] for name in BOOKKEEPING)
    cached = result["job"]["magcache"]
    settings = cached["step_cache"]["settings"]
    assert (settings["threshold"], settings["K"], settings["retention"]) == (0.12, 4, 0.2)  # E012K4R02
    assert cached["step_cache"]["skipped"]["cond"] and cached["speedup_total"] > 0
    assert 0 < cached["frames_vs_uncached"]["ssim"] <= 1
    assert "diffusers" not in result
