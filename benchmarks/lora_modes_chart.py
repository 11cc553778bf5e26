"""Draw bench_lora's --mode-rounds results: what a LoRA applied without merging costs per DiT forward,
the per-call merge beside the runtime branch, against the 3% goal.

    python3 benchmarks/lora_modes_chart.py docs/images/lora_modes_h100.png \
        benchmarks/results/2026-12-06-h100/modes-{1.3B,fa4-1.3B,14B,fa4-14B,14B-whole}.json

One row per model, attention kernel and placement of each JSON (in the order given); each bar is the
median over the rounds of the ratio to the same round's forward without a LoRA.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

PLACEMENTS = (("bf16", "eager"), ("bf16_compiled", "compiled"), ("fp8_storage", "fp8-stored"))
MODES = (("merge_per_call", "per-call merge", (40, 90, 170)), ("runtime", "runtime branch", (200, 120, 40)))
GOAL_PCT = 3.0


def rows(runs: list[dict]) -> list[tuple[str, dict[str, float]]]:
    """(label, {mode: cost %}) for every model and placement the runs timed."""
    out = []
    for run in runs:
        for name, timed in run["modes"].items():
            layers = timed["config"]["num_layers"]
            served = timed.get("attention", {}).get("served", {})
            kernel = max(served, key=served.get) if served else "?"
            for key, label in PLACEMENTS:
                if key in timed:
                    costs = {mode: timed[key][mode]["cost_pct"] for mode, _, _ in MODES}
                    out.append((f"{name} ({layers} blocks), {kernel}, {label}", costs))
    return out


def draw_chart(runs: list[dict], out_png: Path, width: int = 860) -> Path:
    """Two bars a row (per-call merge, branch), a dashed line at the goal."""
    bars = rows(runs)
    left, right, bar_h, row_h = 300, width - 90, 8, 24
    top = 50
    height = top + row_h * len(bars) + 40
    longest = max(max(costs.values()) for _, costs in bars)
    scale = (right - left) / max(longest, GOAL_PCT)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    card = runs[0].get("device", "GPU")
    draw.text((10, 10), f"A rank-64 LoRA on every block Linear, cost per DiT forward, 832x480x81 ({card})", fill="black")
    x = 10
    for _, label, colour in MODES:
        draw.rectangle([x, 30, x + 12, 38], fill=colour)
        draw.text((x + 16, 28), label, fill="black")
        x += 140
    draw.text((x, 28), f"dashed: the {GOAL_PCT:g}% goal", fill=(90, 90, 90))
    y = top
    for label, costs in bars:
        draw.text((10, y + 5), label, fill="black")
        for i, (mode, _, colour) in enumerate(MODES):
            y0 = y + 2 + i * (bar_h + 2)
            end = left + scale * max(costs[mode], 0.0)
            draw.rectangle([left, y0, max(end, left + 1), y0 + bar_h], fill=colour)
            draw.text((end + 6, y0 - 2), f"{costs[mode]:+.2f}%", fill="black")
        y += row_h
    goal = left + scale * GOAL_PCT
    for y0 in range(top, y, 6):
        draw.line([goal, y0, goal, y0 + 3], fill=(120, 120, 120))
    draw.text((10, y + 10), "Medians of alternating rounds against the same rounds' forward without a LoRA. "
              "docs/benchmarks.md", fill=(90, 90, 90))  # fmt: skip
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_png, optimize=True)
    return out_png


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("runs", type=Path, nargs="+", help="bench_lora JSON files with --mode-rounds results")
    args = p.parse_args(argv)
    out = draw_chart([json.loads(f.read_text()) for f in args.runs], args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
