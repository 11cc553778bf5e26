"""`wanfit plan`: what a run would do on this machine (or under --vram), and each phase's predicted peak."""

from __future__ import annotations

import argparse
import json
import sys

from wanfit.commands import common
from wanfit.commands.lora_options import add_lora_files_option, add_preset_option, plan_preset
from wanfit.commands.parallel import add_parallel_options, parallel_constraints
from wanfit.errors import ConfigError, PlanError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="show the memory plan for a run",
        description="Choose the fastest plan that fits this machine (or --vram) and print each phase's "
        "predicted peak memory and the settings. Nothing is loaded; no weights are needed.",
    )
    common.add_model_options(
        p, "model folder (official, diffusers or ComfyUI): its files decide the model size"
    )
    p.add_argument(
        "--model-size", choices=("1.3B", "14B"), default=None, help="without --model (default 1.3B)"
    )
    p.add_argument("--size", default="832x480", help="WIDTHxHEIGHT, multiples of 16 (default 832x480)")
    p.add_argument("--frames", type=int, default=81, help="4k+1 frames (default 81)")
    p.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance (1 = off; default 6)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="denoising steps: whether compiling pays (default 50)"
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: the best one found)")
    add_preset_option(p)
    add_lora_files_option(p)  # read and checked against the model, to plan how they are applied
    common.add_plan_options(p)
    add_parallel_options(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--list-settings", action="store_true", help="list every plan setting --set takes, and exit"
    )
    common.add_hardware_options(p)
    p.set_defaults(func=run)


def request_from_args(args: argparse.Namespace, preset=None):
    from dataclasses import replace

    from wanfit.commands.lora_options import lora_requests, read_loras
    from wanfit.pipeline import validate_request
    from wanfit.plan.lora import LoraShapes
    from wanfit.plan.planning import model_request

    if common.has_model(args) and args.model_size is not None:
        raise ConfigError(
            f"--model-size {args.model_size} and --model were both given; the folder's files decide the "
            "model size, so drop --model-size."
        )
    width, height = common.parse_size(args.size)
    steps = getattr(args, "steps", None)
    validate_request(height, width, args.frames, 1 if steps is None else steps, args.guidance)
    if common.has_model(args):
        model, parts = args.model, common.model_components(args)
    else:
        model, parts = args.model_size or "1.3B", {}
    guidance = args.guidance != 1.0
    request = model_request(
        model, width=width, height=height, frames=args.frames, guidance=guidance, steps=steps, **parts
    )
    loras = read_loras(lora_requests(args, preset), request.config, args.lora_skip_unknown)
    return replace(request, loras=LoraShapes.of(loras), lora_unloadable=False)  # as `generate` plans it


def run(args: argparse.Namespace) -> int:
    from wanfit.plan.parallel import with_parallel_notes
    from wanfit.plan.plan import settings_help
    from wanfit.plan.planning import plan_for

    if args.list_settings:
        print(settings_help())
        return 0
    preset = plan_preset(args)
    if preset is not None and args.steps is None:
        args.steps = preset.steps
    request = request_from_args(args, preset)
    constraints = parallel_constraints(args, request, common.constraints_from_args(args))
    hardware = common.hardware_from_args(args)
    try:
        result = with_parallel_notes(plan_for(request, constraints, hardware), args.gpus)
    except PlanError as err:
        if args.json:
            out = {"feasible": False, "error": str(err), "device": hardware.to_dict()}
            for key in ("min_budget_bytes", "host_bytes_needed"):
                if hasattr(err, key):
                    out[key] = getattr(err, key)
            print(json.dumps(out, indent=2, default=str))
        raise
    if result.requested is not None:
        print(f"wanfit: warning: {result.notes[0]}", file=sys.stderr)
    if args.json:
        print(json.dumps({**result.to_dict(), **({"preset": preset.to_dict()} if preset else {})}, indent=2))
    else:
        print(result.summary())
        if preset:
            p = preset
            print(f"preset {p.name}: sampler {p.sampler}, {p.steps} steps, shift {p.shift:g}, guidance "
                  f"{p.guidance:g} (one DiT pass per step), LoRA strength {p.lora_strength:g}; from {p.source}")  # fmt: skip
    return 0
