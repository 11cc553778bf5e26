"""Wan2.1 VAE key names: detect the layout of a checkpoint and map diffusers names to official ones.

Official (Wan2.1_VAE.pth)                      diffusers (AutoencoderKLWan)
  conv1 / conv2                                  quant_conv / post_quant_conv
  {en,de}coder.conv1                             {en,de}coder.conv_in
  {en,de}coder.head.0 / head.2                   {en,de}coder.norm_out / conv_out
  {en,de}coder.middle.0 / .1 / .2                {en,de}coder.mid_block.resnets.0 / attentions.0 / resnets.1
  encoder.downsamples.N                          encoder.down_blocks.N
  decoder.upsamples.N (one flat list)            decoder.up_blocks.L.resnets.J / .upsamplers.0
  residual block: residual.0 / .2 / .3 / .6      norm1 / conv1 / norm2 / conv2
                  shortcut                       conv_shortcut

In the decoder each level holds num_res_blocks + 1 residual blocks and (but the last) one
upsampler, so N = L * (num_res_blocks + 2) + J, the upsampler at J = num_res_blocks + 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_PART = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}
_MID = {"resnets.0": "middle.0", "attentions.0": "middle.1", "resnets.1": "middle.2"}
_RESIDUAL = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}

_DIFFUSERS_MARKERS = (
    "post_quant_conv.",
    "quant_conv.",
    "encoder.conv_in.",
    "decoder.conv_in.",
    "decoder.up_blocks.",
    "encoder.down_blocks.",
)
_OFFICIAL_MARKERS = (
    "conv1.",
    "conv2.",
    "encoder.conv1.",
    "decoder.conv1.",
    "decoder.upsamples.",
    "encoder.downsamples.",
)


def detect_layout(keys: Iterable[str]) -> str | None:
    """'official', 'diffusers', or None when the keys are neither (e.g. another model)."""
    keys = list(keys)
    if any(k.startswith(_DIFFUSERS_MARKERS) for k in keys):
        return "diffusers"
    if any(k.startswith(_OFFICIAL_MARKERS) for k in keys) and any(
        k.startswith(("encoder.", "decoder.")) for k in keys
    ):
        return "official"
    return None


def diffusers_num_res_blocks(keys: Iterable[str]) -> int | None:
    """num_res_blocks of a diffusers-named checkpoint: its first decoder level has one more."""
    found = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))]
    return max(found) if found else None


def diffusers_to_official(key: str, num_res_blocks: int) -> str | None:
    """The official name of a diffusers AutoencoderKLWan key; None if it is no such key."""
    top, _, rest = key.partition(".")
    if top in _TOP:
        return f"{_TOP[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        return None
    block, _, leaf = rest.partition(".")
    if block in _PART:
        return f"{top}.{_PART[block]}.{leaf}"
    if m := re.fullmatch(r"mid_block\.((?:resnets|attentions)\.\d+)\.(.+)", rest):
        if m.group(1) not in _MID:
            return None
        return f"{top}.{_MID[m.group(1)]}.{_residual_leaf(m.group(2))}"
    if top == "encoder" and (m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)):
        return f"encoder.downsamples.{m.group(1)}.{_residual_leaf(m.group(2))}"
    if top == "decoder" and (
        m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", rest)
    ):
        level, block = int(m.group(1)), m.group(3)
        index = level * (num_res_blocks + 2) + (int(block) if block is not None else num_res_blocks + 1)
        return f"decoder.upsamples.{index}.{_residual_leaf(m.group(4))}"
    return None


def _residual_leaf(leaf: str) -> str:
    """norm1.gamma -> residual.0.gamma etc.; attention and resample leaves keep their names."""
    part, _, param = leaf.partition(".")
    return f"{_RESIDUAL[part]}.{param}" if part in _RESIDUAL and param else leaf
