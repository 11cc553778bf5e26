"""benchmarks/lora_modes_chart.py: each row's bars are the bench_lora JSON's costs, labelled by the
model, the kernel that served the forwards and the placement, and the picture is written."""

import json
from pathlib import Path

from PIL import Image

from benchmarks import lora_modes_chart


def timed(per_call: float, branch: float) -> dict:
    return {"none": {"median_ms": 500.0}, "merge_per_call": {"cost_pct": per_call}, "runtime": {"cost_pct": branch}}


def run(name: str, layers: int, kernel: str, **placements) -> dict:
    modes = {"config": {"num_layers": layers}, "attention": {"served": {kernel: 90, "sdpa_math": 1}}, **placements}
    return {"device": "a card", "modes": {name: modes}}


def test_the_rows_are_the_runs_costs_in_order(tmp_path: Path):
    runs = [
        run("1.3B", 30, "flash_attn4", bf16=timed(1.7, 9.95), fp8_storage=timed(1.19, 9.05)),
        run("14B", 40, "sdpa_cudnn", bf16_compiled=timed(1.4, 3.9)),
    ]
    rows = lora_modes_chart.rows(runs)
    assert rows == [
        ("1.3B (30 blocks), flash_attn4, eager", {"merge_per_call": 1.7, "runtime": 9.95}),
        ("1.3B (30 blocks), flash_attn4, fp8-stored", {"merge_per_call": 1.19, "runtime": 9.05}),
        ("14B (40 blocks), sdpa_cudnn, compiled", {"merge_per_call": 1.4, "runtime": 3.9}),
    ]
    out = lora_modes_chart.main([str(tmp_path / "chart.png"), *(str(p) for p in _write(tmp_path, runs))])
    with Image.open(out) as image:
        assert image.width == 860 and image.height == 50 + 24 * 3 + 40  # a row per placement


def _write(tmp_path: Path, runs: list[dict]) -> list[Path]:
    paths = []
    for i, r in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(r))
    return paths
