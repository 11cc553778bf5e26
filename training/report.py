"""Pictures and numbers of a training run: the validation sample grid, the loss curves, a frame strip,
and the accuracy and step-cache tables of docs/builtin_model.md.

python -m training.report curves runs/builtin/log.jsonl docs/images/builtin_loss.png
python -m training.report strip VIDEO.mp4 docs/images/builtin_strip.png
python -m training.report sheet docs/images/builtin_prompts.png "a red circle ..." "..."
python -m training.report table      # accuracy of the default path and other settings
python -m training.report caches     # the step caches against the exact path
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image, ImageDraw


def sample_grid(run_dir: str | Path, device: str = "cpu") -> dict | None:
    """Export the run, generate and score the attribute grid; write eval.json and val_grid.png."""
    from training.export import export

    run_dir = Path(run_dir)
    try:
        from wanfit.quality import evaluate
    except ImportError as err:  # e.g. no diffusers on a training machine
        print(f"no sample grid: {err}")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        model = export(run_dir / "checkpoint", Path(tmp) / "model")
        report = evaluate(device=device, model_dir=model, psnr=False)
    summary = report.summary()
    (run_dir / "eval.json").write_text(
        json.dumps({**summary, "detections": [vars(d) for d in report.detections]}, indent=1)
    )
    from wanfit.quality import GRID, GRID_SAMPLE

    rows = [np.concatenate(list(report.frames[GRID.index(s)][::2]), axis=1) for s in GRID_SAMPLE]
    Image.fromarray(np.concatenate(rows, axis=0)).save(run_dir / "val_grid.png")
    print(json.dumps(summary))
    return summary


def accuracy_table(model_dir=None) -> str:
    """Markdown: accuracy and PSNR on the attribute grid, default path first, then other settings."""
    from wanfit.builtin import SAMPLING
    from wanfit.quality import Setting, broken_samplers, evaluate

    default = evaluate(model_dir=model_dir)
    settings = [Setting(f"{n} steps", call={"num_inference_steps": n}) for n in (20, 6)] + [
        Setting("no guidance (scale 1)", call={"guidance_scale": 1.0}),
        Setting("cond and uncond unbatched", plan={"cfg_batch": False}),
        *broken_samplers(SAMPLING.shift).values(),
    ]
    lines = [
        "| setting | colour | shape | direction | all three | PSNR vs default (dB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for report in [default, *(evaluate(s, reference=default, model_dir=model_dir) for s in settings)]:
        row = report.summary()
        psnr = "exact" if row["psnr_db"] == math.inf else f"{row['psnr_db']:.1f}"
        name = (
            f"default ({SAMPLING.num_inference_steps} steps, guidance {SAMPLING.guidance_scale:g}, "
            f"shift {SAMPLING.shift:g})"
            if report is default
            else row["setting"]
        )
        lines.append(f"| {name} | {row['colour']:.0%} | {row['shape']:.0%} | {row['direction']:.0%} | "
                     f"{row['all']:.0%} | {psnr} |")  # fmt: skip
    return "\n".join(lines)


# The step caches of docs/builtin_model.md, per step count: each at its default threshold and others.
# TeaCache has no fit for this DiT (it refuses without coefficients=): the raw change (none) and the
# published 1.3B fit. EasyCache computes its first ret= steps (default 10): at 10 steps it needs fewer.
CACHE_SETTINGS: dict[int, tuple[str, ...]] = {
    10: (
        "teacache:0.04,coefficients=none", "teacache,coefficients=none", "teacache,coefficients=1.3B",
        "magcache:0.06", "magcache", "magcache:0.24",
        "easycache,ret=3", "easycache:0.1,ret=3", "easycache:0.2,ret=3",
        "firstblock", "firstblock:0.1", "firstblock:0.2",
    ),
    20: (
        "teacache:0.04,coefficients=none", "teacache,coefficients=none", "teacache,coefficients=1.3B",
        "magcache:0.06", "magcache", "magcache:0.24",
        "easycache", "easycache:0.1", "easycache:0.2",
        "firstblock", "firstblock:0.1", "firstblock:0.2",
    ),
}  # fmt: skip


def cache_table(model_dir=None, settings: dict[int, tuple[str, ...]] = CACHE_SETTINGS) -> str:
    """Markdown: each step cache on the attribute grid against the exact (uncached) path at the same
    step count: accuracy, PSNR and the DiT evaluations skipped. MagCache's ratios are calibrated for
    each step count first, in a temporary cache folder (the user's is left alone)."""
    from wanfit.attention.ranking import CACHE_ENV
    from wanfit.quality import Setting, calibrate_magcache, evaluate

    lines = [
        "| steps | cache | colour | shape | direction | all three | PSNR vs exact (dB) | DiT evaluations skipped |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {CACHE_ENV: tmp}):
        for steps, specs in settings.items():
            calibrate_magcache(steps, model_dir=model_dir)
            call = {"num_inference_steps": steps}
            exact = evaluate(Setting(f"{steps} steps", call=call), psnr=False, model_dir=model_dir)
            runs = [evaluate(Setting(spec, plan={"cache": spec}, call=call), reference=exact, model_dir=model_dir)
                    for spec in specs]  # fmt: skip
            evaluations = len(exact.scenes) * steps * 2  # cond and uncond
            for report in [exact, *runs]:
                row = report.summary()
                skipped = row["skipped"] or [0, evaluations]
                name = "none (exact)" if report is exact else f"`{row['setting']}`"
                psnr = (
                    "(reference)" if report is exact
                    else "identical" if row["psnr_db"] == math.inf
                    else f"{row['psnr_db']:.1f}"
                )  # fmt: skip
                lines.append(
                    f"| {steps} | {name} | {row['colour']:.0%} | {row['shape']:.0%} | {row['direction']:.0%} | "
                    f"{row['all']:.0%} | {psnr} | {skipped[0]} of {skipped[1]} ({skipped[0] / skipped[1]:.0%}) |"
                )
    return "\n".join(lines)


def loss_curves(log_path: str | Path, out_png: str | Path, size=(720, 260)) -> Path:
    """A two-panel PNG: the VAE's reconstruction loss and the DiT's flow-matching loss (log scale)."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    panels = []
    for phase, key, title in (
        ("vae", "loss", "VAE: L1 + L2 + KL"),
        ("dit", "loss", "DiT + text: flow matching"),
    ):
        points = [
            (r["step"], r[key]) for r in records if r["phase"] == phase and key in r and "event" not in r
        ]
        panels.append((title, points))
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    panel_w = width // len(panels)
    for i, (title, points) in enumerate(panels):
        left, top, right, bottom = i * panel_w + 50, 24, (i + 1) * panel_w - 12, height - 28
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 6), title, fill="black")
        if len(points) < 2:
            continue
        steps = [p[0] for p in points]
        logs = [math.log10(max(p[1], 1e-8)) for p in points]
        lo, hi = math.floor(min(logs) * 2) / 2, math.ceil(max(logs) * 2) / 2 or 0.5
        hi = hi if hi > lo else lo + 0.5

        def xy(step, value, lo=lo, hi=hi, first=steps[0], last=steps[-1], box=(left, top, right, bottom)):
            x = box[0] + (step - first) / max(last - first, 1) * (box[2] - box[0])
            return x, box[3] - (value - lo) / (hi - lo) * (box[3] - box[1])

        tick = lo
        while tick <= hi + 1e-9:
            _, y = xy(steps[0], tick)
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((4 + i * panel_w, y - 6), f"{10**tick:.3g}", fill="black")
            tick += 0.5
        draw.text((left, bottom + 6), f"step {steps[0]}", fill="black")
        draw.text((right - 70, bottom + 6), f"step {steps[-1]}", fill="black")
        draw.line([xy(s, v) for s, v in zip(steps, logs)], fill=(160, 160, 220), width=1)
        smooth = np.convolve(logs, np.ones(9) / 9, mode="valid") if len(logs) > 9 else logs
        offset = (len(steps) - len(smooth)) // 2
        draw.line([xy(s, v) for s, v in zip(steps[offset:], smooth)], fill=(20, 20, 160), width=2)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_png, optimize=True)
    return out_png


def strip_image(frames: np.ndarray, count: int = 5, zoom: int = 3) -> np.ndarray:
    """Evenly spaced frames of a video [F, H, W, 3] side by side, each pixel zoom x zoom, 2-pixel white gaps."""
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    big = frames[picks].repeat(zoom, axis=1).repeat(zoom, axis=2)
    gap = np.full((big.shape[1], 2, 3), 255, dtype=np.uint8)
    tiles = []
    for tile in big:
        tiles += [tile, gap]
    return np.concatenate(tiles[:-1], axis=1)


def frame_strip(frames: np.ndarray, out_png: str | Path, count: int = 5, zoom: int = 3) -> Path:
    """strip_image of a video, saved as a PNG."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip_image(frames, count, zoom)).save(out_png, optimize=True)
    return out_png


def prompt_sheet(prompts: list[str], out_png: str | Path, seed: int = 0, zoom: int = 2) -> Path:
    """One strip per prompt (the built-in model's default video), each under its prompt."""
    from wanfit.builtin import VIDEO_FRAMES, VIDEO_SIZE, builtin_pipeline
    from wanfit.plan.planning import Constraints

    # The text encoder kept between prompts (the default plan frees it after one).
    pipe = builtin_pipeline(
        progress=False, constraints=Constraints.from_options(settings=["free_text_encoder=false"])
    )
    width, height = VIDEO_SIZE
    rows = []
    for text in prompts:
        frames = pipe(text, height=height, width=width, num_frames=VIDEO_FRAMES, seed=seed, progress=False)
        strip = strip_image(frames, zoom=zoom)
        label = Image.new("RGB", (strip.shape[1], 16), "white")
        ImageDraw.Draw(label).text((2, 2), text, fill="black")
        rows += [np.asarray(label), strip, np.full((4, strip.shape[1], 3), 255, dtype=np.uint8)]
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows[:-1], axis=0)).save(out_png, optimize=True)
    return out_png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    curves = sub.add_parser("curves")
    curves.add_argument("log", type=Path)
    curves.add_argument("out", type=Path)
    strip = sub.add_parser("strip")
    strip.add_argument("video", type=Path)
    strip.add_argument("out", type=Path)
    sheet = sub.add_parser("sheet", help="strips of several prompts (the built-in model)")
    sheet.add_argument("out", type=Path)
    sheet.add_argument("prompts", nargs="+")
    grid = sub.add_parser("grid")
    grid.add_argument("run", type=Path)
    table = sub.add_parser("table")
    table.add_argument("--model", type=Path, default=None, help="another folder of the model")
    caches = sub.add_parser("caches", help="the step caches' table (docs/builtin_model.md)")
    caches.add_argument("--model", type=Path, default=None, help="another folder of the model")
    args = p.parse_args()
    if args.what == "curves":
        print(loss_curves(args.log, args.out))
    elif args.what == "strip":
        from wanfit.video import read_video

        print(frame_strip(read_video(args.video), args.out))
    elif args.what == "sheet":
        print(prompt_sheet(args.prompts, args.out))
    elif args.what == "table":
        print(accuracy_table(args.model))
    elif args.what == "caches":
        print(cache_table(args.model))
    else:
        sample_grid(args.run)


if __name__ == "__main__":
    main()
