"""Random LoRA files for tiny DiTs, written in each format users have.

Names are spelled out here from the formats' documentation (diffusers names come from the test
helpers' own diffusers -> official table), never through wanfit.weights.lora_keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.helpers.tiny_dit import _BLOCK_RENAMES

# Official in-block Linear modules a LoRA usually targets -> (out, in) as functions of (dim, ffn_dim).
MODULES = {
    "self_attn.q": lambda d, f: (d, d),
    "self_attn.k": lambda d, f: (d, d),
    "self_attn.v": lambda d, f: (d, d),
    "self_attn.o": lambda d, f: (d, d),
    "cross_attn.q": lambda d, f: (d, d),
    "cross_attn.k": lambda d, f: (d, d),
    "cross_attn.v": lambda d, f: (d, d),
    "cross_attn.o": lambda d, f: (d, d),
    "ffn.0": lambda d, f: (f, d),
    "ffn.2": lambda d, f: (d, f),
}
OFFICIAL_TO_DIFFUSERS = {official: diffusers for diffusers, official in _BLOCK_RENAMES.items()}


def random_factors(num_layers: int, dim: int, ffn_dim: int, rank: int = 4, seed: int = 0, size: float = 0.3):
    """{"blocks.i.module": (down [rank, in], up [out, rank])} for every block and module."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(num_layers):
        for module, shape in MODULES.items():
            rows, cols = shape(dim, ffn_dim)
            down = torch.randn(rank, cols, generator=gen) * size
            up = torch.randn(rows, rank, generator=gen) * size
            out[f"blocks.{i}.{module}"] = (down, up)
    return out


def random_biases(factors: dict, seed: int = 1, size: float = 0.1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(up.shape[0], generator=gen) * size for m, (_, up) in factors.items()}


def comfy(
    factors: dict, alpha: float | None = None, biases: dict | None = None, lora_ab: bool = False
) -> dict:
    """ComfyUI / LightX2V / Kijai: diffusion_model.<official>.lora_down/up (or lora_A/B), .alpha, .diff_b."""
    down_name, up_name = ("lora_A", "lora_B") if lora_ab else ("lora_down", "lora_up")
    state = {}
    for module, (down, up) in factors.items():
        key = f"diffusion_model.{module}"
        state[f"{key}.{down_name}.weight"] = down
        state[f"{key}.{up_name}.weight"] = up
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(alpha)
        if biases is not None:
            state[f"{key}.diff_b"] = biases[module]
    return state


def kohya(factors: dict, alpha: float, prefix: str = "lora_unet_") -> dict:
    """kohya / musubi-tuner (prefix lora_unet_) or VideoX-Fun (lora_unet__): dots flattened to underscores."""
    state = {}
    for module, (down, up) in factors.items():
        key = prefix + module.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def diffusers(factors: dict, biases: dict | None = None) -> dict:
    """diffusers / PEFT: transformer.blocks.N.attn1.to_q.lora_A.weight / lora_B.weight (+ lora_B.bias)."""
    state = {}
    for module, (down, up) in factors.items():
        _, index, inner = module.split(".", 2)
        key = f"transformer.blocks.{index}.{OFFICIAL_TO_DIFFUSERS[inner]}"
        state[f"{key}.lora_A.weight"] = down
        state[f"{key}.lora_B.weight"] = up
        if biases is not None:
            state[f"{key}.lora_B.bias"] = biases[module]
    return state


def diffsynth(factors: dict) -> dict:
    """DiffSynth-Studio's PEFT files: official names with peft's `.default.` adapter name, no prefix."""
    state = {}
    for module, (down, up) in factors.items():
        state[f"{module}.lora_A.default.weight"] = down
        state[f"{module}.lora_B.default.weight"] = up
    return state


def save(state: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
