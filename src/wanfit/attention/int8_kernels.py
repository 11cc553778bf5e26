"""The Triton kernels of wanfit.attention.int8_attention (which documents the method); this module
imports Triton, so only that one imports it, on first use."""

import triton
import triton.language as tl


@triton.jit
def row_block(H, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This program's place: its block of rows, its (batch, head) and their index ranges."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # batch offsets can pass 2**31 elements
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    return blk, bh, b, bh % H, rows, tl.arange(0, HEAD_DIM)


@triton.jit
def quant_int8(
    X, Mean, Y, S,
    sxb, sxl, sxh, sxd,
    syb, syh, syl,
    H, L, NB, factor,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, SMOOTH: tl.constexpr,
):  # fmt: skip
    """One block of rows of one (batch, head): optionally minus the mean, times factor, to int8
    with one scale; padded rows (past L) are written as zeros."""
    blk, bh, b, h, rows, cols = row_block(H, BLOCK, HEAD_DIM)
    inside = rows[:, None] < L
    x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxl + cols[None, :] * sxd, mask=inside, other=0.0).to(
        tl.float32
    )
    if SMOOTH:
        x = tl.where(inside, x - tl.load(Mean + bh * HEAD_DIM + cols)[None, :], 0.0)
    x = x * factor
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.maximum(amax, 1e-20) / 127.0
    y = x / scale
    y = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # round half away from zero
    tl.store(Y + b * syb + h * syh + rows[:, None] * syl + cols[None, :], y)
    tl.store(S + bh * NB + blk, scale)


@triton.jit
def quant_fp8_transposed(
    X, S, Y,
    sxb, sxl, sxh, sxd,
    syb, syh, syd,
    H, L,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """V / its per-channel scale, to fp8, stored [D, L] per (batch, head): the tokens contiguous,
    the layout the fp8 MMA wants for the B operand of P·V."""
    blk, bh, b, h, rows, cols = row_block(H, BLOCK, HEAD_DIM)
    x = tl.load(
        X + b * sxb + h * sxh + rows[:, None] * sxl + cols[None, :] * sxd,
        mask=rows[:, None] < L,
        other=0.0,
    ).to(tl.float32)
    y = x / tl.load(S + bh * HEAD_DIM + cols)[None, :]
    tl.store(Y + b * syb + h * syh + cols[None, :] * syd + rows[:, None], y.to(tl.float8e4nv))


@triton.jit
def key_block(
    acc, l_i, m_i, q, q_scale, k_ptrs, v_ptrs, k_scale, start, Lk,
    BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax: int8 scores, running max and sum, P·V."""
    k = tl.load(k_ptrs)  # [D, BLOCK_N]: K^T
    s = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)
    if MASKED:
        inside = (start + tl.arange(0, BLOCK_N)) < Lk
        s = tl.where(inside[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:  # fp16 P·V reads V as given, unpadded
        v = tl.load(v_ptrs, mask=inside[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)  # [BLOCK_N, D]
    if PV_FP8:
        pv = tl.dot((p * 448.0).to(tl.float8e4nv), v)
    else:
        pv = tl.dot(p.to(tl.float16), v.to(tl.float16))
    acc = acc * alpha[:, None] + pv  # fp32, outside the MMA's own accumulator
    return acc, l_i, m_new


@triton.jit
def attention(
    Q8, K8, V, QS, KS, VS, O,
    sqb, sqh, sqm,
    skb, skh, skn,
    svb, svh, svn, svd,
    sob, som, soh,
    H, Lq, Lk, NQ, NK,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr,
):  # fmt: skip
    """One tile of query rows of one (batch, head) against every key."""
    pid_m, bh, b, h, rows, cols = row_block(H, BLOCK_M, HEAD_DIM)
    keys = tl.arange(0, BLOCK_N)
    q = tl.load(Q8 + b * sqb + h * sqh + rows[:, None] * sqm + cols[None, :])  # padded: no mask
    q_scale = tl.load(QS + bh * NQ + pid_m)
    k_ptrs = K8 + b * skb + h * skh + keys[None, :] * skn + cols[:, None]
    v_ptrs = V + b * svb + h * svh + keys[:, None] * svn + cols[None, :] * svd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_blocks = Lk // BLOCK_N
    for j in range(0, full_blocks):
        acc, l_i, m_i = key_block(
            acc, l_i, m_i, q, q_scale, k_ptrs + j * BLOCK_N * skn, v_ptrs + j * BLOCK_N * svn,
            tl.load(KS + bh * NK + j), j * BLOCK_N, Lk, BLOCK_N, PV_FP8, False,
        )  # fmt: skip
    if full_blocks * BLOCK_N < Lk:  # the tail block: keys past Lk are zeros, masked out
        j = full_blocks
        acc, l_i, m_i = key_block(
            acc, l_i, m_i, q, q_scale, k_ptrs + j * BLOCK_N * skn, v_ptrs + j * BLOCK_N * svn,
            tl.load(KS + bh * NK + j), j * BLOCK_N, Lk, BLOCK_N, PV_FP8, True,
        )  # fmt: skip
    if PV_FP8:
        acc = acc * (tl.load(VS + bh * HEAD_DIM + cols)[None, :] / 448.0)
    out = acc / l_i[:, None]
    tl.store(
        O + b * sob + h * soh + rows[:, None] * som + cols[None, :],
        out.to(O.dtype.element_ty),
        mask=rows[:, None] < Lq,
    )
