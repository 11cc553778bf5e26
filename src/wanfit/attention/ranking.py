"""Ranking of backends: measured speed on this card when `wanfit bench attention` stored it, else
the default table. Exact fused kernels first (by speed), then the fallbacks (registry role
"fallback": math and chunked; by measured speed too, registration order when unmeasured); lossy
kernels last unless the user allows them, in which case they rank by speed with the fused ones.

The fallbacks stay behind every fused kernel whatever they measured: a bench times one shape, and
math's time and memory grow with the square of the sequence, chunked's with its block count, while
a fused kernel holds its lead at the lengths a video job has.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from wanfit.attention.backends import AttentionBackend
from wanfit.hardware.probe import HardwareProbe

CACHE_ENV = "WANFIT_CACHE_DIR"
BENCH_FILE = "attention_bench.json"


def cache_dir() -> Path:
    """WANFIT_CACHE_DIR, else $XDG_CACHE_HOME/wanfit, else ~/.cache/wanfit."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wanfit"


def bench_cache_path() -> Path:
    return cache_dir() / BENCH_FILE


def device_key(hw: HardwareProbe) -> str:
    """Measurements hold for one card model and one torch build."""
    where = hw.sm or hw.device_type
    emulated = " (emulated)" if hw.emulated else ""
    return f"{hw.device_name}{emulated}|{where}|torch {hw.torch_version}"


def load_measured(hw: HardwareProbe, path: Path | None = None) -> dict[str, float]:
    """Measured milliseconds per backend for this card, or {} when none were stored."""
    path = path or bench_cache_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        entry = data.get("devices", {}).get(device_key(hw), {})
        return {str(k): float(v) for k, v in entry.get("ms", {}).items()}
    except (OSError, ValueError, AttributeError, TypeError) as err:
        warnings.warn(f"Ignoring the unreadable attention benchmark cache {path}: {err}", stacklevel=2)
        return {}


def save_measured(hw: HardwareProbe, ms: dict[str, float], meta: dict, path: Path | None = None) -> Path:
    """Store measured milliseconds for this card next to earlier entries for other cards."""
    path = path or bench_cache_path()
    data: dict = {"devices": {}}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            data.setdefault("devices", {})
        except (OSError, ValueError):
            data = {"devices": {}}
    data["devices"][device_key(hw)] = {**meta, "ms": dict(ms)}
    return write_json(path, data)


def write_json(path: Path, data: dict) -> Path:
    """Write a cache file whole or not at all (a temporary renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def rank(
    backends: Iterable[AttentionBackend],
    measured: dict[str, float],
    allow_lossy: bool,
    versions: dict[str, str | None] | None = None,
) -> list[str]:
    """Backend names, best first: within each tier the measured ones by their time, then the rest by
    the default table (for the installed version of each package: `versions`, module -> version);
    unmeasured fallbacks (their registry role) in registration order."""
    versions = versions or {}
    backends = list(backends)
    fallbacks = [b.name for b in backends if b.role == "fallback"]

    def key(b: AttentionBackend) -> tuple:
        if not b.exact and not allow_lossy:
            tier = 2
        elif b.role == "fallback":
            tier = 1
        else:
            tier = 0
        if b.name in measured:
            return (tier, 0, measured[b.name], 0)
        default = b.default_ms_for(versions.get(b.package)) if tier != 1 else 0.0
        return (tier, 1, default, fallbacks.index(b.name) if tier == 1 else 0)

    return [b.name for b in sorted(backends, key=key)]
