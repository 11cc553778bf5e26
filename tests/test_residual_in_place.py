"""Plan.residual_in_place: the DiT blocks write their residual updates over their input. The same bits
eagerly, one fp32 stream less at the peak, two graphs per compiled block, and a compile given up part
way runs the forward again from its embedding. (The step caches' tests run on a placed pipeline, whose
blocks are in place: tests/test_step_cache.py.)"""

from dataclasses import replace

import pytest
import torch

from tests.helpers.compile_backends import CountingBackend
from tests.helpers.live_bytes import LiveBytes
from wanfit.models.configs import WAN_TINY, DiTConfig
from wanfit.models.dit import WanDiT
from wanfit.plan.plan import Plan
from wanfit.runtime.chunking import apply_chunking
from wanfit.runtime.placement import DiTPlacement

# The 1.3B's FFN ratio (8960 / 1536), so the FFN is where a forward peaks.
RATIO = DiTConfig(dim=96, ffn_dim=560, freq_dim=32, num_heads=4, num_layers=3, text_dim=32, text_len=16)


def inputs(config=WAN_TINY, grid=(3, 6, 10)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, config.in_dim, *grid, generator=g)
    return x, torch.tensor([700.0]), torch.randn(1, config.text_len, config.text_dim, generator=g)


def model(config=WAN_TINY) -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(config).eval().requires_grad_(False)


def set_in_place(dit: WanDiT, on: bool) -> None:
    apply_chunking(
        dit.blocks, attention_chunk=None, ffn_chunk=None, ffn_gelu_in_place=True, residual_in_place=on
    )


def test_a_block_in_place_gives_the_same_bits_and_returns_its_input():
    dit = model()
    set_in_place(dit, False)
    x, t, context = inputs()
    with torch.no_grad():
        kept = dit(x, t, context)
        embedded = dit.embed(x, t, context)
        tokens = embedded.tokens.clone()
        out = dit.blocks[0](tokens, embedded.e, embedded.context, embedded.rope)
        assert out is not tokens and torch.equal(tokens, embedded.tokens)  # off: the input is kept
        set_in_place(dit, True)
        written = dit.blocks[0](tokens, embedded.e, embedded.context, embedded.rope)
        assert written is tokens and torch.equal(tokens, out)  # on: the same values, over the input
        assert torch.equal(dit(x, t, context), kept)


def test_under_autograd_the_block_keeps_its_input_and_trains():
    dit = model().requires_grad_(True).train()
    set_in_place(dit, True)
    x, t, context = inputs()
    embedded = dit.embed(x, t, context)
    before = embedded.tokens.detach().clone()
    out = dit.blocks[0](embedded.tokens, embedded.e, embedded.context, embedded.rope)
    assert out is not embedded.tokens and torch.equal(embedded.tokens.detach(), before)
    out.sum().backward()
    assert dit.blocks[0].ffn[0].weight.grad is not None


def test_the_forward_peak_holds_fewer_fp32_streams():
    """Off: the embedded tokens (the loop's start), the block's input and its update; on: one stream. (On
    the H200 the 1.3B's peak went down by two: benchmarks/memory_peak.py; on this fp32 CPU path the
    self-attention's RoPE stage, one stream lower, becomes the peak.)"""
    dit = model(RATIO)
    x, t, context = inputs(RATIO, grid=(2, 16, 16))
    peaks = {}
    for on in (False, True):
        set_in_place(dit, on)
        with torch.no_grad(), LiveBytes() as live:
            dit(x, t, context)
        peaks[on] = live.peak
    stream = (2 * 8 * 8) * RATIO.dim * 4  # fp32 [1, L, dim], L = 2 x 8 x 8 patches
    assert peaks[False] - peaks[True] >= stream


def placed(plan: Plan, backend) -> DiTPlacement:
    torch.compiler.reset()
    placement = DiTPlacement(model(), compile_options={"backend": backend})
    placement.place(plan)
    return placement


@pytest.mark.parametrize("on, graphs", [(False, 1), (True, 2)])
def test_compiled_blocks_in_place_run_as_two_graphs_and_give_the_eager_bits(on, graphs):
    x, t, context = inputs()
    eager = model()
    set_in_place(eager, on)
    with torch.no_grad():
        expected = eager(x, t, context)
    backend = CountingBackend()
    placement = placed(Plan(compile_dit=True, residual_in_place=on), backend)
    assert all(b.residual_in_place is on for b in placement.dit.blocks)
    with torch.no_grad():
        out = placement(x, t, context)
    assert backend.graphs == graphs  # the blocks share their graphs: the attention part and the FFN part
    assert torch.equal(out, expected)


def test_a_compile_given_up_after_the_first_graph_runs_the_forward_again_from_its_embedding():
    """The FFN graph fails to compile after the attention graph wrote over block 0's input: the forward
    starts again, eagerly, from the latents, and gives the eager bits."""
    x, t, context = inputs()
    eager = model()
    with torch.no_grad():
        expected = eager(x, t, context)
    placement = placed(Plan(compile_dit=True), CountingBackend(fail_at=2))
    with torch.no_grad():
        out = placement(x, t, context)
    assert "compile" in placement.failures and placement.compiled_blocks is None
    assert torch.equal(out, expected)


def test_the_layout_follows_the_plan_and_can_be_switched_off():
    placement = placed(Plan(), CountingBackend())
    assert placement.layout.residual_in_place and all(b.residual_in_place for b in placement.dit.blocks)
    placement.place(replace(Plan(), residual_in_place=False))
    assert not any(b.residual_in_place for b in placement.dit.blocks)
    assert Plan().residual_in_place  # the default
