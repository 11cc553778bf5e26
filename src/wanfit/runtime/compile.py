"""Compiling the DiT's blocks with torch.compile, as the Plan says (compile_dit: the planner turns it
on when it pays, wanfit.plan.compile_costs, and always for the fast tier).

Inductor fuses each block's LayerNorms, modulation, RMSNorms, RoPE and gated residuals into a few
kernels, and the fast tier's activation quantisation into the op before each fp8 GEMM; eager
PyTorch runs each as separate passes over a [L, dim] fp32 tensor. Attention is one opaque op in
the graph (wanfit::attention), so the dispatcher still chooses the kernel when it runs and no graph
breaks there. All blocks share that one graph, so the compile cost is paid once per shape.

The blocks themselves are never changed: `compile_blocks` returns one compiled callable per block,
and `forward_with` runs the DiT through them. Dropping the callables
is all it takes to run eagerly again (the placement does that when the plan streams the DiT).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn


class CompiledBlocks:
    """One compiled callable per block, run in order as WanDiT.run_blocks runs its blocks.

    The calls are traced with guards on the modules' hooks: by default dynamo skips them, so a hook
    added after the first call (the pipeline's per-block progress hook) would silently not run; with
    the guards, adding or removing one traces the block again. (A LoRA's runtime branch needs no hook
    guard: it sits in the block Linears' `low_rank` slot, an attribute dynamo guards anyway.) The guard setting is patched around each run of
    the blocks, not process-wide (a user's own compiles keep torch's default), and once per run, not
    per block (it costs microseconds).
    """

    def __init__(self, callables: Sequence[Callable]):
        self.callables = list(callables)

    def __len__(self) -> int:
        return len(self.callables)

    def run(self, tokens: torch.Tensor, inputs, start: int = 0, end: int | None = None) -> torch.Tensor:
        import torch._dynamo.config as dynamo_config

        with dynamo_config.patch(skip_nnmodule_hook_guards=False):
            for block in self.callables[start:end]:
                tokens = block(tokens, inputs.e, inputs.context, inputs.rope)
        return tokens


def compile_blocks(blocks: Sequence[nn.Module], *, dynamic: bool = False, **options) -> CompiledBlocks:
    """A torch.compile'd callable per block (static shapes by default); `options` go to torch.compile.

    The blocks' bound `__call__` is compiled, not the module: torch.compile(module) marks the module
    itself, and nothing of the runtime's may stay on a model.
    """
    return CompiledBlocks([torch.compile(block.__call__, dynamic=dynamic, **options) for block in blocks])


def forward_with(
    dit: nn.Module, blocks: CompiledBlocks, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """`dit(x, timestep, context)` with its blocks run through `blocks` (WanDiT's embed / unembed around
    them)."""
    inputs = dit.embed(x, timestep, context)
    return dit.unembed(blocks.run(inputs.tokens, inputs), inputs)
