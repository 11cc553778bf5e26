"""Draw bench_speed's results as bars beside diffusers': one DiT forward, and the whole long job.

    python3 benchmarks/speed_chart.py benchmarks/results/2026-12-03d-h200/speed.json \
        benchmarks/results/2026-12-03d-h200/speed.json docs/images/speed_h200.png \
        --forward-note "wanfit: flash_attn4, the fused kernels, the residual stream in place (final code, 2026-12-03)" \
        --jobs-note "one process, each after a job of its own; a fresh process: 0.796-0.813x (bench_fresh)"

Each panel comes from one bench_speed JSON (one run, diffusers in the same process): the first file's
batch-1 forwards, the second file's long (50-step) jobs. Bars are medians; the label says ms or s and
the ratio to the panel's diffusers reference (compiled for the forward, eager for the job).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

FORWARD_ROWS = (  # (key in forward.b1, label)
    ("diffusers_eager", "diffusers eager"),
    ("diffusers_compiled", "diffusers compiled"),
    ("wanfit_eager", "wanfit eager"),
    ("wanfit_compiled", "wanfit compiled"),
    ("wanfit_fast", "wanfit --fast (fp8, lossy)"),
)
JOB_ROWS = (("diffusers_eager", "diffusers (default)"), ("wanfit_planned", "wanfit (as planned)"))
DIFFUSERS, WANFIT = (150, 150, 150), (40, 90, 170)


def forward_bars(speed: dict) -> list[tuple[str, float, float]]:
    """(label, median ms, x diffusers compiled) of each batch-1 forward the run measured."""
    b1 = speed["forward"]["b1"]
    ref = b1["diffusers_compiled"]["median_ms"]
    return [(label, b1[key]["median_ms"], b1[key]["median_ms"] / ref) for key, label in FORWARD_ROWS if key in b1]


def job_bars(speed: dict) -> list[tuple[str, float, float]]:
    """(label, total s, x diffusers eager) of the longest jobs the run measured."""
    jobs = speed["jobs"][str(max(int(k) for k in speed["jobs"]))]
    ref = jobs["diffusers_eager"]["total_s"]
    return [(label, jobs[key]["total_s"], jobs[key]["total_s"] / ref) for key, label in JOB_ROWS if key in jobs]


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, note: str, bars, unit: str, width: int) -> int:
    """Draw one panel from y = top; returns the y below it."""
    draw.text((10, top), title, fill="black")
    if note:
        top += 14
        draw.text((10, top), note, fill=(90, 90, 90))
    left, right, row_h = 190, width - 150, 22
    longest = max(value for _, value, _ in bars)
    y = top + 20
    for label, value, ratio in bars:
        colour = DIFFUSERS if label.startswith("diffusers") else WANFIT
        end = left + (right - left) * value / longest
        draw.text((10, y + 4), label, fill="black")
        draw.rectangle([left, y, end, y + row_h - 6], fill=colour)
        draw.text((end + 6, y + 4), f"{value:.1f} {unit}  ({ratio:.3f}x)", fill="black")
        y += row_h
    return y + 10


def draw_chart(
    forward_run: dict, job_run: dict, out_png: Path, notes: tuple[str, str] = ("", ""), width: int = 760
) -> Path:
    """The two panels; `notes`: a line under each panel's title (what that run's wanfit ran with)."""
    forward, jobs = forward_bars(forward_run), job_bars(job_run)
    steps = max(int(k) for k in job_run["jobs"])
    height = 20 + 30 + 22 * len(forward) + 30 + 22 * len(jobs) + 40 + 14 * sum(bool(n) for n in notes)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    card = forward_run.get("device", "GPU")
    y = _panel(draw, 10, f"One DiT forward, Wan2.1 1.3B, 832x480x81, batch 1 ({card}; x diffusers compiled)",
               notes[0], forward, "ms", width)  # fmt: skip
    y = _panel(draw, y, f"The whole {steps}-step job, guidance 5 (x diffusers' default pipeline)", notes[1],
               jobs, "s", width)  # fmt: skip
    draw.text((10, y), "Medians; each panel is one run with diffusers in the same process. docs/benchmarks.md",
              fill=(90, 90, 90))  # fmt: skip
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_png, optimize=True)
    return out_png


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("forward_json", type=Path, help="bench_speed JSON with the batch-1 forwards")
    p.add_argument("jobs_json", type=Path, help="bench_speed JSON with the long jobs (may be the same file)")
    p.add_argument("out", type=Path)
    p.add_argument("--forward-note", default="", help="a line under the forward panel's title")
    p.add_argument("--jobs-note", default="", help="a line under the job panel's title")
    args = p.parse_args(argv)
    forward_run, job_run = (json.loads(f.read_text()) for f in (args.forward_json, args.jobs_json))
    out = draw_chart(forward_run, job_run, args.out, (args.forward_note, args.jobs_note))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
