"""generate's LoRA and sampler options: --lora FILE[:STRENGTH], --lora-skip-unknown, --preset, --sampler.

LoRA files are read and checked against the model's config before any weight is loaded, so a wrong
file costs a second; a preset fills only the settings the user did not give.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from wanfit.errors import ConfigError


def add_lora_options(parser: argparse.ArgumentParser) -> None:
    from wanfit.sampling.presets import PRESETS
    from wanfit.sampling.schedulers import SCHEDULERS

    group = parser.add_argument_group("LoRAs and few-step sampling")
    add_lora_files_option(group)
    group.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help=f"a few-step recipe ({', '.join(PRESETS)}): sampler, steps, shift, guidance, LoRA strength; "
        "flags given win",
    )
    group.add_argument(
        "--sampler", default=None, metavar="NAME", help=f"{', '.join(SCHEDULERS)} (default: the model's own)"
    )


def add_lora_files_option(group) -> None:
    """--lora FILE[:STRENGTH] (repeatable) and --lora-skip-unknown."""
    group.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="apply a LoRA (ComfyUI, kohya, diffusers, DiffSynth files); repeatable; strength default 1 "
        "(or the preset's)",
    )
    group.add_argument(
        "--lora-skip-unknown",
        action="store_true",
        help="skip LoRA keys that fit no weight instead of stopping",
    )


def add_preset_option(parser: argparse.ArgumentParser) -> None:
    """`wanfit plan --preset NAME`: plan with the preset's guidance and show its settings."""
    from wanfit.sampling.presets import PRESETS

    parser.add_argument(
        "--preset", default=None, metavar="NAME", help=f"plan for a few-step recipe ({', '.join(PRESETS)})"
    )


def plan_preset(args: argparse.Namespace):
    """The --preset of `wanfit plan` (or None); fills --guidance when it was not given."""
    from wanfit.pipeline import SamplingDefaults
    from wanfit.sampling.presets import get_preset

    preset = get_preset(args.preset) if args.preset is not None else None
    if args.guidance is None:
        args.guidance = preset.guidance if preset else SamplingDefaults().guidance_scale
    return preset


def apply_preset(args: argparse.Namespace):
    """Fill the settings the user left unset from --preset; returns the Preset or None."""
    from wanfit.sampling.presets import get_preset

    if args.preset is None:
        return None
    preset = get_preset(args.preset)
    for flag, value in (
        ("sampler", preset.sampler),
        ("steps", preset.steps),
        ("shift", preset.shift),
        ("guidance", preset.guidance),
    ):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    return preset


def check_sampler(name: str | None, steps: int | None) -> None:
    from wanfit.sampling.schedulers import SCHEDULERS, sampler_sigmas

    if name is None:
        return
    if name not in SCHEDULERS:
        raise ConfigError(f"Unknown --sampler {name!r}; choose one of: {', '.join(SCHEDULERS)}.")
    if steps is not None:
        sampler_sigmas(name, steps)  # says what the sampler cannot run (causvid: at most 9 steps)


def parse_lora(text: str, default_strength: float) -> tuple[Path, float]:
    """'style.safetensors:0.8' -> (path, 0.8); without ':STRENGTH' the default (a colon in a path is kept)."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            strength = float(tail)
        except ValueError:
            return Path(text), default_strength
        if not math.isfinite(strength):
            raise ConfigError(f"--lora {text}: the strength must be a finite number, got {tail}.")
        return Path(path), strength
    return Path(text), default_strength


def lora_requests(args: argparse.Namespace, preset) -> list[tuple[Path, float]]:
    default = preset.lora_strength if preset is not None else 1.0
    return [parse_lora(text, default) for text in args.lora]


def apply_loras(pipe, loras: list, *, notes: bool = True) -> None:
    """Apply what read_loras returned to a loaded pipeline; say each LoRA's notes (if `notes`)."""
    import sys

    if loras:
        pipe.load_loras(loras)  # one merge: each weight read and written once
    for lora, _ in loras:
        for note in lora.notes if notes else ():
            print(f"wanfit: note: {note}.", file=sys.stderr)


def read_loras(requests: list[tuple[Path, float]], config, skip_unknown: bool) -> list:
    """[(LoraWeights, strength)], each file converted and checked against a DiT of `config` (no weights)."""
    from wanfit.runtime.lora import parameter_shapes
    from wanfit.weights.dit_keys import describe_size
    from wanfit.weights.lora_keys import load_lora

    if not requests:
        return []
    shapes = parameter_shapes(config)
    name = describe_size(config.dim, config.num_layers, config.in_dim)
    return [(load_lora(path, shapes, skip_unknown=skip_unknown, model_name=name), s) for path, s in requests]
