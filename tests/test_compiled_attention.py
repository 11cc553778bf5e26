"""Attention inside compiled blocks: one opaque op of the block's graph, run by the model's dispatcher."""

import torch

import wanfit.attention as wa
from wanfit.attention import Dispatcher
from wanfit.hardware import probe
from wanfit.models.configs import WAN_TINY
from wanfit.models.dit import WanDiT
from wanfit.runtime.compile import compile_blocks, forward_with


class CountingBackend:
    """aot_eager, counting the graphs dynamo hands it and the attention ops in them."""

    def __init__(self):
        from torch._dynamo.backends.registry import lookup_backend

        self.inner, self.graphs, self.attention_ops = lookup_backend("aot_eager"), 0, 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        self.attention_ops += sum(
            node.target is torch.ops.wanfit.attention.default for node in graph.graph.nodes
        )
        return self.inner(graph, example_inputs)


class CountingDispatcher(Dispatcher):
    def __init__(self):
        super().__init__(probe())
        self.calls = 0

    def __call__(self, q, k, v, *, scale=None, attn_mask=None):
        self.calls += 1
        return super().__call__(q, k, v, scale=scale, attn_mask=attn_mask)


def _dit_and_inputs(layers: int):
    torch.manual_seed(0)
    config = WAN_TINY.with_overrides(num_layers=layers)
    dit = WanDiT(config).eval().requires_grad_(False)
    x = torch.randn(1, config.in_dim, 3, 8, 8)
    t = torch.tensor([500.0])
    context = torch.randn(1, 7, config.text_dim)
    return dit, (x, t, context)


def eager_then_compiled_twice(dit, inputs, backend):
    """The DiT's eager output, then two forwards with its blocks compiled by `backend`."""
    torch.compiler.reset()
    blocks = compile_blocks(dit.blocks, backend=backend)
    with torch.no_grad():
        outs = dit(*inputs), forward_with(dit, blocks, *inputs), forward_with(dit, blocks, *inputs)
    torch.compiler.reset()
    return outs


def test_compiled_blocks_are_one_graph_with_attention_inside_and_give_the_eager_output():
    # 12 blocks, more than dynamo's recompile limit: with a graph break at attention each block was
    # three graphs, and self- and cross-attention's shapes recompiled the attention frame.
    dit, inputs = _dit_and_inputs(12)
    dispatcher = CountingDispatcher()
    dit.set_attention_dispatchers(dispatcher, dispatcher)
    backend = CountingBackend()
    eager, compiled, again = eager_then_compiled_twice(dit, inputs, backend)
    assert backend.graphs == 1 and backend.attention_ops == 2  # self- and cross-attention, in the graph
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-5)
    # The model's own dispatcher ran every call of both compiled forwards, not the process-wide one.
    assert dispatcher.calls == 3 * 24  # 12 blocks x (self, cross) per forward


def test_a_model_without_a_dispatcher_uses_the_process_wide_one_when_compiled():
    dit, inputs = _dit_and_inputs(2)
    wa.reset()
    process_wide = wa.configure(probe())
    seen = []
    original = type(process_wide).__call__

    def counting(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    torch.compiler.reset()
    try:
        type(process_wide).__call__ = counting
        with torch.no_grad():
            eager = dit(*inputs)
            compiled = forward_with(dit, compile_blocks(dit.blocks, backend="aot_eager"), *inputs)
    finally:
        type(process_wide).__call__ = original
        torch.compiler.reset()
        wa.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert len(seen) == 8 and all(d is process_wide for d in seen)


def test_a_dispatcher_without_a_key_runs_outside_the_graph_at_every_compiled_call():
    # Ulysses' wrapper and test doubles carry no Dispatcher.key: attention then breaks the graph and
    # runs eagerly (torch.compiler.disable, wrapped at the call so an eager process never loads dynamo).
    dit, inputs = _dit_and_inputs(2)
    inner = CountingDispatcher()
    calls = []

    def keyless(q, k, v, *, scale=None, attn_mask=None):
        calls.append(q.shape)
        return inner(q, k, v, scale=scale, attn_mask=attn_mask)

    dit.set_attention_dispatchers(keyless, keyless)
    backend = CountingBackend()
    eager, compiled, again = eager_then_compiled_twice(dit, inputs, backend)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-5)
    assert len(calls) == 3 * 4  # 2 blocks x (self, cross) per forward, every one run outside
    assert backend.attention_ops == 0 and backend.graphs > 1  # not in the graphs: broken around it
