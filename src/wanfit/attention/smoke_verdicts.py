"""Smoke tests of third-party attention kernels that passed in earlier processes, kept on disk.

Importing such a package can cost a fresh process about a second (flash-attn-4 registers its custom
ops), and the smoke test needs the import. Where the same backend, at the same package version, on
the same card model and torch build, for the same dtype, head dim and masking, passed before, the
dispatcher takes that verdict at planning time and runs the real smoke test in a background thread,
which the backend's first call waits for (wanfit.attention.dispatch). A failure there removes the
verdict and the backend falls back as on any run-time failure.
"""

from __future__ import annotations

import json
import time

import torch

from wanfit.attention.ranking import cache_dir, device_key, write_json
from wanfit.hardware.probe import HardwareProbe

VERDICTS_FILE = "attention_smoke.json"


def verdicts_path():
    return cache_dir() / VERDICTS_FILE


def backend_prefix(backend: str, version: str, hw: HardwareProbe) -> str:
    """The start of every key of one backend at one package version on one card and torch build."""
    return f"{backend} {version}|{device_key(hw)}|"


def verdict_key(
    backend: str, version: str, hw: HardwareProbe, dtype: torch.dtype, head_dim: int, has_mask: bool
) -> str:
    """What a verdict holds for: the backend at one package version, one card and torch build, one call kind."""
    mask = "mask" if has_mask else "no mask"
    return f"{backend_prefix(backend, version, hw)}{str(dtype).removeprefix('torch.')}|d{head_dim}|{mask}"


def load_passed() -> set[str]:
    """The keys that passed earlier (empty when there is no file or it cannot be read)."""
    try:
        data = json.loads(verdicts_path().read_text())
        return {str(k) for k in data.get("passed", {})}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()


def record(key: str, passed: bool) -> None:
    """Keep a pass, drop a failure; a cache that cannot be written is skipped (it only saves time)."""
    path = verdicts_path()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        passed_keys = data.get("passed", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        passed_keys = {}
    if passed:
        passed_keys[key] = time.strftime("%Y-%m-%d %H:%M:%S")
    elif passed_keys.pop(key, None) is None:
        return
    try:
        write_json(path, {"passed": passed_keys})
    except (OSError, RuntimeError):  # read-only or no home: the next process tests synchronously
        pass
