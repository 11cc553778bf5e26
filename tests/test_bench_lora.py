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
