"""`wanfit plan`: what a run would do on this machine (or under --vram), and each phase's predicted peak."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wanfit.commands.common import add_hardware_options
from wanfit.errors import PlanError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="show the memory plan for a run",
        description="Choose the fastest plan that fits this machine (or --vram) and print each phase's "
        "predicted peak memory and the settings. Nothing is loaded; no weights are needed.",
    )
    p.add_argument("--model", type=Path, help="model folder: its config.json decides the model size")
    p.add_argument(
        "--model-size", choices=("1.3B", "14B"), default="1.3B", help="without --model (default 1.3B)"
    )
    p.add_argument("--size", default="832x480", help="WIDTHxHEIGHT, multiples of 16 (default 832x480)")
    p.add_argument("--frames", type=int, default=81, help="4k+1 frames (default 81)")
    p.add_argument(
        "--guidance", type=float, default=6.0, help="classifier-free guidance (1 = off; default 6)"
    )
    add_plan_options(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_hardware_options(p)
    p.set_defaults(func=run)


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    """--vram, --allow-downscale, --fp8, --set: shared by plan and generate."""
    group = parser.add_argument_group("memory plan")
    group.add_argument("--vram", default=None, metavar="SIZE", help="memory budget, e.g. 4GiB, 6000MiB, 12GB")
    group.add_argument(
        "--allow-downscale", action="store_true", help="fewer frames or a smaller size if nothing fits"
    )
    group.add_argument(
        "--fp8", action="store_true", help="store DiT weights in fp8 (half the bytes, upcast per block)"
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="force a plan setting, e.g. cfg_batch=false, vae_tile=32x32, dit_blocks_resident=4",
    )


def budget_from_args(args: argparse.Namespace):
    """This machine (or the --emulate card) as the planner sees it."""
    from wanfit.commands.common import device_budget, hardware_from_args

    return device_budget(hardware_from_args(args))


def config_from_folder(folder: Path):
    """(DiTConfig, name) of a model folder: its DiT config.json, else the DiT's tensor headers (no weights)."""
    from wanfit.models.configs import DiTConfig
    from wanfit.weights.dit_loader import inspect_dit, read_config_json, resolve_config
    from wanfit.weights.model_dir import find_model_files

    folder = Path(folder)
    if not folder.is_dir():
        find_model_files(folder)  # says what is wrong: missing, or a file rather than a folder
    values = read_config_json(folder / "transformer") or read_config_json(folder)
    if values is not None:
        config = DiTConfig.from_dict(values)
    else:
        config = resolve_config(inspect_dit(find_model_files(folder).dit), None)
    name = {1536: "1.3B", 5120: "14B"}.get(config.dim, f"dim {config.dim}")
    return config, name


def request_from_args(args: argparse.Namespace):
    from wanfit.commands.generate import parse_size
    from wanfit.models.configs import DIT_PRESETS
    from wanfit.pipeline import validate_request
    from wanfit.plan.estimates import Request

    width, height = parse_size(args.size)
    validate_request(height, width, args.frames, 1, args.guidance)
    if args.model is None:
        config, name = DIT_PRESETS[args.model_size], args.model_size
    else:
        config, name = config_from_folder(args.model)
    return Request(
        config,
        height=height,
        width=width,
        num_frames=args.frames,
        guidance=args.guidance != 1.0,
        model_name=name,
    )


def run(args: argparse.Namespace) -> int:
    from wanfit.plan.planner import parse_bytes, parse_plan_overrides, plan_run

    request = request_from_args(args)
    vram = parse_bytes(args.vram) if args.vram is not None else None
    overrides = parse_plan_overrides(args.overrides)
    device = getattr(args, "device_budget", None) or budget_from_args(args)
    try:
        result = plan_run(
            device,
            request,
            vram=vram,
            overrides=overrides,
            allow_downscale=args.allow_downscale,
            fp8=args.fp8,
        )
    except PlanError as err:
        if args.json:
            out = {"feasible": False, "error": str(err), "device": device.to_dict()}
            for key in ("min_budget_bytes", "host_bytes_needed"):
                if hasattr(err, key):
                    out[key] = getattr(err, key)
            print(json.dumps(out, indent=2))
        raise
    if result.requested is not None:
        print(f"wanfit: warning: {result.notes[0]}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.summary())
    return 0
