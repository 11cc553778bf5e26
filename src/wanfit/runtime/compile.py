"""Compiling the DiT's blocks with torch.compile: the runtime's choice, recorded in the Plan.

Inductor fuses each block's LayerNorms, modulation, RMSNorms, RoPE and gated residuals into a few
kernels; eager PyTorch runs each as separate passes over a [L, dim] fp32 tensor. Attention stays
outside the compiled graph (wanfit.attention is opaque to dynamo), so the dispatcher still
chooses the kernel. All blocks share one graph, so the compile cost is paid once per shape.
"""

from __future__ import annotations

import torch


def compile_blocks(dit: torch.nn.Module, *, mode: str | None = None) -> torch.nn.Module:
    """Compile every block of `dit.blocks` in place (static shapes) and return `dit`."""
    for block in dit.blocks:
        block.compile(dynamic=False, mode=mode)
    return dit


def set_compiled(dit: torch.nn.Module, enabled: bool) -> None:
    """Compile the blocks, or return them to eager (e.g. when the plan steps down to streaming)."""
    compiled = getattr(dit.blocks[0], "_compiled_call_impl", None) is not None if len(dit.blocks) else False
    if enabled and not compiled:
        compile_blocks(dit)
    elif not enabled and compiled:
        for block in dit.blocks:
            block._compiled_call_impl = None
