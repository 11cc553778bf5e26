"""The GELU-epilogue benchmark's CPU-side logic (--dry-run: tiny shapes on the CPU)."""

import json

from benchmarks.bench_gelu_epilogue import main


def test_dry_run_times_both_ways_and_keeps_the_smoke_tests_verdict(tmp_path):
    out = tmp_path / "gelu.json"
    result = main(["--dry-run", "--out", str(out)])
    saved = json.loads(out.read_text())
    row = saved["ffn"]["tiny"]
    assert row["apart_ms"] > 0 and row["epilogue_ms"] > 0 and row["lora_concat_ms"] > 0
    # The K-concatenated LoRA GEMM gives the branch's function (fp32; the CPU op's erf GELU is 5e-4 off tanh).
    assert row["lora_concat_rel_l2"] < 1e-3 and row["lora_apart_rel_l2"] < 1e-5
    # The CPU's op is the erf GELU: the smoke test says so and the forward pair runs the GELU apart.
    assert "tanh GELU" in result["smoke_test"]
    b1 = saved["forward"]["b1"]
    assert "ffn_gelu_epilogue" in b1["given_up"] and b1["rel_l2_epilogue_vs_apart"] == 0.0
    assert b1["diffusers_eager"]["median_ms"] > 0 and b1["rel_l2_apart_vs_diffusers"] < 1e-4
