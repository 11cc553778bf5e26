"""flash-attn-4 as a backend: its runner, and the `flash_attn` namespace it leaves without FlashAttention-2.

The real kernels need a CUDA card (measured on the H200: benchmarks/bench_int8_attention.py); here a fake
`flash_attn.cute` package on sys.path stands in for the installed one.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from wanfit.attention import backends
from wanfit.hardware.probe import find_kernel_packages

FAKE_CUTE = '''
import os
import warnings
calls = []
# What flash-attn-4's cache_utils reads at import time.
env_at_import = {k: os.environ.get(k) for k in (
    "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")}

def flash_attn_func(q, k, v, softmax_scale=None):
    calls.append(softmax_scale)
    warnings.warn("Argument aux_data (position 17) cannot be converted to a JitArgument", UserWarning)
    return q * 2, None  # (out, lse), as flash-attn-4 returns them
'''


@pytest.fixture
def fa4_only(tmp_path, monkeypatch):
    """A `flash_attn` namespace (no __init__) holding only `cute`, as `pip install flash-attn-4` leaves it."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text(FAKE_CUTE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for var in (backends.FA4_CACHE_ENABLED, backends.FA4_CACHE_DIR):
        monkeypatch.setenv(var, "")  # recorded as unset, so what the import sets is undone after
        monkeypatch.delenv(var)
    _forget_flash_attn(monkeypatch)
    yield
    _forget_flash_attn(None)  # the fake's modules must not outlive the test


def _forget_flash_attn(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        if monkeypatch is not None:
            monkeypatch.delitem(sys.modules, name)  # a real one comes back after the test
        else:
            del sys.modules[name]
    backends._import.cache_clear()
    backends.import_reason.cache_clear()


def test_flash_attn4_runs_and_returns_the_output_without_the_lse_or_its_compile_warning(fa4_only):
    fa4 = backends.default_registry()["flash_attn4"]
    assert fa4.device_reason("cuda", (9, 0)) is None
    q = torch.randn(1, 8, 2, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the DSL's warning must not reach the user
        out = fa4.run(q, q, q, scale=0.125)
    assert torch.equal(out, q * 2)
    assert sys.modules["flash_attn.cute"].calls == [0.125]


def test_flash_attn2_is_not_taken_for_installed_when_only_flash_attn4_is(fa4_only):
    fa2 = backends.default_registry()["flash_attn2"]
    reason = fa2.device_reason("cuda", (9, 0))
    assert reason is not None and "only an empty flash_attn namespace" in reason and "pip install flash-attn)" in reason
    found = {p.name: p.installed for p in find_kernel_packages()}
    assert found["flash_attn_4"] is True and found["flash_attn"] is False


def test_flash_attn4_declares_what_its_interface_takes():
    fa4 = backends.default_registry()["flash_attn4"]
    assert fa4.exact and fa4.min_capability == (8, 0) and fa4.package == "flash_attn.cute"
    assert fa4.device_reason("cuda", (7, 5)).startswith("needs compute capability 8.0")
    call = backends.AttentionCall("cuda", (9, 0), torch.bfloat16, head_dim=256, q_len=16, kv_len=16)
    assert "up to 128" in fa4.call_reason(call)
    # Ranked by its H200 measurement ahead of cuDNN (8.87 vs 11.24 ms in one run).
    assert fa4.default_ms < backends.default_registry()["sdpa_cudnn"].default_ms


def _env_at_import() -> dict:
    return sys.modules["flash_attn.cute"].env_at_import


def test_flash_attn4_is_imported_with_its_disk_cache_on_in_wanfits_cache_dir(fa4_only, tmp_path, monkeypatch):
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path / "cache"))
    assert backends.default_registry()["flash_attn4"].device_reason("cuda", (9, 0)) is None
    where = tmp_path / "cache" / "flash_attn4"
    assert _env_at_import() == {backends.FA4_CACHE_ENABLED: "1", backends.FA4_CACHE_DIR: str(where)}
    assert where.is_dir() and not list(where.iterdir())  # the writability probe leaves nothing


def test_flash_attn4_runner_alone_also_imports_it_with_the_cache_on(fa4_only, tmp_path, monkeypatch):
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path / "cache"))
    q = torch.randn(1, 8, 2, 64)
    backends.default_registry()["flash_attn4"].run(q, q, q)
    assert _env_at_import()[backends.FA4_CACHE_ENABLED] == "1"


@pytest.mark.parametrize("var, value", [("FA4_CACHE_ENABLED", "0"), ("FA4_CACHE_DIR", "/users/own/dir")])
def test_a_user_set_flash_attn4_cache_variable_is_left_alone(fa4_only, tmp_path, monkeypatch, var, value):
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path / "cache"))
    name = getattr(backends, var)
    other = backends.FA4_CACHE_DIR if name == backends.FA4_CACHE_ENABLED else backends.FA4_CACHE_ENABLED
    monkeypatch.setenv(name, value)
    backends.default_registry()["flash_attn4"].device_reason("cuda", (9, 0))
    assert _env_at_import() == {name: value, other: None}
    assert not (tmp_path / "cache" / "flash_attn4").exists()


def test_an_unwritable_cache_dir_leaves_flash_attn4_on_its_default_and_available(fa4_only, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")  # a dir under a file cannot be made, even by root
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    assert backends.default_registry()["flash_attn4"].device_reason("cuda", (9, 0)) is None
    assert _env_at_import() == {backends.FA4_CACHE_ENABLED: None, backends.FA4_CACHE_DIR: None}
