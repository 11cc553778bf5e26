"""Replaying the DiT's compiled blocks as CUDA graphs, as the Plan says (cuda_graph; where it can
apply is Plan.cuda_graph_blocker, the one rule).

A compiled 1.3B forward on an H200 (32,760 tokens) spends ~504 ms on the device but ~525 ms of wall
time: the rest are gaps between kernels while the host launches them. A graph launches the whole
block loop at once. It replays fixed kernels on fixed addresses, so each input shape gets its own
graph with static input buffers: a call copies its inputs in, replays, and returns the static output.
That output is overwritten by the next replay of its graph; the callers (the placement's forward,
bench_dit's) hand it to the DiT's head, which writes a new tensor, before anything replays again, so
it is not cloned.

Memory: a graph's private pool keeps the forward's activations from its capture on, as reserved
memory (max_memory_allocated does not count them during a replay: compare max_memory_reserved). The
peak should equal the compiled forward's plus the static inputs (a [B, L, dim] copy of the tokens, e
and the context); bench_dit.py --compile --cuda-graph measures it. At most `max_graphs` are kept, the
least recently used dropped first: batch 2 (CFG batched) and batch 1.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from wanfit.errors import WanfitWarning

# torch.cuda.graph wants the code warmed up on a side stream first (lazy inits, cuBLAS workspaces,
# the compile itself), so that nothing the capture records allocates or syncs for the first time.
WARMUP_ITERATIONS = 2


class CudaGraphOps:
    """torch.cuda's graph calls, the one seam a test replaces (tests/test_cuda_graph.py fakes it)."""

    def warm_up(self, fn: Callable[[], torch.Tensor], iterations: int, device: torch.device) -> None:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(iterations):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)

    def capture(self, fn: Callable[[], torch.Tensor], device: torch.device):
        """(a graph with .replay(), the output tensor its replays write)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph):
            out = fn()
        # The warm-up's activations sit cached for its side stream, which nothing uses again: without
        # this they would stay reserved beside the graph's own pool (a second forward's worth).
        torch.cuda.empty_cache()
        return graph, out


@dataclass
class _Graph:
    graph: object
    tokens: torch.Tensor  # the static inputs the graph reads
    e: torch.Tensor
    context: torch.Tensor
    rope: torch.Tensor  # kept alive: the graph reads it where it was (its identity is in the key)
    out: torch.Tensor


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype


class GraphedBlocks:
    """CompiledBlocks.run over the whole loop, replayed from one CUDA graph per input key.

    The key: the tokens' shape, strides, dtype and device, e's and the context's, and the RoPE tensor's
    identity (the DiT caches one per grid). A capture that raises leaves that key on the plain compiled
    run, with one warning (`failures` says why); out of memory is the OOM guard's and raises. Errors
    of the compiled blocks themselves (in the warm-up) raise for the placement's compile fallback.
    """

    def __init__(
        self,
        blocks,
        *,
        max_graphs: int = 2,
        ops: CudaGraphOps | None = None,
        failures: dict[tuple, str] | None = None,
    ):
        self.blocks = blocks  # a wanfit.runtime.compile.CompiledBlocks
        self.max_graphs = max_graphs
        self.ops = ops or CudaGraphOps()
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        # key -> why its capture failed; the owner's dict when given, so a new runner remembers them.
        self.failures: dict[tuple, str] = {} if failures is None else failures
        self.captures = 0
        self.replays = 0

    @staticmethod
    def key(tokens: torch.Tensor, inputs) -> tuple:
        rope = inputs.rope
        return (
            _layout(tokens),
            str(tokens.device),
            _layout(inputs.e),
            _layout(inputs.context),
            (id(rope), rope.data_ptr(), _layout(rope)),
        )

    def run(self, tokens: torch.Tensor, inputs) -> torch.Tensor:
        """The blocks over `tokens`: replayed (captured first for a new key), or run plainly where a
        graph cannot be (autograd on, a key whose capture failed)."""
        if torch.is_grad_enabled():  # a graph would record no backward
            return self.blocks.run(tokens, inputs)
        key = self.key(tokens, inputs)
        if key in self.failures:
            return self.blocks.run(tokens, inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, tokens, inputs)
            if entry is None:
                return self.blocks.run(tokens, inputs)
        self.graphs.move_to_end(key)
        entry.tokens.copy_(tokens)
        entry.e.copy_(inputs.e)
        entry.context.copy_(inputs.context)
        entry.graph.replay()
        self.replays += 1
        return entry.out

    def _capture(self, key: tuple, tokens: torch.Tensor, inputs) -> _Graph | None:
        while len(self.graphs) >= self.max_graphs:  # its pool freed before the new one fills
            self.graphs.popitem(last=False)
        static = SimpleNamespace(
            e=torch.empty_like(inputs.e), context=torch.empty_like(inputs.context), rope=inputs.rope
        )
        static_tokens = torch.empty_like(tokens)
        for buffer, value in ((static_tokens, tokens), (static.e, inputs.e), (static.context, inputs.context)):
            buffer.copy_(value)  # the warm-up computes on real values (no NaNs from empty memory)

        def blocks() -> torch.Tensor:
            return self.blocks.run(static_tokens, static)

        self.ops.warm_up(blocks, WARMUP_ITERATIONS, tokens.device)
        try:
            graph, out = self.ops.capture(blocks, tokens.device)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            lines = str(err).strip().splitlines()
            why = f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__
            self.failures[key] = why
            warnings.warn(
                f"wanfit: capturing the DiT's blocks as a CUDA graph failed ({why}); they run compiled "
                "without one for this shape.",
                WanfitWarning,
                stacklevel=4,
            )
            return None
        self.captures += 1
        entry = _Graph(graph, static_tokens, static.e, static.context, static.rope, out)
        self.graphs[key] = entry
        return entry

    def clear(self) -> None:
        """Drop every graph (their pools go with them); failures are remembered."""
        self.graphs.clear()
