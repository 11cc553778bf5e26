"""Memory and pass switches the runtime sets on DiT blocks (the plan's attention_chunk, ffn_chunk,
ffn_gelu_in_place, ffn_gelu_epilogue and residual_in_place).

`apply_chunking(dit.blocks, attention_chunk=..., ffn_chunk=..., ffn_gelu_in_place=...,
ffn_gelu_epilogue=..., residual_in_place=...)` sets, on every block:
    block.ffn_chunk: int | None        tokens per FFN call (None: the whole sequence at once)
    block.ffn_gelu_in_place: bool      the FFN's GELU over ffn.0's output (inference only)
    block.ffn_gelu_epilogue: bool      the FFN's GELU inside ffn.0's GEMM (inference only; CUDA)
    block.residual_in_place: bool      the residual updates over the block's input (inference only)
    block.self_attn.attention_chunk    query rows per self-attention call (None: all at once); on the
                                       block itself when it has no `self_attn` child
The blocks honour them (wanfit.models.dit.run_in_chunks, WanBlock.feed_forward): the result is the
same (the epilogue: within rounding); only the largest intermediate (FFN hidden, attention
workspace) shrinks, or a pass over it goes.
"""

from __future__ import annotations

import torch.nn as nn


def apply_chunking(
    blocks: nn.ModuleList,
    *,
    attention_chunk: int | None,
    ffn_chunk: int | None,
    ffn_gelu_in_place: bool = False,
    ffn_gelu_epilogue: bool = False,
    residual_in_place: bool = False,
) -> None:
    for block in blocks:
        block.ffn_chunk = ffn_chunk
        if hasattr(block, "ffn_gelu_in_place"):
            block.ffn_gelu_in_place = ffn_gelu_in_place
        if hasattr(block, "ffn_gelu_epilogue"):
            block.ffn_gelu_epilogue = ffn_gelu_epilogue
        if hasattr(block, "residual_in_place"):
            block.residual_in_place = residual_in_place
        attention = block.self_attn if isinstance(getattr(block, "self_attn", None), nn.Module) else block
        attention.attention_chunk = attention_chunk
