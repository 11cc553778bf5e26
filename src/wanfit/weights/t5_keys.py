"""umT5 encoder key names: the official Wan2.1 file -> transformers' UMT5EncoderModel, and the config a
file implies.

The official release stores the encoder as `models_t5_umt5-xxl-enc-bf16.pth` with its own module names
(token_embedding, blocks.N.attn, blocks.N.ffn, ...); the diffusers layout and single safetensors files
use transformers' names (shared, encoder.block.N.layer.M...). Both describe the same tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from wanfit.errors import CheckpointError
from wanfit.models.configs import TextEncoderConfig
from wanfit.weights.io import short_list

# Per block: official suffix -> transformers suffix under `encoder.block.N.`.
# The official feed-forward is fc2(fc1(x) * gelu(gate(x))); transformers' gated FFN is
# wo(gelu(wi_0(x)) * wi_1(x)), so the gate is wi_0 and fc1 is wi_1.
_BLOCK_NAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_NAMES = {
    "token_embedding.weight": "encoder.embed_tokens.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")

# transformers' encoder reads encoder.embed_tokens; `shared` is the same matrix (tied).
EMBEDDING_NAMES = ("encoder.embed_tokens.weight", "shared.weight")
# Prefixes some tools put in front of every name.
KNOWN_PREFIXES = ("text_encoder.", "model.", "module.")


def official_to_transformers_name(name: str) -> str | None:
    """The transformers name of one official tensor name, or None if the name is not an umT5 one."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _OFFICIAL_BLOCK.fullmatch(name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"encoder.block.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    return None


def transformers_to_official_name(name: str) -> str | None:
    """The official name of one transformers tensor name (`shared.weight` has none: it is tied)."""
    top = {hf: official for official, hf in _TOP_NAMES.items()}
    if name in top:
        return top[name]
    match = _HF_BLOCK.fullmatch(name)
    block = {hf: official for official, hf in _BLOCK_NAMES.items()}
    if match and match.group(2) in block:
        return f"blocks.{match.group(1)}.{block[match.group(2)]}"
    return None


def official_to_transformers(names: Iterable[str]) -> dict[str, str]:
    """transformers name -> official name for the umT5 tensors of an official state dict.

    `shared.weight` is added for the token embedding (transformers keeps it beside the tied
    encoder.embed_tokens). Names that are not umT5 names are left out; the loader reports them.
    """
    mapping: dict[str, str] = {}
    for name in names:
        target = official_to_transformers_name(name)
        if target is not None:
            mapping[target] = name
    if "encoder.embed_tokens.weight" in mapping:
        mapping["shared.weight"] = mapping["encoder.embed_tokens.weight"]
    return mapping


def detect_t5_format(names: Iterable[str]) -> str:
    """'official' (Wan2.1 release names) or 'transformers' (diffusers / single-file names)."""
    names = list(names)
    if any(n in _TOP_NAMES or _OFFICIAL_BLOCK.fullmatch(n) for n in names):
        return "official"
    if any(n in EMBEDDING_NAMES or _HF_BLOCK.fullmatch(n) for n in names):
        return "transformers"
    raise CheckpointError(
        "These weights are not a umT5 text encoder (no token_embedding/blocks.N or "
        f"shared/encoder.block.N tensors; first names: {short_list(names, 8)})."
    )


def umt5_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """UMT5Config arguments implied by the shapes of a state dict in transformers names.

    Relative-attention max distance and the norm epsilon are not visible in the shapes: they are
    umT5's (TextEncoderConfig's defaults).
    """
    embedding = next((shapes[n] for n in EMBEDDING_NAMES if n in shapes), None)
    block_ids = {int(m.group(1)) for n in shapes if (m := _HF_BLOCK.fullmatch(n))}
    first = "encoder.block.0.layer."
    needed = [
        first + "0.SelfAttention.q.weight",
        first + "0.SelfAttention.relative_attention_bias.weight",
        first + "1.DenseReluDense.wi_0.weight",
    ]
    missing = [n for n in needed if n not in shapes]
    if embedding is None or not block_ids or missing:
        missing = ([] if embedding is not None else [EMBEDDING_NAMES[0]]) + missing
        raise CheckpointError(
            f"Cannot infer the umT5 configuration: the weights lack {short_list(missing, 8)}."
        )
    vocab_size, d_model = embedding
    num_buckets, num_heads = shapes[needed[1]]
    inner_dim = shapes[needed[0]][0]
    if inner_dim % num_heads:
        raise CheckpointError(
            f"The umT5 query projection ({inner_dim} rows) does not split into {num_heads} heads."
        )
    return TextEncoderConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner_dim // num_heads,
        d_ff=shapes[needed[2]][0],
        num_layers=max(block_ids) + 1,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
    ).umt5_kwargs()
