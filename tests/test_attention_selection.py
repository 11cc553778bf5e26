"""Which backend the dispatcher picks, per (emulated) card and call, and the reasons it gives."""

import dataclasses

import pytest
import torch

from wanfit.attention import (
    AttentionBackend,
    Dispatcher,
    Registry,
    builtin_backends,
    configure,
    explain,
    reset,
)
from wanfit.attention.ranking import rank
from wanfit.errors import AttentionUnavailableError, ConfigError
from wanfit.hardware import probe
from wanfit.precision import default_compute_dtype

TOKENS = 32760  # the default job: 1.3B, 832x480, 81 frames
NEVER_BELOW_SM80 = {"flash_attn4", "flash_attn2", "flash_attn3", "sdpa_flash", "sdpa_cudnn", "sage", "sdpa_math"}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for var in ("WANFIT_EMULATE", "WANFIT_ATTENTION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path))
    yield
    reset()


def _installed_everywhere() -> Registry:
    """Built-ins with every optional package pretended installed (a module that always imports)."""
    return Registry(dataclasses.replace(b, package="json") if b.package else b for b in builtin_backends())


def _job_selection(card: str, registry: Registry | None = None, dtype=None, **kw):
    hw = probe(card)
    d = Dispatcher(hw, registry=registry, **kw)
    call = d.call_on_probe(dtype or default_compute_dtype(hw), TOKENS)
    return d, call, d.select(call)


@pytest.mark.parametrize("card", ["t4", "v100", "rtx2080ti"])
@pytest.mark.parametrize("packages", ["none", "all"])
def test_pre_ampere_cards_get_the_efficient_kernel_in_fp16(card, packages):
    registry = _installed_everywhere() if packages == "all" else None
    d, call, sel = _job_selection(card, registry)
    assert sel.backend not in NEVER_BELOW_SM80
    expected = "xformers" if packages == "all" else "sdpa_efficient"  # xformers ranks above sdpa_efficient
    assert (sel.backend, sel.kernel_dtype) == (expected, torch.float16)
    flash = next(c for c in d.candidates(call) if c.name == "flash_attn2")
    assert not flash.available and "8.0 (Ampere) or newer" in flash.reason


@pytest.mark.parametrize("card", ["t4", "v100"])
def test_bf16_model_on_pre_ampere_is_cast_to_fp16_and_recorded(card):
    _, _, sel = _job_selection(card, dtype=torch.bfloat16)
    assert sel.backend == "sdpa_efficient" and sel.cast
    assert (sel.kernel_dtype, sel.model_dtype) == (torch.float16, torch.bfloat16)
    assert sel.to_dict()["kernel_dtype"] == "float16"


@pytest.mark.parametrize("card", ["a100", "h100", "rtx4090", "rtx3060"])
def test_ampere_and_newer_get_a_fast_fused_kernel(card):
    _, _, sel = _job_selection(card)
    assert sel.backend == "sdpa_cudnn" and sel.kernel_dtype == torch.bfloat16 and not sel.cast
    _, _, sel = _job_selection(card, _installed_everywhere())
    expected = "flash_attn3" if card == "h100" else "flash_attn2"
    # flash-attn-4 ranks first in the default table, then FlashAttention-3 on Hopper, then cuDNN;
    # without them the other flash kernels follow.
    assert sel.backend == "flash_attn4"
    no_fa4 = Registry(b for b in _installed_everywhere() if b.name != "flash_attn4")
    assert _job_selection(card, no_fa4)[2].backend == ("flash_attn3" if card == "h100" else "sdpa_cudnn")
    no_fa3 = Registry(b for b in no_fa4 if b.name != "flash_attn3")
    assert _job_selection(card, no_fa3)[2].backend == "sdpa_cudnn"
    no_cudnn = Registry(b for b in no_fa4 if b.name != "sdpa_cudnn")
    assert _job_selection(card, no_cudnn)[2].backend == expected


def test_sage_is_chosen_only_when_lossy_kernels_are_allowed():
    d, call, sel = _job_selection("h100", _installed_everywhere())
    sage = next(c for c in d.candidates(call) if c.name == "sage")
    assert sel.backend != "sage" and not sage.available and "lossy" in sage.reason
    assert d.order[-1] == "sage"
    fast_sage = Registry(
        dataclasses.replace(b, default_ms=1.0) if b.name == "sage" else b for b in _installed_everywhere()
    )
    assert _job_selection("h100", fast_sage)[2].backend == "flash_attn4"  # the fastest exact one
    assert _job_selection("h100", fast_sage, allow_lossy=True)[2].backend == "sage"


@pytest.mark.parametrize("card", ["cpu", "t4", "h100"])
def test_full_length_math_is_never_chosen_above_the_budget(card):
    d, call, sel = _job_selection(
        card, Registry(b for b in builtin_backends() if not b.name.startswith("sdpa_e"))
    )
    math = next(c for c in d.candidates(call) if c.name == "sdpa_math")
    assert not math.available and "48.0 GiB" in math.reason
    assert sel.backend != "sdpa_math"


def test_cpu_uses_math_for_small_calls_and_chunked_for_large_ones():
    hw = probe()
    d = Dispatcher(hw)
    small = d.select(d.call_on_probe(torch.float32, 256, heads=2, head_dim=32))
    large = d.select(d.call_on_probe(torch.float32, TOKENS))
    assert (small.backend, small.smoke_tested) == ("sdpa_math", True)
    assert (large.backend, large.inner, large.kernel_dtype) == ("chunked", None, torch.float32)


def test_t4_without_any_fused_kernel_falls_to_chunked_not_math():
    registry = Registry(b for b in builtin_backends() if b.name not in ("sdpa_efficient", "xformers"))
    _, _, sel = _job_selection("t4", registry)
    assert sel.backend == "chunked" and sel.inner is None


def test_forcing_an_unknown_or_unavailable_backend_is_a_clear_error():
    with pytest.raises(ConfigError, match="Unknown attention backend 'flash'.*sdpa_cudnn"):
        Dispatcher(probe(), forced="flash")
    with pytest.raises(AttentionUnavailableError, match=r"flash_attn2 was asked for but needs a CUDA device"):
        Dispatcher(probe(), forced="flash_attn2")
    with pytest.raises(
        AttentionUnavailableError, match=r"sdpa_flash .* 8\.0 \(Ampere\) or newer; Tesla T4 \(sm_75\)"
    ):
        Dispatcher(probe("t4"), forced="sdpa_flash")
    with pytest.raises(AttentionUnavailableError, match="flash_attn package is not installed"):
        Dispatcher(probe("a100"), forced="flash_attn2")


def test_forced_backend_that_cannot_serve_a_particular_call():
    d = Dispatcher(probe("h100"), forced="sdpa_flash")
    assert d.select(d.call_on_probe(torch.bfloat16, TOKENS)).backend == "sdpa_flash"
    with pytest.raises(AttentionUnavailableError, match="has no float32 kernel"):
        d.select(d.call_on_probe(torch.float32, TOKENS))
    with pytest.raises(AttentionUnavailableError, match="head dims up to 256, not 512"):
        d.select(d.call_on_probe(torch.bfloat16, 128, head_dim=512))


def test_forced_math_is_allowed_past_the_budget_with_a_warning():
    d = Dispatcher(probe(), forced="sdpa_math")
    with pytest.warns(ResourceWarning, match="48.0 GiB"):
        assert d.select(d.call_on_probe(torch.float32, TOKENS)).backend == "sdpa_math"


def test_forcing_through_the_environment_and_configure(monkeypatch):
    monkeypatch.setenv("WANFIT_ATTENTION", "chunked")
    d = configure(probe())
    assert d.forced == "chunked"
    assert explain()["selected"] == "chunked"
    monkeypatch.setenv("WANFIT_ATTENTION", "sdpa_cudnn")
    with pytest.raises(AttentionUnavailableError, match="sdpa_cudnn"):
        configure(probe())


def test_measured_ranking_reorders_fused_kernels_but_keeps_the_fallbacks_last():
    backends = builtin_backends()
    default = rank(backends, {}, allow_lossy=False)
    assert default[:5] == ["flash_attn4", "flash_attn3", "sdpa_cudnn", "flash_attn2", "sdpa_flash"]
    assert default[-5:] == ["sdpa_math", "chunked", "flash_attn3_fp8", "int8_triton", "sage"]
    measured = rank(backends, {"sdpa_efficient": 5.0, "sdpa_cudnn": 9.0, "sdpa_math": 1.0}, allow_lossy=False)
    assert measured[:2] == ["sdpa_efficient", "sdpa_cudnn"]
    assert measured[-5:] == ["sdpa_math", "chunked", "flash_attn3_fp8", "int8_triton", "sage"]
    d = Dispatcher(probe("h100"), measured_ms={"sdpa_efficient": 5.0, "sdpa_cudnn": 9.0})
    assert d.select(d.call_on_probe(torch.bfloat16, TOKENS)).backend == "sdpa_efficient"
    assert d.ranking_source == "measured on this card"


def test_sage_ranks_by_its_installed_version_its_cuda_kernels_above_the_exact_ones():
    backends = builtin_backends()
    lossy = {
        version: rank(backends, {}, allow_lossy=True, versions={"sageattention": version})
        for version in (None, "1.0.6", "2.2.0", "2.0.1+cu128", "nightly")
    }
    # 1.x (Triton kernels) and an unreadable version keep the 1.x default: behind the exact kernels.
    for version in (None, "1.0.6", "nightly"):
        assert lossy[version].index("sage") > lossy[version].index("sdpa_cudnn"), version
    # 2.x: its CUDA kernels, ahead of every exact kernel where lossy kernels may compete.
    for version in ("2.2.0", "2.0.1+cu128"):
        assert lossy[version].index("sage") < lossy[version].index("flash_attn4"), version
    # Never in the exact ranking, whatever its version.
    exact = rank(backends, {}, allow_lossy=False, versions={"sageattention": "2.2.0"})
    assert set(exact[-3:]) == {"flash_attn3_fp8", "int8_triton", "sage"}  # the lossy tier, after every exact kernel
    # A measurement on the card outranks the default table.
    measured = rank(backends, {"sage": 20.0, "flash_attn4": 9.0}, allow_lossy=True, versions={"sageattention": "2.2.0"})
    assert measured.index("flash_attn4") < measured.index("sage")


def test_explain_lists_every_backend_with_a_reason():
    d = Dispatcher(probe("t4"))
    info = d.explain(d.call_on_probe(torch.float16, TOKENS))
    assert info["selected"] == "sdpa_efficient" and info["error"] is None
    names = [c["name"] for c in info["candidates"]]
    assert sorted(names) == sorted(b.name for b in builtin_backends())
    assert all(c["reason"].endswith(".") for c in info["candidates"])
    assert {c["smoke_test"] for c in info["candidates"] if c["available"]} == {"skipped (emulated card)"}


def test_backend_declarations_answer_per_call():
    sage = next(b for b in builtin_backends() if b.name == "sage")
    d = Dispatcher(probe("h100"))
    call = d.call_on_probe(torch.bfloat16, 64, head_dim=80)
    assert sage.call_reason(call) == "supports head dims 64, 96, 128 only, not 80."
    efficient = next(b for b in builtin_backends() if b.name == "sdpa_efficient")
    assert efficient.kernel_dtype(d.call_on_probe(torch.float32, 64)) == (torch.float32, None)
    t4_call = Dispatcher(probe("t4")).call_on_probe(torch.float32, 64)
    assert efficient.supported_dtypes(t4_call.compute_capability) == (torch.float16, torch.float32)
    flash = next(b for b in builtin_backends() if b.name == "sdpa_flash")
    masked = dataclasses.replace(call, head_dim=128, has_mask=True)
    assert flash.check(masked) == (None, "does not take an attention mask.")
    assert efficient.check(masked) == (torch.bfloat16, None)


def test_a_registered_backend_takes_part_in_selection():
    def run(q, k, v, *, scale=None, attn_mask=None):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
        ).transpose(1, 2)

    registry = Registry(builtin_backends())
    registry.register(
        AttentionBackend(
            "cpu_fast", run, "test kernel", devices=("cpu",), dtypes=(torch.float32,), default_ms=1.0
        )
    )
    d = Dispatcher(probe(), registry=registry)
    assert d.select(d.call_on_probe(torch.float32, 64, head_dim=16)).backend == "cpu_fast"
    assert d.select(d.call_on_probe(torch.float64, 64, head_dim=16)).backend == "sdpa_math"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(AttentionBackend("cpu_fast", run, "again"))


def test_a_measured_ranking_names_installed_kernels_it_has_no_time_for():
    # The card's bench timed cuDNN before flash-attn-4 was installed: cuDNN stays first, and says why.
    hw = probe("h100")
    fa4 = next(p for p in hw.kernel_packages if p.module == "flash_attn.cute")
    hw = dataclasses.replace(
        hw,
        kernel_packages=tuple(
            dataclasses.replace(p, installed=True) if p is fa4 else p for p in hw.kernel_packages
        ),
    )
    # (The default registry: its entries name their real packages, which the probe's list is about.)
    d = Dispatcher(hw, measured_ms={"sdpa_cudnn": 11.2, "sdpa_flash": 18.6})
    sel = d.select(d.call_on_probe(torch.bfloat16, TOKENS))
    assert sel.backend == "sdpa_cudnn"
    assert "installed but not in this card's measurements" in sel.reason and "flash_attn4" in sel.reason
    assert "wanfit bench attention" in sel.reason and "flash_attn3" not in sel.reason  # not installed
    # With no measurement there is nothing to say: the default table ranks flash_attn4 first anyway.
    d = Dispatcher(hw, measured_ms={})
    assert "not in this card's measurements" not in d.select(d.call_on_probe(torch.bfloat16, TOKENS)).reason
