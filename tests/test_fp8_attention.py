"""flash_attn3_fp8, the fast tier's FA3 float8 attention (wanfit.attention.fp8_attention): the operands it
makes (per-head e4m3 with descales, K smoothed) against the tensors they stand for, its result through
a stand-in for FA3's kernel that checks what FA3 takes, and who may choose it. FA3 itself runs only on
Hopper; its numbers against its own reference are measured by benchmarks/bench_int8_attention.py."""

from types import SimpleNamespace

import pytest
import torch

from tests.helpers.hardware import emulated
from tests.helpers.interpreted import run_interpreted
from wanfit.attention import backends
from wanfit.attention.chunked import reference_attention
from wanfit.attention.dispatch import Dispatcher
from wanfit.attention.fp8_attention import fp8_attention, quantize_per_head, quantize_qkv, reference
from wanfit.plan.planning import Constraints, model_request, plan_for
from wanfit.precision import FP8_MAX, FP8_STORAGE_DTYPE


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def qkv(lq: int, lk: int, d: int = 128, *, heads: int = 2, batch: int = 1, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, n, heads, d, generator=g).to(dtype) for n in (lq, lk, lk))


def fa3_stand_in(calls: list):
    """What FA3's fp8 flash_attn_func computes, bar P's rounding: it checks its operands as FA3
    requires them (e4m3, [B, L, H, D], fp32 descales [B, H]) and returns bf16, as FA3 does."""

    def flash_attn_func(q, k, v, *, softmax_scale=None, q_descale=None, k_descale=None, v_descale=None):
        b, _, h, _ = q.shape
        for t in (q, k, v):
            assert t.dtype == FP8_STORAGE_DTYPE and t.dim() == 4
        for d in (q_descale, k_descale, v_descale):
            assert d.dtype == torch.float32 and tuple(d.shape) == (b, h)
        calls.append(softmax_scale)
        q32, k32, v32 = (t.float() * d[:, None, :, None] for t, d in ((q, q_descale), (k, k_descale), (v, v_descale)))
        return reference_attention(q32, k32, v32, scale=softmax_scale).to(torch.bfloat16), None

    return flash_attn_func


def test_each_head_is_quantised_to_e4m3_with_its_own_descale():
    x = torch.randn(2, 300, 3, 64, dtype=torch.bfloat16)
    x[:, :, 1] *= 50.0  # a head of a much larger range: its scale must not spoil the others'
    q8, descale = quantize_per_head(x)
    assert q8.dtype == FP8_STORAGE_DTYPE and q8.shape == x.shape and descale.shape == (2, 3)
    # Each (batch, head)'s largest magnitude lands on e4m3's largest value, whatever the other heads' range.
    assert torch.equal(q8.float().abs().amax(dim=(1, 3)), torch.full((2, 3), FP8_MAX))
    back = q8.float() * descale[:, None, :, None]
    for h in range(3):
        assert rel_l2(back[:, :, h], x[:, :, h]) < 0.04  # 3 mantissa bits: ~2.5% on normal data
    amax = x.float().abs().amax(dim=(1, 3))[:, None, :, None]
    # At most half an e4m3 step at the top (16 of 448).
    assert ((back - x.float()).abs() <= amax * (16 / 448) * (1 + 1e-5)).all()


def test_smoothing_k_takes_out_its_token_mean_and_the_error_of_a_common_offset():
    q, k, v = qkv(256, 256, 64, seed=1)
    k = k + (4.0 * torch.randn(64)).to(k.dtype)  # a per-channel offset shared by every token
    k8, dk = quantize_per_head(k, smooth=True)
    smoothed = k8.float() * dk[:, None, :, None]
    assert smoothed.mean(dim=1).abs().max() < 0.05
    want = reference_attention(q.float(), k.float(), v.float())
    got = reference(q, k, v)
    deq = [t.float() * d[:, None, :, None] for t, d in (quantize_per_head(x) for x in (q, k, v))]
    unsmoothed = reference_attention(*deq)
    assert rel_l2(got, want) < 0.06 and rel_l2(unsmoothed, want) > 1.5 * rel_l2(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_kernel_gets_fa3s_operands_and_its_result_is_close_to_exact_attention(dtype):
    calls = []
    q, k, v = qkv(200, 120, 128, heads=3, batch=2, dtype=dtype)
    out = fp8_attention(q, k, v, kernel=fa3_stand_in(calls))
    assert out.dtype == dtype and out.shape == q.shape and calls == [None]
    exact = reference_attention(q.float(), k.float(), v.float())
    assert rel_l2(out, exact) < 0.06
    assert rel_l2(out, reference(q, k, v)) < 1e-2  # the stand-in is the reference's math, in bf16 out
    # The softmax scale reaches the kernel.
    scaled = fp8_attention(q, k, v, scale=0.05, kernel=fa3_stand_in(calls))
    assert calls[-1] == 0.05 and rel_l2(scaled, reference_attention(q.float(), k.float(), v.float(), scale=0.05)) < 0.06


def test_the_reference_of_the_first_rows_keeps_qs_scale_from_all_of_them():
    q, k, v = qkv(64, 64, 64, seed=3)
    q[:, 40:] *= 20.0  # later rows set q's scale
    (_, _, _), (dq, _, _) = quantize_qkv(q, k, v)
    assert torch.allclose(reference(q, k, v, rows=16), reference(q, k, v)[:, :16])
    assert torch.allclose(dq, q.float().abs().amax(dim=(1, 3)) / FP8_MAX, rtol=1 / 128)


def test_the_triton_kernels_quantise_as_the_torch_path_does():
    got = run_interpreted(
        "fp8_interpreted.py",
        "Triton is not installed (CI does not install it): the kernels run only under its interpreter here",
    )
    assert got["mean_max_diff"] < 1e-5 and got["min_max_diff"] == 0 and got["max_max_diff"] == 0
    for tag in ("plain", "smooth"):
        assert got[f"{tag}_dtype"] == "torch.float8_e4m3fn" and got[f"{tag}_contiguous"]
        assert got[f"{tag}_descale_rel"] < 1e-6
        assert got[f"{tag}_mismatched"] < 0.05 and got[f"{tag}_mismatches_within_a_step"]


# --- who may choose it -----------------------------------------------------------------------------


@pytest.fixture
def fa3_installed(monkeypatch):
    """flash_attn_interface counts as installed, with the stand-in as its kernel."""
    calls = []
    real_reason, real_import = backends.import_reason, backends._import
    monkeypatch.setattr(
        backends, "import_reason", lambda m, p: None if m == "flash_attn_interface" else real_reason(m, p)
    )
    fake = SimpleNamespace(flash_attn_func=fa3_stand_in(calls))
    monkeypatch.setattr(backends, "_import", lambda m: fake if m == "flash_attn_interface" else real_import(m))
    return calls


def test_the_registry_entry_runs_the_kernel_and_refuses_a_mask(fa3_installed):
    entry = backends.default_registry()["flash_attn3_fp8"]
    assert not entry.exact and entry.min_capability == (9, 0)
    q, k, v = qkv(50, 50, 128)
    out = entry.run(q, k, v, scale=0.1)
    assert fa3_installed == [0.1] and rel_l2(out, reference_attention(q.float(), k.float(), v.float(), scale=0.1)) < 0.06
    with pytest.raises(ValueError, match="no attention mask"):
        entry.run(q, k, v, attn_mask=torch.ones(1, 1, 50, 50, dtype=torch.bool))


def test_only_hopper_takes_it_and_only_where_lossy_kernels_may_compete(fa3_installed):
    call = Dispatcher(emulated("h100")).call_on_probe(torch.bfloat16, 32760)
    exact = Dispatcher(emulated("h100")).candidate("flash_attn3_fp8", call, None)
    assert not exact.available and "lossy" in exact.reason
    lossy = Dispatcher(emulated("h100"), allow_lossy=True)
    assert lossy.candidate("flash_attn3_fp8", call, None, auto=False).available
    assert not lossy.candidate("flash_attn3_fp8", call, None).available  # named only
    for card in ("rtx4090", "a100"):  # sm_89 has fp8 tensor cores, but FA3 is Hopper's kernel
        d = Dispatcher(emulated(card), allow_lossy=True)
        cand = d.candidate("flash_attn3_fp8", d.call_on_probe(torch.bfloat16, 32760), None, auto=False)
        assert not cand.available and cand.reason.startswith("needs compute capability 9.0")
    d = Dispatcher(emulated("h100"), allow_lossy=True)
    cand = d.candidate("flash_attn3_fp8", d.call_on_probe(torch.bfloat16, 4096, head_dim=80), None, auto=False)
    assert not cand.available and "head dims" in cand.reason


def test_the_fast_tier_never_picks_it_by_speed_but_runs_it_where_named(fa3_installed, tmp_path, monkeypatch):
    from wanfit.attention.ranking import save_measured

    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path))
    save_measured(emulated("h100"), {"flash_attn3_fp8": 7.0, "flash_attn4": 9.3, "sdpa_cudnn": 11.9}, {})
    request = model_request("1.3B")
    fast = plan_for(request, Constraints(fast=True), emulated("h100"))
    # Measured fastest, but its outlier-channel error keeps it out of the automatic choice.
    assert fast.plan.self_attention != "flash_attn3_fp8"
    assert any("flash_attn3_fp8 runs only where named" in note and "outlier" in note for note in fast.notes)
    named = plan_for(
        request, Constraints.from_options(settings=["self_attention=flash_attn3_fp8"], fast=True), emulated("h100")
    )
    assert named.plan.self_attention == "flash_attn3_fp8"
    assert named.plan.cross_attention != "flash_attn3_fp8"
    exact = plan_for(request, Constraints(), emulated("h100")).plan
    assert backends.default_registry()[exact.self_attention].exact
    d = Dispatcher(emulated("h100"), allow_lossy=True)
    assert d.select(d.call_on_probe(torch.bfloat16, 32760)).backend != "flash_attn3_fp8"
