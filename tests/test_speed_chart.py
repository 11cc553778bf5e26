"""benchmarks/speed_chart.py: the bars it draws are the bench_speed JSON's medians, with the ratios
to the panel's diffusers reference, and the picture is written."""

import json
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import speed_chart

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "2026-12-02f-h200"


def test_the_bars_are_the_runs_medians_against_diffusers():
    speed = json.loads((RESULTS / "speed.json").read_text())
    bars = {label: (value, ratio) for label, value, ratio in speed_chart.forward_bars(speed)}
    ref = speed["forward"]["b1"]["diffusers_compiled"]["median_ms"]
    assert bars["diffusers compiled"] == (ref, 1.0)
    assert bars["wanfit compiled"][0] == speed["forward"]["b1"]["wanfit_compiled"]["median_ms"]
    assert bars["wanfit compiled"][1] == pytest.approx(0.886, abs=1e-3)  # the figure docs/benchmarks.md quotes
    jobs = json.loads((RESULTS / "speed_jobs.json").read_text())
    job = {label: (value, ratio) for label, value, ratio in speed_chart.job_bars(jobs)}
    assert job["wanfit (as planned)"][0] == jobs["jobs"]["50"]["wanfit_planned"]["total_s"]
    assert job["wanfit (as planned)"][1] == pytest.approx(0.786, abs=1e-3)


def test_the_chart_is_written_with_a_row_per_bar(tmp_path):
    out = speed_chart.main(
        [str(RESULTS / "speed.json"), str(RESULTS / "speed_jobs.json"), str(tmp_path / "c.png"), "--jobs-note", "x"]
    )
    image = Image.open(out)
    assert image.width == 760 and image.height == 20 + 30 + 22 * 5 + 30 + 22 * 2 + 40 + 14
    # The longest bar (diffusers eager's forward) reaches the bar area's right end in diffusers' grey.
    assert image.getpixel((760 - 151, 10 + 20 + 4)) == speed_chart.DIFFUSERS
