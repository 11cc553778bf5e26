"""Running calls through the dispatcher: fallback on failure, casting, the module entry point."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import wanfit.attention as wa
from wanfit.attention import (
    AttentionBackend,
    AttentionFallbackWarning,
    Dispatcher,
    Registry,
    builtin_backends,
    reference_attention,
)
from wanfit.errors import AttentionUnavailableError
from wanfit.hardware import probe


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for var in ("WANFIT_EMULATE", "WANFIT_ATTENTION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path))
    yield
    wa.reset()


def _qkv(b=2, lq=150, lk=150, h=3, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, n, h, d, generator=g, dtype=dtype) for n in (lq, lk, lk))


def _sdpa(q, k, v, *, scale=None, attn_mask=None):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
    ).transpose(1, 2)


class BreaksOnLongCalls:
    """Passes the smoke test (77 tokens), then fails like a kernel launch on real calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v, *, scale=None, attn_mask=None):
        self.calls += 1
        if q.shape[1] > 100:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return _sdpa(q, k, v, scale=scale)


def _with(*extra: AttentionBackend) -> Registry:
    registry = Registry(builtin_backends())
    for b in extra:
        registry.register(b)
    return registry


def test_a_backend_that_raises_is_disabled_with_one_warning_and_the_call_still_succeeds():
    torch.manual_seed(0)
    broken = BreaksOnLongCalls()
    d = Dispatcher(
        probe(),
        registry=_with(
            AttentionBackend(
                "fake", broken, "fails", devices=("cpu",), dtypes=(torch.float32,), default_ms=0.1
            )
        ),
    )
    q, k, v = _qkv()
    with pytest.warns(AttentionFallbackWarning) as record:
        out = d(q, k, v)
    assert len(record) == 1 and "fake" in str(record[0].message)
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert "fake" in d.disabled and broken.calls == 2  # the smoke test, then the failing call
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        out2 = d(q, k, v)
        d(*_qkv(lq=140, lk=90))
    torch.testing.assert_close(out2, out)
    assert broken.calls == 2
    assert d.select(d.call_for(q, k)).backend == "sdpa_math"
    fake = next(c for c in d.candidates(d.call_for(q, k)) if c.name == "fake")
    assert not fake.available and "disabled for this process" in fake.reason


def test_a_backend_failing_its_smoke_test_is_skipped_without_running_real_calls():
    def wrong(q, k, v, *, scale=None, attn_mask=None):
        return _sdpa(q, k, v, scale=scale) * 1.01

    d = Dispatcher(
        probe(),
        registry=_with(
            AttentionBackend(
                "wrong", wrong, "off by 1%", devices=("cpu",), dtypes=(torch.float32,), default_ms=0.1
            )
        ),
    )
    q, k, v = _qkv()
    cand = next(c for c in d.candidates(d.call_for(q, k)) if c.name == "wrong")
    assert not cand.available and cand.smoke_test == "failed" and "max error" in cand.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(d(q, k, v), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_a_forced_backend_that_fails_at_run_time_is_an_error_not_a_silent_fallback():
    broken = BreaksOnLongCalls()
    d = Dispatcher(
        probe(),
        forced="fake",
        registry=_with(AttentionBackend("fake", broken, "fails", devices=("cpu",), dtypes=(torch.float32,))),
    )
    with pytest.raises(AttentionUnavailableError, match="fake was asked for but failed here: RuntimeError"):
        d(*_qkv())


def test_the_dispatcher_casts_to_the_kernel_dtype_and_back():
    seen = []

    def fp16_only(q, k, v, *, scale=None, attn_mask=None):
        seen.append(q.dtype)
        return _sdpa(q.float(), k.float(), v.float(), scale=scale).to(q.dtype)

    d = Dispatcher(
        probe(),
        registry=_with(
            AttentionBackend(
                "half", fp16_only, "fp16 kernel", devices=("cpu",), dtypes=(torch.float16,), default_ms=0.1
            )
        ),
    )
    q, k, v = _qkv(dtype=torch.bfloat16)
    sel = d.select(d.call_for(q, k))
    assert (sel.backend, sel.kernel_dtype, sel.cast) == ("half", torch.float16, True)
    out = d(q, k, v)
    assert out.dtype == torch.bfloat16 and seen[-1] == torch.float16
    torch.testing.assert_close(out.float(), reference_attention(q, k, v).float(), atol=2e-2, rtol=2e-2)
    # fp32 is never cast down: the fp16-only kernel cannot serve it
    assert d.select(d.call_for(*_qkv()[:2])).backend == "sdpa_math"


def test_selection_is_cached_per_kind_of_call():
    counter = BreaksOnLongCalls()
    d = Dispatcher(
        probe(),
        registry=_with(
            AttentionBackend(
                "fake", counter, "counts", devices=("cpu",), dtypes=(torch.float32,), default_ms=0.1
            )
        ),
    )
    q, k, v = _qkv(lq=50, lk=60)
    for _ in range(3):
        d(q, k, v)
    d(*_qkv(b=1, lq=30, lk=31, h=2))  # same device, dtype and head dim: no new selection
    assert counter.calls == 1 + 4 and len(d._selections) == 1
    d(*_qkv(d=8, lq=30, lk=30))
    assert len(d._selections) == 2


def test_big_calls_go_to_chunked_and_stay_exact():
    d = Dispatcher(probe(), math_budget_bytes=64 * 1024, chunk_budget_bytes=16 * 1024)
    q, k, v = _qkv(b=1, lq=301, lk=257, h=2, d=8)
    assert d.select(d.call_for(q, k)).backend == "chunked"
    torch.testing.assert_close(d(q, k, v), _sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_module_entry_point_configures_itself_and_accepts_scale_and_mask():
    q, k, v = _qkv(lq=40, lk=24)
    mask = torch.rand(1, 1, 40, 24, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    out = wa.attention(q, k, v, scale=0.2, attn_mask=mask)
    torch.testing.assert_close(out, _sdpa(q, k, v, scale=0.2, attn_mask=mask), atol=1e-5, rtol=1e-5)
    assert wa.get_dispatcher().hw.device_type == "cpu"
    assert out.shape == (2, 40, 3, 16)


def test_cpu_tensors_follow_cpu_rules_while_an_emulated_card_is_configured():
    wa.configure(probe("t4"))
    q, k, v = _qkv(lq=20, lk=20)
    torch.testing.assert_close(wa.attention(q, k, v), _sdpa(q, k, v), atol=1e-5, rtol=1e-5)
    assert wa.get_dispatcher().select(wa.get_dispatcher().call_for(q, k), q.device).backend == "sdpa_math"
