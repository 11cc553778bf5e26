"""The fast tier's fp8 GEMMs: the quantisation math in fp32 emulation, torch._scaled_mm's calling
convention (its CPU kernel), the DiT with its linears swapped and back, and who may have them."""

import pytest
import torch

from wanfit.hardware.probe import probe
from wanfit.models.configs import WAN_TINY
from wanfit.models.dit import Linear, WanDiT
from wanfit.runtime import fp8_linear
from wanfit.runtime.fp8_linear import FP8, FP8_MAX, Fp8Gemm, quantize_rows


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rows_are_scaled_by_their_own_largest_magnitude():
    t = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 6)[:, None]
    t[2] = 0.0  # an all-zero row stays zero and finite
    q, scale = quantize_rows(t)
    assert q.dtype == FP8 and scale.shape == (6, 1) and scale.dtype == torch.float32
    amax = t.abs().amax(dim=1)
    nonzero = amax > 0
    # Each non-zero row's largest element lands exactly on +-448, e4m3's largest finite value.
    assert torch.equal(q.float().abs().amax(dim=1)[nonzero], torch.full((5,), FP8_MAX))
    torch.testing.assert_close(scale[nonzero, 0], amax[nonzero] / FP8_MAX)
    assert torch.equal(q[2].float(), torch.zeros(32)) and torch.isfinite(scale).all()
    # e4m3 keeps 3 mantissa bits: every element within 1/16 of its magnitude, or of the scale's step.
    back = q.float() * scale
    assert ((back - t).abs() <= t.abs() / 16 + scale * 2**-9).all()
    assert not torch.equal(back, t)  # it is lossy


def test_a_row_maximum_that_rounds_past_448_stays_finite():
    t = torch.tensor([[7.2105183601379395, -1.0, 0.5]])
    scale = t.abs().amax() / FP8_MAX
    assert (t[0, 0] / scale).item() > FP8_MAX  # fp32 rounding: 448.00003, past e4m3's largest value
    q, _ = quantize_rows(t)
    assert torch.isfinite(q.float()).all() and q.float()[0, 0].item() == FP8_MAX


def make_linear(n_in=64, n_out=48, dtype=torch.float32, seed=0) -> Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=g) * torch.linspace(0.1, 3, n_out)[:, None])
        layer.bias.copy_(torch.randn(n_out, generator=g))
    return layer.to(dtype)


def test_the_emulated_gemm_is_the_dequantised_product_in_fp32():
    layer = make_linear()
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    gemm = Fp8Gemm(layer, matmul="emulated")
    q_x, s_x = quantize_rows(x.reshape(-1, 64))
    q_w, s_w = quantize_rows(layer.weight.detach())
    by_hand = (q_x.float() * s_x) @ (q_w.float() * s_w).t() + layer.bias.detach()
    out = gemm(x)
    assert out.shape == (3, 5, 48)
    torch.testing.assert_close(out.reshape(-1, 48), by_hand, rtol=1e-6, atol=1e-6)
    exact = layer(x)
    assert 1e-3 < rel_l2(out, exact) < 0.06  # lossy, by about what one fp8 GEMM costs


def test_scaled_mm_takes_the_operands_as_the_gemm_lays_them_out():
    """torch._scaled_mm's CPU kernel agrees with the emulation: the weight's column-major transpose,
    the [M, 1] and [1, N] scales, a non-contiguous input made row-major (the o projection's case)."""
    layer = make_linear(dtype=torch.bfloat16)
    x = torch.randn(2, 64, 7, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).transpose(1, 2)
    assert not x.is_contiguous()
    fast = Fp8Gemm(layer, matmul="scaled_mm")(x)
    emulated = Fp8Gemm(layer, matmul="emulated")(x)
    assert fast.dtype == torch.bfloat16 and fast.shape == (2, 7, 48)
    assert rel_l2(fast, emulated) < 1e-2  # the same fp8 operands; bf16 rounding apart
    assert fp8_linear.smoke_test("cpu") is None


def tiny_inputs(config, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, config.in_dim, 3, 6, 10, generator=g)
    return x, torch.tensor([700.0]), torch.randn(1, config.text_len, config.text_dim, generator=g)


def tiny_dit(layers: int = 2) -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(WAN_TINY.with_overrides(num_layers=layers)).eval().requires_grad_(False)


def test_every_block_linear_is_routed_and_nothing_else():
    dit = tiny_dit()
    linears = fp8_linear.block_linears(dit.blocks)
    assert len(linears) == 2 * (4 + 4 + 2)  # per block: self q k v o, cross q k v o, two FFN linears
    nbytes = fp8_linear.install(dit.blocks)
    assert nbytes == sum(m.weight.numel() + 4 * m.out_features for m in linears)
    assert all(isinstance(m.gemm, Fp8Gemm) for m in linears)
    assert dit.head.head.__class__ is torch.nn.Linear and not hasattr(dit.text_embedding[0], "gemm")
    fp8_linear.uninstall(dit.blocks)
    assert all(m.gemm is None for m in linears)


def test_the_dit_with_fp8_gemms_is_close_and_uninstalling_gives_the_exact_model_back():
    dit = tiny_dit()
    x, t, context = tiny_inputs(WAN_TINY, seed=3)
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    with torch.no_grad():
        exact = dit(x, t, context)
        fp8_linear.install(dit.blocks, matmul="emulated")
        emulated = dit(x, t, context)
        fp8_linear.uninstall(dit.blocks)
        fp8_linear.install(dit.blocks)  # torch._scaled_mm (CPU kernel)
        fast = dit(x, t, context)
        fp8_linear.uninstall(dit.blocks)
        again = dit(x, t, context)
    assert 1e-4 < rel_l2(emulated, exact) < 5e-2
    assert rel_l2(fast, emulated) < 1e-5  # fp32 results: the kernel is the emulation
    assert torch.equal(again, exact)
    assert all(torch.equal(v, state[k]) for k, v in dit.state_dict().items())  # weights never touched


def test_torch_compile_traces_the_fp8_gemms_into_one_graph_for_every_block():
    from tests.test_placement import CountingBackend
    from wanfit.runtime.compile import compile_blocks, forward_with

    torch.compiler.reset()
    dit = tiny_dit(layers=3)
    x, t, context = tiny_inputs(WAN_TINY, seed=4)
    backend = CountingBackend()
    with torch.no_grad():
        fp8_linear.install(dit.blocks, matmul="emulated")
        eager = dit(x, t, context)
        blocks = compile_blocks(dit.blocks, backend=backend)
        compiled = forward_with(dit, blocks, x, t, context)
        graphs = backend.graphs
        forward_with(dit, blocks, x, t, context)
    assert torch.equal(compiled, eager)
    # One set of graphs (split at the opaque attention calls) serves all three blocks: the blocks'
    # distinct Fp8Gemm objects do not force a recompile each.
    assert graphs == backend.graphs and 0 < graphs <= 8


@pytest.mark.parametrize(
    "card, reason",
    [
        ("cpu", "this machine runs on the CPU"),
        ("t4", "the Tesla T4 is sm_75"),
        ("a100", "is sm_80"),
        ("h100", None),
        ("rtx4090", None),
    ],
)
def test_who_gets_the_fast_tier(card, reason):
    hw = probe(emulate=card)
    found = fp8_linear.fp8_gemm_reason(hw)
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found and found.endswith(".")
        assert "compute capability 8.9 or newer" in found


def test_padded_rows_give_the_same_product():
    """For a kernel that takes only multiples of 16 rows: zero rows padded in, sliced off again."""
    layer = make_linear(dtype=torch.bfloat16)
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    for matmul in ("emulated", "scaled_mm"):
        plain = Fp8Gemm(layer, matmul=matmul)(x)
        padded = Fp8Gemm(layer, matmul=matmul, row_multiple=16)(x)
        assert padded.shape == (37, 48) and torch.equal(padded, plain)


def test_the_kernel_probe_pads_rows_only_when_any_count_is_refused(monkeypatch):
    calls = []

    def refuses_odd_counts(device, rows, row_multiple=1):
        calls.append((rows, row_multiple))
        return "torch._scaled_mm raised RuntimeError: rows" if rows % 16 else None

    monkeypatch.setattr(fp8_linear, "_check_gemm", refuses_odd_counts)
    fp8_linear.probe_kernel.cache_clear()
    try:
        assert fp8_linear.probe_kernel("meta-device") == (None, 16)
        assert calls == [(40, 1), (48, 16)]
        monkeypatch.setattr(fp8_linear, "_check_gemm", lambda *a, **k: "torch._scaled_mm raised X: no")
        assert fp8_linear.probe_kernel("other-device") == ("torch._scaled_mm raised X: no", 1)
    finally:
        fp8_linear.probe_kernel.cache_clear()
