"""Options shared by the commands that touch the hardware (doctor, bench, plan, generate).

argparse only: the options become a Constraints and a probe, and wanfit.plan.planning.plan_for
does the planning.
"""

from __future__ import annotations

import argparse
import os

from wanfit.attention import ATTENTION_ENV, BACKEND_NAMES
from wanfit.errors import ConfigError
from wanfit.hardware.probe import EMULATE_ENV, HardwareProbe
from wanfit.hardware.profiles import PROFILES
from wanfit.paths import user_path  # noqa: F401  (the commands' argparse type)
from wanfit.plan.planning import Constraints, resolve_hardware


def parse_size(text: str) -> tuple[int, int]:
    """'832x480' -> (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like WIDTHxHEIGHT (e.g. 832x480), got {text!r}.") from None
    return width, height


# Model parts a user may name one by one (ComfyUI's single files), replacing a folder's own.
COMPONENTS = ("dit", "vae", "text_encoder", "tokenizer")


def add_model_options(parser: argparse.ArgumentParser, model_help: str) -> None:
    """--model and --dit / --vae / --text-encoder / --tokenizer."""
    parser.add_argument("--model", type=user_path, help=model_help)
    group = parser.add_argument_group(
        "model parts (e.g. ComfyUI's single files; each replaces the folder's own)"
    )
    group.add_argument(
        "--dit", type=user_path, metavar="FILE", help="the DiT, e.g. wan2.1_t2v_1.3B_fp16.safetensors"
    )
    group.add_argument("--vae", type=user_path, metavar="FILE", help="the VAE, e.g. wan_2.1_vae.safetensors")
    group.add_argument(
        "--text-encoder",
        type=user_path,
        metavar="FILE",
        help="umT5, e.g. umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    )
    group.add_argument(
        "--tokenizer",
        type=user_path,
        metavar="DIR",
        help="the google/umt5-xxl tokenizer folder (default: found)",
    )


def model_components(args: argparse.Namespace) -> dict:
    """The model parts named on the command line (name -> path), None for the others."""
    return {name: getattr(args, name, None) for name in COMPONENTS}


def has_model(args: argparse.Namespace) -> bool:
    """Whether a model was asked for (a folder, or parts), rather than the built-in one."""
    return getattr(args, "model", None) is not None or any(model_components(args).values())


def model_folder(args: argparse.Namespace):
    """The folder this run reads: --model (None when only parts are named), or the built-in model's."""
    if has_model(args):
        return args.model
    from wanfit.builtin import MODEL_DIR

    return MODEL_DIR


def add_hardware_options(parser: argparse.ArgumentParser) -> None:
    """--emulate, --attention, --allow-lossy-attention, --dtype."""
    group = parser.add_argument_group("hardware")
    group.add_argument(
        "--emulate",
        metavar="CARD",
        default=None,
        help=f"act as this card ({', '.join(sorted(PROFILES))}); also ${EMULATE_ENV}",
    )
    group.add_argument(
        "--attention",
        metavar="BACKEND",
        default=None,
        help=f"use this attention backend ({', '.join(BACKEND_NAMES)}); also ${ATTENTION_ENV}",
    )
    group.add_argument(
        "--allow-lossy-attention",
        action="store_true",
        help="let lossy kernels (sage, int8_triton) compete on speed with exact ones",
    )
    group.add_argument("--dtype", default=None, help="compute dtype (bf16, fp16, fp32); default: by card")


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    """--vram, --ram, --allow-downscale, --fp8, --cache, --set: shared by plan and generate."""
    group = parser.add_argument_group("memory plan")
    group.add_argument("--vram", default=None, metavar="SIZE", help="memory budget, e.g. 4GiB, 6000MiB, 12GB")
    group.add_argument(
        "--ram",
        default=None,
        metavar="SIZE",
        help="host RAM budget, e.g. 12GB (default: what is free, or what a container's limit leaves)",
    )
    group.add_argument(
        "--allow-downscale", action="store_true", help="fewer frames or a smaller size if nothing fits"
    )
    group.add_argument(
        "--fp8", action="store_true", help="store DiT weights in fp8 (half the bytes, upcast per block)"
    )
    group.add_argument(
        "--cache",
        default=None,
        metavar="NAME[:THRESHOLD]",
        help="skip DiT work between similar steps (lossy): teacache, magcache, easycache or firstblock, "
        "e.g. magcache or teacache:0.08 (docs/step_cache.md); the same as --set cache=...",
    )
    group.add_argument(
        "--fast",
        action="store_true",
        help="the fast tier: the DiT's linears as fp8 GEMMs (lossy, named in the metadata; sm_89+ GPUs)",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="force a plan setting, e.g. cfg_batch=false, vae_tile=32x32, dit_blocks_resident=4 "
        "(`wanfit plan --list-settings` lists them all)",
    )


def hardware_from_args(args: argparse.Namespace) -> HardwareProbe:
    """This machine, or the --emulate card."""
    return resolve_hardware(getattr(args, "emulate", None))


def plan_settings(args: argparse.Namespace) -> list[str]:
    """The --set NAME=VALUE items, with --cache as one more (cache=...)."""
    settings = list(getattr(args, "overrides", ()) or ())
    if getattr(args, "cache", None) is not None:
        settings.append(f"cache={args.cache}")
    return settings


def constraints_from_args(args: argparse.Namespace) -> Constraints:
    """The user's settings as the planner's Constraints (each checked, one sentence if wrong)."""
    attention = getattr(args, "attention", None) or os.environ.get(ATTENTION_ENV) or None
    return Constraints.from_options(
        vram=getattr(args, "vram", None),
        ram=getattr(args, "ram", None),
        dtype=getattr(args, "dtype", None),
        attention=attention,
        allow_lossy_attention=getattr(args, "allow_lossy_attention", False),
        fp8=getattr(args, "fp8", False),
        device=getattr(args, "device", None),
        settings=plan_settings(args),
        allow_downscale=getattr(args, "allow_downscale", False),
        fast=getattr(args, "fast", False),
    )
