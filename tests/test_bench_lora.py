"""The LoRA benchmark's CPU-side logic (--tiny: tiny models on the CPU)."""

import json

from benchmarks.bench_lora import main


def test_tiny_run_writes_json_with_every_measurement(tmp_path):
    out = tmp_path / "bench_lora.json"
    result = main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["dit"].keys() == result["dit"].keys() == {"tiny"}
    dit = saved["dit"]["tiny"]
    assert dit["rank"] == 4 and dit["lora_modules"] > 20
    assert dit["merge_s"].keys() == dit["unload_s"].keys() == {"host", "device", "none"}
    assert min(dit["merge_s"].values()) > 0 and dit["base"]["median_ms"] > 0 and dit["runtime_branch"]["median_ms"] > 0
    job = saved["job"]
    assert job["wanfit_4step_lora"]["dit_calls"] == 4  # guidance 1: one DiT pass per step
    assert job["wanfit_full"]["dit_calls"] == 3 and job["diffusers_4step_lora"]["lora_load_s"] > 0
    assert job["wanfit_speedup"] > 0 and job["diffusers_speedup"] > 0


def test_the_job_runs_named_and_no_dit_part(tmp_path):
    result = main(["--tiny", "--models", "", "--job-runs", "wanfit_4step_lora"])
    assert result["dit"] == {}
    job = result["job"]
    assert job["wanfit_4step_lora"]["dit_calls"] == 4 and "peak_gib" in job["wanfit_4step_lora"]
    assert not {"wanfit_full", "diffusers_full", "diffusers_4step_lora", "wanfit_speedup"} & job.keys()


def test_the_mode_rounds_time_each_mode_against_the_same_rounds_base(tmp_path):
    result = main(["--tiny", "--skip-job", "--skip-sequence", "--mode-rounds", "2"])
    assert result["dit"] == {}  # --skip-sequence: no merge timing
    modes = result["modes"]["tiny"]
    assert modes.keys() == {"config", "rank", "rounds", "runs", "bf16", "fp8_storage", "attention"}  # no compile
    assert sum(modes["attention"]["served"].values()) > 0  # the kernel that set the base's speed is named
    for placement in ("bf16", "fp8_storage"):
        timed = modes[placement]
        assert all(len(timed[m]["round_ms"]) == 2 for m in ("none", "merge_per_call", "runtime"))
        assert "cost_pct" in timed["runtime"] and "cost_pct" not in timed["none"]
        # The per-call merge and the branch compute the same output, which the LoRA moved.
        assert timed["per_call_vs_branch_rel_l2"] < 1e-5 < timed["branch_vs_base_rel_l2"]
