"""Lossy attention in the manner of SageAttention2: Q·K^T in int8, P·V in fp8 e4m3, fp32 accumulation.

The method (Zhang et al., "SageAttention2", arXiv 2411.10958), written here in Triton:
- K is smoothed: its mean over the tokens is subtracted per channel. That adds the same value
  q·mean to every score of a query row, which softmax ignores, and removes the common offset
  that would otherwise eat the int8 range.
- Q (pre-multiplied by the softmax scale and log2 e, so scores come out in log2 units) and the
  smoothed K are quantised to int8, symmetric, one scale per block of query rows / key rows (the
  kernel's tiles, so a tile's scores dequantise with one multiply).
- V is quantised to fp8 e4m3 with one scale per channel; P = exp2(s - running max) lies in [0, 1]
  and is scaled by fp8's largest value before its cast. Each key block's P·V is accumulated by
  the tensor cores alone, then added to the fp32 output accumulator (SageAttention2's two-level
  accumulation: fp8 MMAs accumulate with reduced precision).
- Online softmax over key blocks (flash-attention style), fp32 row max and sum.

What is lossy: the int8 scores (each q and k element rounded to 1/254 of its block's range), P
and V rounded to fp8. Non-causal, no mask; q/k/v [B, L, H, D] in bf16/fp16, any lengths (the
quantised copies are padded to whole tiles with zeros; padded keys are masked), head dims 64 and
128. `pv="fp16"` runs P·V with P and V in fp16 (the path for cards without fp8 tensor cores, and
for Triton's interpreter, whose fp8 casts and bf16 dots are not faithful). `int8_attention_reference` is the same
quantised math in plain torch, the tests' and the benchmark's yardstick for the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG2E = 1.4426950408889634
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8 e4m3fn
HEAD_DIMS = (64, 128)
PV_MODES = ("fp8", "fp16")


@dataclass(frozen=True)
class TileConfig:
    """The kernel's tiles and launch shape: query rows and key rows per tile (also the quantisation
    blocks of q and k), warps, software-pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# The one place the tiles are chosen. For sm_90 (H200): 128 query rows per program and 8 warps
# (two warp groups), 64 keys per step at head dim 128 (the fp32 accumulator and the score tile
# together stay within the register file), 128 at head dim 64.
TILES = {
    64: TileConfig(block_m=128, block_n=128, num_warps=8, num_stages=3),
    128: TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
}


def tile_config(head_dim: int) -> TileConfig:
    if head_dim not in TILES:
        raise ValueError(
            f"int8 attention supports head dims {', '.join(map(str, HEAD_DIMS))}, not {head_dim}."
        )
    return TILES[head_dim]


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


def _kernels():
    """The Triton kernels (imported on first use: the package imports without Triton)."""
    from wanfit.attention import int8_kernels

    return int8_kernels.quant_int8, int8_kernels.quant_fp8_transposed, int8_kernels.attention


@dataclass(frozen=True)
class Quantised:
    """q and k in int8 (padded to whole tiles, [B, H, L_padded, D]) with their block scales
    ([B, H, blocks], fp32), and V in fp8 ([B, H, D, L_padded]) with its channel scales ([B, H, D]),
    or V as given (fp16 P·V)."""

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor | None


def _softmax_factor(head_dim: int, scale: float | None) -> float:
    return (1.0 / math.sqrt(head_dim) if scale is None else scale) * LOG2E


def quantise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    smooth_k: bool = True,
    pv: str = "fp8",
) -> Quantised:
    """The kernel's inputs, made by the small Triton kernels (q, k: int8 per tile; v: fp8 per channel)."""
    quant_int8, quant_fp8, _ = _kernels()
    batch, _, heads, d, lk = _shapes(q, k, v)
    tiles = tile_config(d)
    mean = k.mean(dim=1, dtype=torch.float32).contiguous() if smooth_k else None  # [B, H, D]
    out = []
    for x, block, factor, m in (
        (q, tiles.block_m, _softmax_factor(d, scale), None),
        (k, tiles.block_n, 1.0, mean),
    ):
        n = x.shape[1]
        blocks = _padded(n, block) // block
        y = torch.empty(batch, heads, blocks * block, d, dtype=torch.int8, device=x.device)
        s = torch.empty(batch, heads, blocks, dtype=torch.float32, device=x.device)
        quant_int8[(blocks, batch * heads)](
            x, x if m is None else m, y, s,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            y.stride(0), y.stride(1), y.stride(2),
            heads, n, blocks, factor,
            BLOCK=block, HEAD_DIM=d, SMOOTH=m is not None,
        )  # fmt: skip
        out += [y, s]
    if pv == "fp16":
        return Quantised(*out, v=v, v_scale=None)
    if pv != "fp8":
        raise ValueError(f"pv must be one of {', '.join(PV_MODES)}, not {pv!r}.")
    amax = torch.maximum(v.amax(dim=1), -v.amin(dim=1)).float()  # [B, H, D]; no |v| copy
    v_scale = (amax / FP8_MAX).clamp_min(1e-20).contiguous()
    length = _padded(lk, tiles.block_n)
    v8 = torch.empty(batch, heads, d, length, dtype=torch.float8_e4m3fn, device=v.device)  # all written
    quant_fp8[(length // tiles.block_n, batch * heads)](
        v, v_scale, v8,
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        v8.stride(0), v8.stride(1), v8.stride(2),
        heads, lk,
        BLOCK=tiles.block_n, HEAD_DIM=d,
    )  # fmt: skip
    return Quantised(*out, v=v8, v_scale=v_scale)


def _shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(batch, Lq, heads, head dim, Lk) of q [B, Lq, H, D] over k, v [B, Lk, H, D]; ValueError otherwise."""
    batch, lq, heads, d = q.shape
    lk = k.shape[1]
    if k.shape != (batch, lk, heads, d) or v.shape != k.shape:
        raise ValueError(f"int8 attention needs k and v shaped [B, Lk, H, D] like q {tuple(q.shape)}.")
    return batch, lq, heads, d, lk


def int8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    smooth_k: bool = True,
    pv: str = "fp8",
) -> torch.Tensor:
    """Attention of q [B, Lq, H, D] over k/v [B, Lk, H, D] (bf16/fp16, CUDA or Triton's interpreter),
    lossy: int8 Q·K^T, fp8 (or fp16) P·V. Returns [B, Lq, H, D] in q's dtype."""
    batch, lq, heads, d, lk = _shapes(q, k, v)
    tiles = tile_config(d)
    qt = quantise(q, k, v, scale=scale, smooth_k=smooth_k, pv=pv)
    out = torch.empty(batch, lq, heads, d, dtype=q.dtype, device=q.device)
    if pv == "fp8":  # V^T [B, H, D, L]
        v_strides = (qt.v.stride(0), qt.v.stride(1), qt.v.stride(3), qt.v.stride(2))
    else:  # V as given [B, L, H, D]
        v_strides = (qt.v.stride(0), qt.v.stride(2), qt.v.stride(1), qt.v.stride(3))
    _, _, attention = _kernels()
    grid = (qt.q.shape[2] // tiles.block_m, batch * heads)
    attention[grid](
        qt.q, qt.k, qt.v, qt.q_scale, qt.k_scale, qt.q_scale if qt.v_scale is None else qt.v_scale, out,
        qt.q.stride(0), qt.q.stride(1), qt.q.stride(2),
        qt.k.stride(0), qt.k.stride(1), qt.k.stride(2),
        *v_strides,
        out.stride(0), out.stride(1), out.stride(2),
        heads, lq, lk, qt.q_scale.shape[2], qt.k_scale.shape[2],
        HEAD_DIM=d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, PV_FP8=pv == "fp8",
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return out


# --- the same math in plain torch -----------------------------------------------------------------


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


def _int8_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, D] fp32 -> (its int8 values as fp32, padded [B, H, L_padded, D]; scales [B, H, blocks])."""
    b, h, n, d = x.shape
    length = _padded(n, block)
    x = torch.nn.functional.pad(x, (0, 0, 0, length - n))
    tiles = x.view(b, h, length // block, block, d)
    scale = tiles.abs().amax(dim=(3, 4)).clamp_min(1e-20) / INT8_MAX
    values = _round_half_away(tiles / scale[..., None, None]).view(b, h, length, d)
    return values, scale


def int8_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    smooth_k: bool = True,
    pv: str = "fp8",
) -> torch.Tensor:
    """The kernel's quantised math in plain torch, fp32 (any device): same blocks, same scales, the
    same online softmax over key blocks and the same P rounding. Returns [B, Lq, H, D] in q's dtype."""
    batch, lq, heads, d, lk = _shapes(q, k, v)
    tiles = tile_config(d)
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))  # [B, H, L, D]
    if smooth_k:
        kf = kf - kf.mean(dim=2, keepdim=True)
    q8, q_scale = _int8_blocks(qf * _softmax_factor(d, scale), tiles.block_m)
    k8, k_scale = _int8_blocks(kf, tiles.block_n)
    if pv == "fp8":
        v_scale = (vf.abs().amax(dim=2, keepdim=True) / FP8_MAX).clamp_min(1e-20)  # [B, H, 1, D]
        vq = (vf / v_scale).to(torch.float8_e4m3fn).float()
    else:
        vq = vf.half().float()
    row_scale = q_scale.repeat_interleave(tiles.block_m, dim=2)[..., None]  # [B, H, Lq_padded, 1]
    m = torch.full(q8.shape[:3], -math.inf, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(q8.shape, device=q.device)
    for j, start in enumerate(range(0, lk, tiles.block_n)):
        stop = min(start + tiles.block_n, lk)
        s = (q8 @ k8[:, :, start:stop].transpose(-1, -2)) * row_scale * k_scale[:, :, j, None, None]
        m_new = torch.maximum(m, s.amax(dim=-1))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - m_new[..., None])
        l = l * alpha + p.sum(dim=-1)
        if pv == "fp8":
            p = (p * FP8_MAX).to(torch.float8_e4m3fn).float()
        else:
            p = p.half().float()
        acc = acc * alpha[..., None] + p @ vq[:, :, start:stop]
        m = m_new
    if pv == "fp8":
        acc = acc * v_scale / FP8_MAX
    out = (acc / l[..., None])[:, :, :lq]
    return out.transpose(1, 2).to(q.dtype)
