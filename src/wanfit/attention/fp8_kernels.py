"""The Triton kernels of wanfit.attention.fp8_attention (which documents the method); this module
imports Triton, so only that one imports it, on first use."""

import triton
import triton.language as tl

from wanfit.attention.int8_kernels import row_block


@triton.jit
def load_tokens(X, sxb, sxl, sxh, sxd, H, L, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This program's block of tokens of one (batch, head), fp32 [BLOCK, HEAD_DIM] (zeros past L),
    with its place (row_block's) and which rows lie inside."""
    blk, bh, b, h, rows, cols = row_block(H, BLOCK, HEAD_DIM)
    inside = rows[:, None] < L
    x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxl + cols[None, :] * sxd, mask=inside, other=0.0)
    return x.to(tl.float32), inside, blk, bh, b, h, rows, cols


@triton.jit
def channel_stats(
    X, SUM, MIN, MAX,
    sxb, sxl, sxh, sxd,
    H, L, NB,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One block of tokens of one (batch, head): each channel's sum, min and max over the block,
    stored at [batch * head, block, channel] (the caller reduces over the blocks)."""
    x, inside, blk, bh, b, h, rows, cols = load_tokens(X, sxb, sxl, sxh, sxd, H, L, BLOCK, HEAD_DIM)
    out = (bh * NB + blk) * HEAD_DIM + cols
    tl.store(SUM + out, tl.sum(x, axis=0))
    tl.store(MIN + out, tl.min(tl.where(inside, x, float("inf")), axis=0))
    tl.store(MAX + out, tl.max(tl.where(inside, x, float("-inf")), axis=0))


@triton.jit
def quantize(
    X, MEAN, FACTOR, Y,
    sxb, sxl, sxh, sxd,
    H, L,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, SMOOTH: tl.constexpr,
):  # fmt: skip
    """One block of tokens of one (batch, head): (x - its channel mean, when SMOOTH) times the
    head's factor, clamped to e4m3's range and cast, into a contiguous [B, L, H, D]."""
    x, inside, blk, bh, b, h, rows, cols = load_tokens(X, sxb, sxl, sxh, sxd, H, L, BLOCK, HEAD_DIM)
    if SMOOTH:
        x = x - tl.load(MEAN + bh * HEAD_DIM + cols)[None, :]
    y = tl.minimum(tl.maximum(x * tl.load(FACTOR + bh), -448.0), 448.0)
    offset = ((b * L + rows[:, None]) * H + h) * HEAD_DIM + cols[None, :]
    tl.store(Y + offset, y.to(tl.float8e4nv), mask=inside)
