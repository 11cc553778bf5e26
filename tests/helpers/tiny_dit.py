"""Tiny random diffusers WanTransformer3DModels, saved in every DiT checkpoint layout wanfit reads.

The official-name conversion here is written independently of wanfit.weights.dit_keys so that
the loader tests do not check the project's converter against itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

# diffusers constructor arguments of the tiny reference models.
TINY_DIFFUSERS_CONFIGS: dict[str, dict] = {
    # 2 heads of 24: RoPE split 8/8/8.
    "small": dict(
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
    ),
    # 3 heads of 36 (split 12/12/12), out_dim != in_dim, no cross-attention norm, patch (1, 2, 2).
    "wide": dict(
        num_attention_heads=3,
        attention_head_dim=36,
        in_channels=6,
        out_channels=5,
        text_dim=24,
        freq_dim=16,
        ffn_dim=40,
        num_layers=3,
        cross_attn_norm=False,
    ),
    # One head of 128 like the real models (split 44/42/42), so the head count can be inferred.
    "head128": dict(
        num_attention_heads=1,
        attention_head_dim=128,
        in_channels=4,
        out_channels=4,
        text_dim=8,
        freq_dim=32,
        ffn_dim=32,
        num_layers=1,
    ),
}

# Latent sizes (frames, height, width) used with them; non-square on purpose.
TINY_LATENTS = {"small": (3, 6, 10), "wide": (2, 8, 4), "head128": (2, 4, 6)}

COMFY_PREFIX = "model.diffusion_model."


def make_tiny_diffusers_dit(name: str = "small", seed: int = 0):
    """A random diffusers WanTransformer3DModel in fp32, eval mode; norms and tables perturbed."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TINY_DIFFUSERS_CONFIGS[name]).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            # Norm weights start at 1, biases at 0 and the tables near 0: move them so they matter.
            if "norm" in param_name or "scale_shift_table" in param_name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def tiny_inputs(name: str = "small", batch: int = 2, context_len: int = 512, seed: int = 1):
    """(x, timestep, context) for a tiny model: float timesteps [B], random context."""
    cfg = TINY_DIFFUSERS_CONFIGS[name]
    gen = torch.Generator().manual_seed(seed)
    frames, height, width = TINY_LATENTS[name]
    x = torch.randn(batch, cfg["in_channels"], frames, height, width, generator=gen)
    timestep = torch.rand(batch, generator=gen) * 1000
    context = torch.randn(batch, context_len, cfg["text_dim"], generator=gen)
    return x, timestep, context


def diffusers_forward(model, x, timestep, context) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=context, return_dict=False)[0]


def official_config(name: str) -> dict:
    """The tiny model's config in official (wanfit) names."""
    cfg = TINY_DIFFUSERS_CONFIGS[name]
    return {
        "dim": cfg["num_attention_heads"] * cfg["attention_head_dim"],
        "num_heads": cfg["num_attention_heads"],
        "ffn_dim": cfg["ffn_dim"],
        "freq_dim": cfg["freq_dim"],
        "num_layers": cfg["num_layers"],
        "in_dim": cfg["in_channels"],
        "out_dim": cfg["out_channels"],
        "text_dim": cfg["text_dim"],
        "cross_attn_norm": cfg.get("cross_attn_norm", True),
    }


_TOP_RENAMES = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("proj_out.", "head.head."),
]
_BLOCK_RENAMES = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",  # the cross-attention norm
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def to_official_names(state_dict: dict) -> dict:
    """diffusers WanTransformer3DModel state dict -> official Wan2.1 names (test-side conversion)."""
    out = {}
    for key, value in state_dict.items():
        if key == "scale_shift_table":
            new = "head.modulation"
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            module, _, leaf = rest.rpartition(".")
            if rest == "scale_shift_table":
                module, leaf = rest, ""
            new = f"blocks.{index}.{_BLOCK_RENAMES[module]}" + (f".{leaf}" if leaf else "")
        else:
            new = key
            for old_prefix, new_prefix in _TOP_RENAMES:
                if key.startswith(old_prefix):
                    new = new_prefix + key[len(old_prefix) :]
        out[new] = value.detach().clone().contiguous()
    return out


def official_state_dict(model) -> dict:
    return to_official_names(model.state_dict())


def save_diffusers(model, folder: Path, max_shard_size: str | None = None) -> Path:
    """model.save_pretrained: config.json + diffusion_pytorch_model.safetensors (or shards + index)."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    return Path(folder)


def save_official(state: dict, path: Path, shards: int = 1) -> Path:
    """Official names in one safetensors file, or `shards` files + index (the returned path is the index)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(state, str(path))
        return path
    stem = path.name.removesuffix(".safetensors")
    names = list(state)
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(path.parent / file))
        weight_map.update(dict.fromkeys(part, file))
    index = path.parent / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def to_comfy(state: dict, dtype: torch.dtype = torch.float16, prefix: str = COMFY_PREFIX) -> dict:
    """ComfyUI-style: every key under `prefix`, tensors cast to `dtype`."""
    return {prefix + k: v.to(dtype) for k, v in state.items()}


def to_fp8(state: dict, scaled: bool = False, prefix: str = COMFY_PREFIX) -> tuple[dict, dict]:
    """ComfyUI fp8-e4m3: matrix weights in fp8 (optionally with a per-tensor scale_weight), the rest fp16.

    Returns (file state dict, the official-name fp32 weights the file decodes to).
    """
    stored, decoded = {}, {}
    for key, value in state.items():
        if value.ndim == 2 and key.endswith(".weight"):
            scale = value.abs().max() / 448.0 if scaled else torch.tensor(1.0)
            q = (value / scale).to(torch.float8_e4m3fn)
            stored[prefix + key] = q
            decoded[key] = q.float() * scale
            if scaled:
                stored[prefix + key.removesuffix("weight") + "scale_weight"] = scale.reshape(1)
        else:
            stored[prefix + key] = value.to(torch.float16)
            decoded[key] = stored[prefix + key].float()
    if scaled:
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return stored, decoded


def load_official_into_diffusers(model, official: dict) -> None:
    """Put official-name weights (e.g. decoded fp8) into a diffusers model of the same config."""
    names = dict(zip(to_official_names(model.state_dict()), model.state_dict()))
    model.load_state_dict({names[k]: v.float() for k, v in official.items()})
