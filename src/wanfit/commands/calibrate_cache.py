"""`wanfit calibrate-cache`: measure MagCache's magnitude ratios for a model and a step count.

One full generation runs (nothing skipped; the frames are not kept) and records, per step and per
stream (cond, uncond), the mean over tokens of ||r_i|| / ||r_i-1||, r being the residual the DiT's
blocks add, as MagCache's calibration does. The ratios are saved where `--cache magcache` looks
first for this model: <wanfit cache>/step_cache/<model key>/magcache-<steps>.json. Other step
counts are interpolated from the calibration with the most steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wanfit.commands.common import add_hardware_options, add_plan_options, user_path
from wanfit.commands.lora_options import add_lora_options
from wanfit.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate-cache",
        help="measure MagCache's ratios for a model (used by --cache magcache)",
        description="Run one generation in full and store the DiT residual's magnitude ratio per step, "
        "cond and uncond, for `--cache magcache` with this model. Without --model the built-in tiny "
        "model is calibrated.",
    )
    p.add_argument(
        "--model", type=user_path, help="model folder: official Wan2.1 release or diffusers layout"
    )
    p.add_argument("--prompt", default=None, help="a typical prompt (default: generate's)")
    p.add_argument("--negative-prompt", default=None, help="default: the official negative prompt")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT of the runs to serve (default 832x480)")
    p.add_argument("--frames", type=int, default=None, help="4k+1 frames (default 81)")
    p.add_argument("--steps", type=int, default=None, help="the step count to calibrate (default 50)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default 6)")
    p.add_argument("--shift", type=float, default=None, help="flow shift (default 8)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default 0)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: the best one found)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lora_options(p)  # a LoRA changes the ratios: they are stored for the model with its LoRAs
    add_hardware_options(p)
    add_plan_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanfit.commands import generate
    from wanfit.commands.lora_options import apply_loras, apply_preset, lora_requests, read_loras
    from wanfit.sampling.step_cache import calibrator
    from wanfit.sampling.step_cache.tables import save_ratios

    if args.cache is not None or any(item.strip().startswith("cache=") for item in args.overrides):
        raise ConfigError("calibrate-cache measures every step without a cache; drop --cache.")
    args.out, args.checkpoint_every = Path("calibration.mp4"), None  # nothing is written there
    preset = apply_preset(args)
    settings = generate.check_settings(args)
    loras = read_loras(lora_requests(args, preset), generate._dit_config(args), args.lora_skip_unknown)
    planned = generate.plan_job(args, settings, generate._hardware(args), loras=loras)
    pipe = generate._load_pipeline(args, planned)
    apply_loras(pipe, loras)
    request = generate.resolve_request(pipe, settings, args)
    steps = request["steps"]
    cache = calibrator(steps)
    generate.run_pipeline(pipe, request, settings, progress=not args.no_progress, step_cache=cache)
    ratios = cache.policy.measured(cache)
    about = {
        k: request[k] for k in ("model", "size", "frames", "steps", "guidance", "shift", "seed", "prompt")
    }
    about["loras"] = pipe.loras
    path = save_ratios(pipe.step_cache_key, ratios, about)
    streams = "cond and uncond" if ratios.uncond is not None else "cond (guidance off)"
    print(
        f"wrote {path}: MagCache ratios of {steps} steps, {streams}; --cache magcache uses them for this model"
    )
    print(
        json.dumps(
            {"cond": list(ratios.cond), "uncond": None if ratios.uncond is None else list(ratios.uncond)}
        )
    )
    return 0
