"""Training checkpoints in parts of at most 15 MiB (what one lent-GPU call can hand back per file).

A checkpoint is one torch.save'd dict written as NAME.000, NAME.001, ... and read back joined.
Adam's moments are kept in bf16 (a third of the bytes of fp32 weights + fp32 moments); a resumed
run continues the same schedule and data, though not bit for bit.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

PART_BYTES = 15 * 2**20


def save(state: dict, path: str | Path) -> list[Path]:
    """Write `state` as path.000, path.001, ...; parts left from a larger earlier save are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    parts = []
    for i, start in enumerate(range(0, len(data), PART_BYTES)):
        part = path.with_name(f"{path.name}.{i:03d}")
        tmp = part.with_name(part.name + ".tmp")
        tmp.write_bytes(data[start : start + PART_BYTES])
        tmp.replace(part)
        parts.append(part)
    for stale in _parts(path)[len(parts) :]:
        stale.unlink()
    return parts


def load(path: str | Path) -> dict:
    parts = _parts(Path(path))
    if not parts:
        raise FileNotFoundError(f"No checkpoint parts {path}.000, ... found.")
    data = b"".join(p.read_bytes() for p in parts)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _parts(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.glob(f"{path.name}.[0-9][0-9][0-9]"))


def compact_optimizer(state: dict) -> dict:
    """An optimizer state_dict with its moment tensors in bf16."""
    return {
        "param_groups": state["param_groups"],
        "state": {
            k: {n: v.to(torch.bfloat16) if torch.is_tensor(v) and v.dim() > 0 else v for n, v in s.items()}
            for k, s in state["state"].items()
        },
    }


def expand_optimizer(state: dict) -> dict:
    return {
        "param_groups": state["param_groups"],
        "state": {
            k: {n: v.float() if torch.is_tensor(v) and v.dim() > 0 else v for n, v in s.items()}
            for k, s in state["state"].items()
        },
    }
