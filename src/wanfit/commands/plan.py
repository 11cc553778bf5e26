"""`wanfit plan`: what a run would do on this machine (or under --vram), and each phase's predicted peak."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wanfit.commands.common import add_hardware_options
from wanfit.errors import ConfigError, PlanError


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
    p.add_argument("--vram", default=None, metavar="SIZE", help="memory budget, e.g. 4GiB, 6000MiB, 12GB")
    p.add_argument(
        "--allow-downscale", action="store_true", help="fewer frames or a smaller size if nothing fits"
    )
    p.add_argument(
        "--fp8", action="store_true", help="store DiT weights in fp8 (half the bytes, upcast per block)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="force a plan setting, e.g. cfg_batch=false, vae_tile=32x32, dit_blocks_resident=4",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_hardware_options(p)
    p.set_defaults(func=run)


def budget_from_args(args: argparse.Namespace):
    """This machine (or the --emulate card) as the planner sees it."""
    from wanfit.commands.common import device_budget, hardware_from_args

    return device_budget(hardware_from_args(args))


def config_from_folder(folder: Path):
    """(DiTConfig, name) from a model folder's config.json (official names or diffusers' transformer/)."""
    from wanfit.models.configs import DiTConfig

    official, diffusers = folder / "config.json", folder / "transformer" / "config.json"
    if diffusers.is_file():
        d = _read_json(diffusers)
        heads = d.get("num_attention_heads", 12)
        values = {
            "dim": heads * d.get("attention_head_dim", 128),
            "num_heads": heads,
            "ffn_dim": d.get("ffn_dim"),
            "num_layers": d.get("num_layers"),
            "in_dim": d.get("in_channels"),
            "out_dim": d.get("out_channels"),
            "text_dim": d.get("text_dim"),
            "freq_dim": d.get("freq_dim"),
            "patch_size": tuple(d["patch_size"]) if "patch_size" in d else None,
        }
    elif official.is_file():
        d = _read_json(official)
        values = {
            k: d.get(k)
            for k in (
                "dim",
                "ffn_dim",
                "freq_dim",
                "num_heads",
                "num_layers",
                "in_dim",
                "out_dim",
                "text_len",
            )
        }
    elif not folder.is_dir():
        raise ConfigError(f"Model folder not found: {folder}.")
    else:
        return None, None
    config = DiTConfig.from_dict({k: v for k, v in values.items() if v is not None})
    name = {1536: "1.3B", 5120: "14B"}.get(config.dim, f"dim {config.dim}")
    return config, name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"Could not read {path}: {err}.") from err


def request_from_args(args: argparse.Namespace):
    from wanfit.commands.generate import parse_size
    from wanfit.models.configs import DIT_PRESETS
    from wanfit.pipeline import validate_request
    from wanfit.plan.estimates import Request

    width, height = parse_size(args.size)
    validate_request(height, width, args.frames, 1, args.guidance)
    config, name = (None, None) if args.model is None else config_from_folder(args.model)
    if config is None:
        config, name = DIT_PRESETS[args.model_size], args.model_size
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
