"""Chunking switches the runtime sets on DiT blocks, and the helper a block uses to honour them.

`apply_chunking(dit.blocks, attention_chunk=..., ffn_chunk=...)` sets, on every block (and on its
`self_attn` child when it has one):
    block.ffn_chunk: int | None        tokens per FFN call (None: the whole sequence at once)
    block.attention_chunk: int | None  query rows per self-attention call (None: all at once)
A block honours them with `run_in_chunks(fn, x, chunk)`, e.g.
    y = run_in_chunks(self.ffn, h, getattr(self, "ffn_chunk", None))
    out = run_in_chunks(lambda q_rows: attention(q_rows, k, v), q, getattr(self, "attention_chunk", None))
The result is the same; only the largest intermediate (FFN hidden, attention scores) shrinks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


def apply_chunking(blocks: nn.ModuleList, *, attention_chunk: int | None, ffn_chunk: int | None) -> None:
    for block in blocks:
        block.ffn_chunk = ffn_chunk
        block.attention_chunk = attention_chunk
        if isinstance(getattr(block, "self_attn", None), nn.Module):
            block.self_attn.attention_chunk = attention_chunk


def run_in_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int | None, dim: int = 1
) -> torch.Tensor:
    """fn(x) computed over slices of at most `chunk` along `dim`, written into one output tensor.

    fn must act on each position of `dim` independently (an FFN over tokens, attention over queries).
    """
    length = x.shape[dim]
    if not chunk or length <= chunk:
        return fn(x)
    out = None
    for start in range(0, length, chunk):
        size = min(chunk, length - start)
        y = fn(x.narrow(dim, start, size))
        if out is None:
            shape = list(y.shape)
            shape[dim] = length
            out = y.new_empty(shape)
        out.narrow(dim, start, size).copy_(y)
    return out
