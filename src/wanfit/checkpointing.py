"""Saving and loading a denoising run's progress (`--checkpoint-every`, `--resume`)."""

from __future__ import annotations

from pathlib import Path

import torch

from wanfit.errors import CheckpointError
from wanfit.pipeline import DenoiseState
from wanfit.video import atomic_path

FORMAT = "wanfit-resume-1"


def save(path: Path, state: DenoiseState, request: dict) -> None:
    """Write latents, step, scheduler state and the run's settings; atomically, so a crash keeps the last one."""
    payload = {
        "format": FORMAT,
        "request": request,
        "step": state.step,
        "latents": state.latents.detach().cpu(),
        "scheduler": {k: _to_cpu(v) for k, v in state.scheduler_state.items()},
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def load(path: Path) -> tuple[DenoiseState, dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Resume file not found: {path}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable wanfit resume file: {err}.") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a wanfit resume file.")
    state = DenoiseState(payload["latents"], int(payload["step"]), payload["scheduler"])
    return state, payload["request"]


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
