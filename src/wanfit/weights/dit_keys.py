"""Key names of Wan2.1 DiT checkpoints: official <-> diffusers conversion and layout detection.

The official names (used by the Wan2.1 release and ComfyUI files) are wanfit's internal names.
Every diffusers name maps to exactly one official name with the same tensor shape, so converting
a checkpoint is renaming only.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

from wanfit.errors import CheckpointError
from wanfit.weights.comfy_keys import FP8_INPUT_SCALE, FP8_MARKER_KEY, FP8_WEIGHT_SCALE  # noqa: F401 (fp8 bookkeeping keys)

# Official module path -> diffusers module path, outside the blocks.
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
# Image-to-video models only: mapped so that such checkpoints (and LoRAs) can be recognised in either layout.
_I2V_TOP_LEVEL = {
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}
_I2V_IN_BLOCK = {
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
}

# Official -> diffusers, inside `blocks.N.`. Note the cross-attention norm: official norm3, diffusers norm2.
_IN_BLOCK = {
    "modulation": "scale_shift_table",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
for _official, _diffusers in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    _IN_BLOCK.update(
        {
            f"{_official}.q": f"{_diffusers}.to_q",
            f"{_official}.k": f"{_diffusers}.to_k",
            f"{_official}.v": f"{_diffusers}.to_v",
            f"{_official}.o": f"{_diffusers}.to_out.0",
            f"{_official}.norm_q": f"{_diffusers}.norm_q",
            f"{_official}.norm_k": f"{_diffusers}.norm_k",
        }
    )

_TOP_LEVEL.update(_I2V_TOP_LEVEL)
_IN_BLOCK.update(_I2V_IN_BLOCK)

# Every official module (or bare parameter) path, I2V ones included: outside the blocks, and inside `blocks.N.`.
TOP_LEVEL_MODULES = tuple(_TOP_LEVEL)
BLOCK_MODULES = tuple(_IN_BLOCK)

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Keys every DiT checkpoint has (either layout); whatever stands before them is a prefix
# (ComfyUI: model.diffusion_model.).
ANCHOR_KEYS = (
    "patch_embedding.weight",
    "time_projection.1.weight",
    "condition_embedder.time_proj.weight",
    "head.head.weight",
    "proj_out.weight",
)


def _rename(name: str, table: dict[str, str]) -> str | None:
    # Longest match first, so `head.modulation` wins over shorter overlaps.
    for src in sorted(table, key=len, reverse=True):
        if name == src or name.startswith(src + "."):
            return table[src] + name[len(src) :]
    return None


def _convert(key: str, top: dict[str, str], in_block: dict[str, str]) -> str | None:
    match = _BLOCK_KEY.match(key)
    if match:
        inner = _rename(match.group(2), in_block)
        return None if inner is None else f"blocks.{match.group(1)}.{inner}"
    return _rename(key, top)


_TOP_LEVEL_INVERSE = {v: k for k, v in _TOP_LEVEL.items()}
_IN_BLOCK_INVERSE = {v: k for k, v in _IN_BLOCK.items()}


def official_to_diffusers_key(key: str) -> str | None:
    """`blocks.0.self_attn.q.weight` -> `blocks.0.attn1.to_q.weight`; None for an unknown name."""
    return _convert(key, _TOP_LEVEL, _IN_BLOCK)


def diffusers_to_official_key(key: str) -> str | None:
    """`blocks.0.attn1.to_q.weight` -> `blocks.0.self_attn.q.weight`; None for an unknown name."""
    return _convert(key, _TOP_LEVEL_INVERSE, _IN_BLOCK_INVERSE)


def diffusers_to_official(state_dict: dict) -> dict:
    """Rename a whole diffusers state dict (tensors untouched); unknown keys raise CheckpointError."""
    out = {}
    for key, value in state_dict.items():
        name = diffusers_to_official_key(key)
        if name is None:
            raise CheckpointError(f"Unknown diffusers Wan transformer key: {key}.")
        out[name] = value
    return out


def official_to_diffusers(state_dict: dict) -> dict:
    """Rename a whole official state dict (tensors untouched); unknown keys raise CheckpointError."""
    out = {}
    for key, value in state_dict.items():
        name = official_to_diffusers_key(key)
        if name is None:
            raise CheckpointError(f"Unknown official Wan DiT key: {key}.")
        out[name] = value
    return out


def is_image_to_video_name(name: str) -> bool:
    """True for an official name that only image-to-video models have (k_img, v_img, img_emb, ...)."""
    match = _BLOCK_KEY.match(name)
    inner, table = (match.group(2), _I2V_IN_BLOCK) if match else (name, _I2V_TOP_LEVEL)
    return any(inner == src or inner.startswith(src + ".") for src in table)


def find_prefix(keys: Collection[str]) -> str:
    """The prefix in front of the DiT keys ('' or e.g. 'model.diffusion_model.'), found from the anchor keys."""
    for anchor in ANCHOR_KEYS:
        found = [
            k[: -len(anchor)] for k in keys if k.endswith(anchor) and k[: -len(anchor)][-1:] in ("", ".")
        ]
        if found:
            return min(found, key=len)
    return ""


def detect_layout(keys: Collection[str]) -> str | None:
    """'official' or 'diffusers' from unprefixed keys; None when neither."""
    if any(k.startswith("condition_embedder.") or re.match(r"blocks\.\d+\.attn1\.", k) for k in keys):
        return "diffusers"
    if any(
        k.startswith(("time_projection.", "text_embedding.")) or re.match(r"blocks\.\d+\.self_attn\.", k)
        for k in keys
    ):
        return "official"
    return None


def describe_other_model(keys: Iterable[str]) -> str | None:
    """What a checkpoint that is not a text-to-video Wan2.1 DiT looks like (for errors); None if unknown."""
    keys = list(keys)

    def has(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    if has("vace_blocks.", "vace_patch_embedding"):
        return "a Wan VACE model (video editing), not a text-to-video DiT"
    if has("img_emb.", ".k_img.", "image_embedder.", ".add_k_proj."):
        return "a Wan image-to-video (I2V/FLF2V) DiT, not a text-to-video one"
    if has("motion_encoder.", "face_adapter."):
        return "a Wan Animate model, not a text-to-video DiT"
    if has("decoder.middle.", "decoder.mid_block.", "decoder.upsamples.", "decoder.up_blocks."):
        return "a Wan VAE, not a DiT"
    if has("token_embedding.", "encoder.block.", "shared.weight", "pos_embedding.embedding"):
        return "a (um)T5 text encoder, not a DiT"
    if has("visual.transformer", "textual.") or has("vision_model."):
        return "a CLIP image encoder, not a DiT"
    return None


def describe_size(dim: int, num_layers: int, in_dim: int = 16) -> str:
    """A human name for a DiT of this size, e.g. 'Wan2.1 T2V-14B (dim=5120, 40 layers)'."""
    known = {
        (1536, 30, 16): "Wan2.1 T2V-1.3B",
        (5120, 40, 16): "Wan2.1 T2V-14B",
        (5120, 40, 36): "Wan2.1 I2V-14B",
        (1536, 30, 36): "an image-to-video 1.3B model",
        (3072, 30, 48): "Wan2.2 TI2V-5B",
    }
    text = f"dim={dim}, {num_layers} layers"
    if in_dim != 16:
        text += f", {in_dim} input channels"
    name = known.get((dim, num_layers, in_dim))
    return f"{name} ({text})" if name else text
