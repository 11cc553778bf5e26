"""Exact attention in bounded memory, and the plain reference the smoke tests compare against.

With a fused inner kernel the queries are split into blocks and each block attends to all keys.
With none (only math left) each query block walks the keys in blocks with an online softmax: a
running max m, normaliser l and accumulator are rescaled by exp(m_old - m_new) as each key block
arrives, so no more than one [B, H, q_chunk, kv_chunk] fp32 score block lives at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MIB = 1024**2
DEFAULT_BUDGET_BYTES = 256 * MIB
# fp32 score block plus one temporary of the same size (masking, the matmul's output).
_SCORE_COPIES = 2


def chunk_sizes(
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    min_q_chunk: int = 64,
) -> tuple[int, int]:
    """(q_chunk, kv_chunk) so one fp32 score block stays within `budget_bytes`.

    Whole key rows are kept when at least `min_q_chunk` query rows fit (no merge needed); otherwise
    `min_q_chunk` query rows walk the keys in blocks.
    """
    elems = max(1, budget_bytes // (4 * _SCORE_COPIES))
    rows = elems // (batch * heads * kv_len)
    if rows >= min(q_len, min_q_chunk):
        return max(1, min(q_len, rows)), kv_len
    q_chunk = min(q_len, min_q_chunk)
    kv_chunk = max(1, elems // (batch * heads * q_chunk))
    return q_chunk, min(kv_len, kv_chunk)


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    q_chunk: int | None = None,
    kv_chunk: int | None = None,
    inner: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Exact softmax attention, q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype.

    `inner` (a backend's run function) serves each query block when given; otherwise the online
    softmax over key blocks does, in fp32. Chunk sizes default to what `budget_bytes` allows.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    if inner is not None:
        # A fused kernel keeps no score matrix: the blocks only bound its per-call temporaries.
        rows = q_chunk or max(1, budget_bytes // (batch * heads * head_dim * q.element_size() * 4))
        if rows >= q_len:
            return inner(q, k, v, scale=scale, attn_mask=attn_mask)
        blocks = []
        for q0 in range(0, q_len, rows):
            mask = None if attn_mask is None else _expand_mask(attn_mask, q, k)[:, :, q0 : q0 + rows]
            blocks.append(inner(q[:, q0 : q0 + rows], k, v, scale=scale, attn_mask=mask))
        return torch.cat(blocks, dim=1)

    auto_q, auto_kv = chunk_sizes(batch, heads, q_len, kv_len, budget_bytes)
    q_chunk, kv_chunk = q_chunk or auto_q, kv_chunk or auto_kv
    scale = head_dim**-0.5 if scale is None else scale
    mask = None if attn_mask is None else _expand_mask(attn_mask, q, k)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
    out = torch.empty(batch, heads, q_len, head_dim, dtype=q.dtype, device=q.device)
    for q0 in range(0, q_len, q_chunk):
        q1 = min(q_len, q0 + q_chunk)
        qb = qh[:, :, q0:q1].float() * scale
        m = torch.full((batch, heads, q1 - q0, 1), -torch.inf, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(batch, heads, q1 - q0, head_dim, device=q.device)
        for k0 in range(0, kv_len, kv_chunk):
            k1 = min(kv_len, k0 + kv_chunk)
            s = qb @ kh[:, :, k0:k1].float().transpose(-1, -2)
            if mask is not None:
                block = mask[:, :, q0:q1, k0:k1]
                if block.dtype == torch.bool:
                    s.masked_fill_(~block, -torch.inf)
                else:
                    s.add_(block)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            # Rows with every key masked so far have m = -inf; shift by 0 to keep exp() finite.
            shift = m_new.masked_fill(m_new == -torch.inf, 0.0)
            p = s.sub_(shift).exp_()
            rescale = (m - shift).exp_()
            l.mul_(rescale).add_(p.sum(dim=-1, keepdim=True))
            acc.mul_(rescale).add_(p @ vh[:, :, k0:k1].float())
            m = m_new
        out[:, :, q0:q1] = (acc / l).to(q.dtype)
    return out.transpose(1, 2)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, attn_mask=None
) -> torch.Tensor:
    """softmax(q k^T * scale) v written out in fp32, in the [B, L, H, D] layout; for checks only."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -torch.inf) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(dim=-1), v.float()).to(q.dtype)


def _expand_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Broadcast an SDPA mask to [B, H, Lq, Lk] without copying."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
