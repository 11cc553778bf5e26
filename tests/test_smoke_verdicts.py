"""Smoke tests that passed in an earlier process: taken at planning time, re-run in the background,
waited for at the backend's first call; a failure there falls back and drops the verdict."""

import dataclasses
import sys
import threading

import pytest
import torch

import wanfit.attention as wa
from wanfit.attention import (
    AttentionBackend,
    AttentionFallbackWarning,
    Dispatcher,
    Registry,
    builtin_backends,
    dispatch,
    smoke_verdicts,
)
from wanfit.attention import backends as wab
from wanfit.attention.chunked import reference_attention
from wanfit.hardware import probe
from wanfit.hardware.probe import KernelPackage

MODULE = "wanfit_test_fake_kernel"
PACKAGE_SOURCE = """
import builtins

import torch.nn.functional as F

builtins.wanfit_test_gate.wait(30)  # the import takes as long as the test says


def attend(q, k, v, scale=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2) * (2.0 if builtins.wanfit_test_wrong else 1.0)
"""


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An importable kernel package whose import waits for a gate, and a registry with it ranked first."""
    import builtins

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / f"{MODULE}.py").write_text(PACKAGE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path / "cache"))
    gate = threading.Event()
    gate.set()
    monkeypatch.setattr(builtins, "wanfit_test_gate", gate, raising=False)
    monkeypatch.setattr(builtins, "wanfit_test_wrong", False, raising=False)

    def run(q, k, v, *, scale=None, attn_mask=None):
        return wab._import(MODULE).attend(q, k, v, scale=scale)

    backend = AttentionBackend(
        "fake_kernel",
        run,
        "a test package",
        package=MODULE,
        devices=("cpu",),
        dtypes=(torch.float32,),
        default_ms=0.01,
    )
    registry = Registry(builtin_backends())
    registry.register(backend)
    yield gate, registry
    new_process()
    wa.reset()


def new_process():
    """Forget what this process learnt about the fake package, as a fresh process would not know it."""
    dispatch.wait_for_background_smoke_tests()
    dispatch._SMOKE_RESULTS.clear()
    sys.modules.pop(MODULE, None)
    wab._import.cache_clear()
    wab.import_reason.cache_clear()


def hw_with(version: str):
    hw = probe()
    return dataclasses.replace(
        hw, kernel_packages=(*hw.kernel_packages, KernelPackage("fake", MODULE, True, version))
    )


def qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, n, 2, 16, generator=g) for n in (120, 90, 90))


def test_a_pass_is_kept_and_the_next_process_does_not_import_the_package_to_plan(fake_package):
    gate, registry = fake_package
    call = Dispatcher(hw_with("1.0"), registry=registry).call_on_probe(
        torch.float32, q_len=120, heads=2, head_dim=16
    )
    first = Dispatcher(hw_with("1.0"), registry=registry).select(call)
    assert first.backend == "fake_kernel" and MODULE in sys.modules  # tested now, synchronously
    keys = smoke_verdicts.load_passed()
    assert len(keys) == 1 and next(iter(keys)).startswith("fake_kernel 1.0|")

    new_process()
    gate.clear()  # the import cannot finish until the gate opens
    d = Dispatcher(hw_with("1.0"), registry=registry)
    selection = d.select(call)
    assert selection.backend == "fake_kernel" and selection.smoke_tested
    cand = d.candidate("fake_kernel", call, d.probe_device())
    assert cand.smoke_test == dispatch.PASSED_EARLIER
    # the real test waits in the background for the import, which planning did not wait for
    assert dispatch._SMOKE_PENDING and not any(f.done() for f in dispatch._SMOKE_PENDING.values())
    gate.set()
    q, k, v = qkv()
    out = d(q, k, v)  # the first call waits for the background test, which passes
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert d.served == {"fake_kernel": 1} and not d.disabled and not dispatch._SMOKE_PENDING


def test_a_background_failure_falls_back_and_drops_the_verdict(fake_package, monkeypatch):
    import builtins

    gate, registry = fake_package
    hw = hw_with("1.0")
    call = Dispatcher(hw, registry=registry).call_on_probe(torch.float32, q_len=120, heads=2, head_dim=16)
    Dispatcher(hw, registry=registry).select(call)
    assert smoke_verdicts.load_passed()

    new_process()
    monkeypatch.setattr(builtins, "wanfit_test_wrong", True)  # broken since: wrong numbers, no error
    d = Dispatcher(hw, registry=registry)
    assert d.select(call).backend == "fake_kernel"  # planned on the earlier verdict
    q, k, v = qkv()
    with pytest.warns(AttentionFallbackWarning, match="failed its smoke test in this process"):
        out = d(q, k, v)
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert "fake_kernel" in d.disabled and "fake_kernel" not in d.served
    assert not smoke_verdicts.load_passed()  # the next process tests it synchronously again


def test_a_new_package_version_is_tested_synchronously(fake_package):
    gate, registry = fake_package
    call = Dispatcher(hw_with("1.0"), registry=registry).call_on_probe(
        torch.float32, q_len=120, heads=2, head_dim=16
    )
    Dispatcher(hw_with("1.0"), registry=registry).select(call)
    new_process()
    d = Dispatcher(hw_with("2.0"), registry=registry)
    assert d.select(call).backend == "fake_kernel"
    assert MODULE in sys.modules and not dispatch._SMOKE_PENDING
    assert d.candidate("fake_kernel", call, d.probe_device()).smoke_test == "passed"
    assert len(smoke_verdicts.load_passed()) == 2  # one verdict per version


def test_an_unwritable_cache_only_costs_the_synchronous_test(fake_package, tmp_path, monkeypatch):
    gate, registry = fake_package
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(blocker / "cache"))
    call = Dispatcher(hw_with("1.0"), registry=registry).call_on_probe(
        torch.float32, q_len=120, heads=2, head_dim=16
    )
    assert Dispatcher(hw_with("1.0"), registry=registry).select(call).backend == "fake_kernel"
    assert smoke_verdicts.load_passed() == set()
