"""int8_triton, the lossy attention kernel (wanfit.attention.int8_attention): its quantised math against
exact attention (the torch reference, always), the Triton kernel against that reference (under
Triton's interpreter, when Triton is installed), and who may choose it (the fast tier's plans only)."""

from dataclasses import replace

import pytest
import torch

from tests.helpers.hardware import emulated
from tests.helpers.interpreted import run_interpreted
from wanfit.attention import backends
from wanfit.attention.chunked import reference_attention
from wanfit.attention.dispatch import Dispatcher
from wanfit.attention.int8_attention import int8_attention_reference, tile_config
from wanfit.plan.planning import Constraints, model_request, plan_for

NO_TRITON = (
    "Triton is not installed (CI does not install it): the kernel runs only under its interpreter here"
)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def qkv(lq: int, lk: int, d: int, *, heads: int = 2, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, n, heads, d, generator=g).to(dtype) for n in (lq, lk, lk))


def exact(q, k, v, scale=None):
    return reference_attention(q.float(), k.float(), v.float(), scale=scale)


# --- the quantised math (plain torch) --------------------------------------------------------------


@pytest.mark.parametrize("d", [64, 128])
def test_the_quantised_math_is_close_to_exact_attention(d):
    q, k, v = qkv(200, 300, d)
    truth = exact(q, k, v)
    # int8 scores alone (P·V in fp16) cost about 1%; fp8 P and V about 3-4% more on random data,
    # where the output (an average of random values) is small beside the rounding of each term.
    assert rel_l2(int8_attention_reference(q, k, v, pv="fp16"), truth) < 2.5e-2
    assert rel_l2(int8_attention_reference(q, k, v, pv="fp8"), truth) < 6e-2


def test_smoothing_k_removes_the_error_of_a_common_offset():
    q, k, v = qkv(150, 260, 64, seed=1)
    g = torch.Generator().manual_seed(2)
    k = (k.float() + 20.0 + 10.0 * torch.randn(64, generator=g)).to(k.dtype)  # a per-channel offset
    truth = exact(q, k, v)
    smoothed = rel_l2(int8_attention_reference(q, k, v, pv="fp16"), truth)
    raw = rel_l2(int8_attention_reference(q, k, v, pv="fp16", smooth_k=False), truth)
    assert smoothed < 2.5e-2 and raw > 4 * smoothed


def test_the_softmax_scale_is_honoured():
    q, k, v = qkv(100, 120, 64)
    truth = exact(q, k, v, scale=0.3)
    assert rel_l2(int8_attention_reference(q, k, v, scale=0.3, pv="fp16"), truth) < 2.5e-2
    assert rel_l2(exact(q, k, v), truth) > 0.1  # the scale changes the answer


def test_unsupported_head_dims_are_refused_in_one_sentence():
    with pytest.raises(ValueError, match="supports head dims 64, 128, not 96"):
        tile_config(96)


# --- the Triton kernel, under the interpreter ------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """What tests/helpers/int8_interpreted.py measures of the kernels under Triton's interpreter (a
    process of its own: the interpreter must be chosen before Triton is first imported)."""
    return run_interpreted("int8_interpreted.py", NO_TRITON)


def test_the_kernels_quantise_q_and_k_as_the_reference_does(interpreted):
    got = interpreted["quantisation"]
    assert got["dtype"] == "torch.int8" and got["shape"] == [1, 2, 256, 64]  # padded to whole tiles
    assert got["max_step"] <= 1 and got["mismatched"] < 1e-3  # at most a rounding step, rarely
    assert got["scale_rel"] < 1e-5 and got["padding_zero"]


def test_the_kernel_matches_the_reference_and_exact_attention(interpreted):
    assert [c["case"] for c in interpreted["cases"]] == [[128, 128, 64], [150, 300, 64], [100, 70, 128]]
    for case in interpreted["cases"]:
        assert case["shape_ok"] and case["dtype_ok"], case
        # The same math: what differs is the order of fp32 sums and the two outputs' bf16 roundings.
        assert case["vs_reference"] < 1e-2, case
        assert case["vs_exact"] < 2.5e-2, case


def test_the_kernel_smooths_k_with_an_offset_and_takes_fp16_and_a_scale(interpreted):
    got = interpreted["offset"]
    assert got["dtype"] == "torch.float16"
    assert got["smoothed"] < 2.5e-2 and got["raw"] > 2 * got["smoothed"]


# --- who may choose it -----------------------------------------------------------------------------


@pytest.fixture
def triton_imports(monkeypatch):
    """Triton counts as installed (the declarations decide), whether or not this machine has it."""
    real = backends.import_reason
    monkeypatch.setattr(backends, "import_reason", lambda m, p: None if m == "triton" else real(m, p))


def test_the_fast_tier_keeps_cudnn_where_int8_measured_slower_and_takes_int8_where_it_is_faster(
    triton_imports, tmp_path, monkeypatch
):
    # The registry's speeds are the H200's of 2026-12-02: int8_triton 12.44 ms, cuDNN 10.50 ms.
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path))
    request = model_request("1.3B")
    kept = plan_for(request, Constraints(fast=True), emulated("h200"))
    assert kept.plan.self_attention == "sdpa_cudnn"
    assert any("self-attention stays exact (sdpa_cudnn)" in note for note in kept.notes)
    # A card whose own measurement (`wanfit bench attention`) puts int8 first gets it, in the plan.
    from wanfit.attention.ranking import save_measured

    save_measured(emulated("h200"), {"int8_triton": 6.0, "sdpa_cudnn": 10.5}, {})
    fast = plan_for(request, Constraints(fast=True), emulated("h200"))
    assert fast.plan.self_attention == "int8_triton"
    assert fast.plan.cross_attention != "int8_triton" and fast.plan.vae_attention != "int8_triton"
    assert any("self-attention runs int8_triton (lossy" in note for note in fast.notes)
    assert fast.to_dict()["settings"]["self_attention"] == "int8_triton"  # what `wanfit plan` shows
    assert "self int8_triton" in fast.summary()
    big = plan_for(model_request("14B"), Constraints(fast=True), emulated("h200")).plan
    assert big.tier == "fast" and big.self_attention == "int8_triton"
    # The exact tier ignores the measurement.
    assert plan_for(request, Constraints(), emulated("h200")).plan.self_attention == "sdpa_cudnn"


def test_a_declined_fast_tier_runs_nothing_lossy(triton_imports):
    # 14B on a 24 GB card: the fp8 copies do not fit beside a resident DiT, so the plan streams it
    # or declines the fast tier; either way its tier is exact, and so is its attention.
    plan = plan_for(model_request("14B"), Constraints(fast=True), emulated("rtx4090")).plan
    assert plan.tier == "exact" and backends.default_registry()[plan.self_attention].exact


def test_the_exact_tier_never_runs_it(triton_imports):
    for card in ("h200", "h100", "rtx4090"):
        plan = plan_for(model_request("1.3B"), Constraints(), emulated(card)).plan
        assert "int8_triton" not in (plan.self_attention, plan.cross_attention, plan.vae_attention)
    d = Dispatcher(emulated("h200"))
    cand = d.candidate("int8_triton", d.call_on_probe(torch.bfloat16, 32760), None)
    assert not cand.available and "lossy" in cand.reason


def test_cards_without_fp8_tensor_cores_refuse_it_with_the_reason(triton_imports):
    for card, sm in (("t4", "sm_75"), ("a100", "sm_80")):
        d = Dispatcher(emulated(card), allow_lossy=True)
        cand = d.candidate("int8_triton", d.call_on_probe(torch.float16, 32760), None)
        assert not cand.available
        assert cand.reason.startswith("needs compute capability 8.9 or newer") and sm in cand.reason


def test_other_head_dims_are_refused_by_the_declarations(triton_imports):
    d = Dispatcher(emulated("h200"), allow_lossy=True)
    assert d.candidate("int8_triton", d.call_on_probe(torch.bfloat16, 4096, head_dim=128), None).available
    cand = d.candidate("int8_triton", d.call_on_probe(torch.bfloat16, 4096, head_dim=96), None)
    assert not cand.available and "64, 128" in cand.reason


def test_without_triton_the_fast_tier_keeps_exact_attention_and_says_why(monkeypatch):
    real = backends.import_reason
    missing = "the triton package is not installed (pip install triton)."
    monkeypatch.setattr(backends, "import_reason", lambda m, p: missing if m == "triton" else real(m, p))
    fast = plan_for(model_request("1.3B"), Constraints(fast=True), emulated("h200"))
    assert fast.plan.fp8_gemm and backends.default_registry()[fast.plan.self_attention].exact
    note = next(n for n in fast.notes if "self-attention stays exact" in n)
    assert "int8_triton the triton package is not installed" in note


def test_a_step_down_off_the_fast_tier_hands_the_self_attention_back_to_the_exact_ranking(
    triton_imports, tmp_path, monkeypatch
):
    from wanfit.attention.ranking import save_measured
    from wanfit.plan.planner import step_down

    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path))
    save_measured(emulated("h200"), {"int8_triton": 6.0, "sdpa_cudnn": 10.5}, {})
    result = plan_for(model_request("1.3B"), Constraints(fast=True), emulated("h200"))
    assert result.plan.tier == "fast" and result.plan.self_attention == "int8_triton"
    plan, seen = result.plan, []
    while plan is not None and plan.fast_tier_in_place:
        plan = step_down(plan, result.request, "denoise")
        seen.append(plan)
    assert plan is not None and not plan.fast_tier_in_place, seen
    assert plan.self_attention is None  # "auto": the exact ranking, never a lossy kernel
    # A backend the user chose stays.
    kept = step_down(replace(result.plan), result.request, "denoise", frozen={"self_attention"})
    while kept is not None and kept.fast_tier_in_place:
        kept = step_down(kept, result.request, "denoise", frozen={"self_attention"})
    assert kept is not None and kept.self_attention == "int8_triton"


def test_a_user_set_self_attention_is_kept_in_the_fast_tier_and_checked(triton_imports, tmp_path, monkeypatch):
    from wanfit.attention.ranking import save_measured
    from wanfit.errors import AttentionUnavailableError

    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path))
    save_measured(emulated("h200"), {"int8_triton": 6.0, "sdpa_cudnn": 10.5}, {})
    request = model_request("1.3B")
    # The fast tier would pick int8_triton; the user's field wins, and the others keep the ranking.
    constraints = Constraints.from_options(settings=["self_attention=sdpa_flash"], fast=True)
    result = plan_for(request, constraints, emulated("h200"))
    assert result.plan.tier == "fast" and result.plan.self_attention == "sdpa_flash"
    assert result.plan.cross_attention == "sdpa_cudnn"
    # The exact tier: once crashed on the same field given twice to the Plan.
    set_flash = Constraints.from_options(settings=["self_attention=sdpa_flash"])
    assert plan_for(request, set_flash, emulated("h200")).plan.self_attention == "sdpa_flash"
    # A backend that cannot serve that call is one sentence, not a plan that fails at run time.
    with pytest.raises(AttentionUnavailableError, match="self_attention=sdpa_flash was asked for but needs"):
        plan_for(request, set_flash, emulated("t4"))


def test_the_fast_tier_keeps_exact_attention_where_the_lossy_kernels_copies_would_not_fit(
    triton_imports, tmp_path, monkeypatch
):
    from wanfit.attention.ranking import save_measured
    from wanfit.plan.estimates import attention_workspace

    # The quantised copies are counted: int8_triton's scratch is half of q + k + v more than cuDNN's.
    args = (1, 12, 32760, 32760, 128, 2)
    qkv = 3 * 32760 * 12 * 128 * 2
    assert attention_workspace("int8_triton", *args) - attention_workspace("sdpa_cudnn", *args) == qkv // 2
    assert attention_workspace("sage", *args) > attention_workspace("int8_triton", *args)
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path))
    save_measured(emulated("h200"), {"int8_triton": 6.0, "sdpa_cudnn": 10.5}, {})
    request = model_request("1.3B")
    exact = plan_for(request, Constraints(fast=True), emulated("h200"))
    assert exact.plan.self_attention == "int8_triton"
    # At 1.3B/480p the copies sit under the denoise peak's other tensors; a kernel whose copies were
    # 100x q + k + v (about 30 GB at guidance's batch 2) would not.
    registry = backends.default_registry()
    entry = registry["int8_triton"]
    monkeypatch.setitem(registry._backends, "int8_triton", replace(entry, scratch_per_qkv=100.0))
    roomy = plan_for(request, Constraints(fast=True), emulated("h200"))
    assert roomy.plan.self_attention == "int8_triton" and roomy.peak_bytes > exact.peak_bytes + 20 * 2**30
    tight = plan_for(request, Constraints(fast=True, vram=exact.peak_bytes + 2**30), emulated("h200"))
    assert tight.plan.tier == "fast" and tight.plan.self_attention == "sdpa_cudnn"
    assert tight.peak_bytes <= tight.budget.device_bytes
    assert any("int8_triton's quantised copies would put the denoise phase over" in n for n in tight.notes)
