"""Chunking switches the runtime sets on DiT blocks (the plan's attention_chunk and ffn_chunk).

`apply_chunking(dit.blocks, attention_chunk=..., ffn_chunk=...)` sets, on every block (and on its
`self_attn` child when it has one):
    block.ffn_chunk: int | None        tokens per FFN call (None: the whole sequence at once)
    block.attention_chunk: int | None  query rows per self-attention call (None: all at once)
The blocks honour them with wanfit.models.dit.run_in_chunks: the result is the same; only the
largest intermediate (FFN hidden, attention workspace) shrinks.
"""

from __future__ import annotations

import torch.nn as nn


def apply_chunking(blocks: nn.ModuleList, *, attention_chunk: int | None, ffn_chunk: int | None) -> None:
    for block in blocks:
        block.ffn_chunk = ffn_chunk
        block.attention_chunk = attention_chunk
        if isinstance(getattr(block, "self_attn", None), nn.Module):
            block.self_attn.attention_chunk = attention_chunk
