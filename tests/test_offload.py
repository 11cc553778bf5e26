"""Block streaming on the CPU: resident set, fetch order, bounded device copies, equal outputs."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wanfit.models.dit import run_in_chunks
from wanfit.plan.plan import Plan
from wanfit.runtime.chunking import apply_chunking
from wanfit.runtime.offload import BlockStreamer, resident_indices
from wanfit.runtime.placement import DiTPlacement


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.register_buffer("scale", torch.rand(dim) + 0.5)

    def forward(self, x, context=None):
        y = self.fc2(F.gelu(self.fc1(x))) * self.scale
        if context is not None:
            y = y + context.mean()
        return x + y


class ToyModel(nn.Module):
    """Shaped like WanDiT: non-block modules around an nn.ModuleList `blocks` looped in forward."""

    def __init__(self, dim: int = 16, n: int = 6):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(n))
        self.head = nn.Linear(dim, dim)

    def forward(self, x, context):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, context=context)
        return self.head(x)


def _model(n=6):
    torch.manual_seed(0)
    return ToyModel(n=n)


def test_resident_indices_spread_evenly():
    assert resident_indices(6, 2) == [1, 4]
    assert resident_indices(30, 3) == [5, 15, 25]
    assert resident_indices(5, 0) == []
    assert resident_indices(4, 9) == [0, 1, 2, 3]


def test_streaming_equals_resident_and_fetches_in_order():
    model = _model()
    reference = copy.deepcopy(model)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = reference(x, ctx)
        streamer = BlockStreamer(model.blocks, "cpu", resident=2, record=True)
        assert streamer.resident == [1, 4] and streamer.streamed == [0, 2, 3, 5]
        # Streamed blocks hold placeholders between calls; resident ones hold their weights.
        assert model.blocks[0].fc1.weight.numel() == 0 and model.blocks[0].scale.numel() == 0
        assert model.blocks[1].fc1.weight.numel() == 16 * 32
        first = model(x, ctx)
        second = model(x, ctx)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    # Each streamed block is copied in before use and released after; the next streamed block is
    # fetched as soon as one is done (while the resident blocks run), and the last one of a call
    # prefetches the first of the next call, so the second call starts without a fetch.
    cycle = [("use", 0), ("release", 0)]
    for i in (2, 3, 5):
        cycle += [("fetch", i), ("use", i), ("release", i)]
    cycle += [("fetch", 0)]
    assert streamer.events == [("fetch", 0)] + cycle + cycle
    assert streamer.max_streamed_on_device <= 2
    assert model.blocks[3].fc2.weight.numel() == 0  # released after use


def test_detach_restores_the_weights():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    streamer = BlockStreamer(model.blocks, "cpu", resident=1)
    with torch.no_grad():
        model(torch.randn(1, 4, 16), torch.randn(1, 2, 16))
    streamer.detach()
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert not model.blocks[0]._forward_hooks and not model.blocks[0]._forward_pre_hooks


def test_fp8_storage_is_close_and_halves_bytes():
    model = _model()
    reference = copy.deepcopy(model).to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    x, ctx = torch.randn(2, 5, 16, dtype=torch.bfloat16), torch.randn(2, 3, 16, dtype=torch.bfloat16)
    streamer = BlockStreamer(model.blocks, "cpu", resident=3, fp8=True)
    slots = streamer._slots[0]
    stored = {s.name: s.stored.dtype for s in slots if s.module is model.blocks[0].fc1}
    assert stored["weight"] == torch.float8_e4m3fn and stored["bias"] == torch.bfloat16
    with torch.no_grad():
        got, want = model(x, ctx).float(), reference(x, ctx).float()
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < 0.05
    assert model.blocks[1].fc1.weight.numel() == 0  # resident fp8 blocks upcast per call only


def test_a_failed_call_leaves_nothing_behind():
    model = _model()
    reference = copy.deepcopy(model)
    streamer = BlockStreamer(model.blocks, "cpu", resident=1, record=True)
    calls = {"n": 0}

    def explode(module, args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = model.blocks[3].register_forward_pre_hook(explode)
    x, ctx = torch.randn(1, 4, 16), torch.randn(1, 2, 16)
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError):
        model(x, ctx)
    with torch.no_grad():
        got = model(x, ctx)
        want = reference(x, ctx)
    handle.remove()
    assert torch.equal(got, want)
    assert streamer.max_streamed_on_device <= 2


def test_the_dit_placement_streams_and_sets_chunking():
    model = _model()
    reference = copy.deepcopy(model)
    x, ctx = torch.randn(1, 7, 16), torch.randn(1, 2, 16)
    placement = DiTPlacement(model)
    placement.place(Plan(device="cpu", dit_blocks_resident=2, ffn_chunk=64, attention_chunk=32))
    streamer = placement.streamer
    assert isinstance(streamer, BlockStreamer) and streamer.resident == [1, 4]
    assert all(b.ffn_chunk == 64 and b.attention_chunk == 32 for b in model.blocks)
    placement.place(Plan(device="cpu", dit_blocks_resident=2))
    assert placement.streamer is streamer  # the same placement: only the chunking changed
    assert model.blocks[0].ffn_chunk is None
    with torch.no_grad():
        assert torch.equal(model(x, ctx), reference(x, ctx))
    placement.place(Plan(device="cpu"))  # back to resident
    assert placement.streamer is None and model.blocks[0].fc1.weight.numel() == 16 * 32
    placement.release()
    assert placement.layout is None
    with torch.no_grad():
        assert torch.equal(model(x, ctx), reference(x, ctx))


def test_run_in_chunks_equals_whole():
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(2, 13, 8)
    with torch.no_grad():
        whole = ffn(x)
        assert torch.allclose(run_in_chunks(ffn, x, 4), whole, atol=1e-6)
        assert torch.allclose(run_in_chunks(ffn, x, None), whole)
    blocks = nn.ModuleList([nn.Module(), nn.Module()])
    blocks[0].self_attn = nn.Linear(2, 2)
    apply_chunking(blocks, attention_chunk=128, ffn_chunk=None)
    assert blocks[0].self_attn.attention_chunk == 128 and blocks[1].attention_chunk == 128
