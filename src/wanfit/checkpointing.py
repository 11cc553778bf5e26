"""Saving and loading a denoising run's progress (`--checkpoint-every`, `--resume`).

A resume file holds the latents after a step, the scheduler's multistep state, a step cache's
per-stream state (--cache runs) and every setting that shapes the frames (prompt, negative prompt,
seed, size, frames, steps, guidance, shift, model, cache; the sampler and the LoRAs by content hash
and strength when the run had them), plus where the output goes. It is a plain torch.save file of
tensors and simple values, read back with weights_only=True, so a resume file can never run code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wanfit.errors import CheckpointError
from wanfit.pipeline import DenoiseState
from wanfit.sampling.schedulers import _STATE_ATTRS as SCHEDULER_STATE_KEYS
from wanfit.sampling.step_cache import StepCacheState
from wanfit.video import atomic_path
from wanfit.weights.io import load_tensors_only

FORMAT = "wanfit-resume-1"
# Settings a resumed run takes from the file: together they fix the frames.
REQUEST_KEYS = (
    "prompt",
    "negative_prompt",
    "size",
    "frames",
    "steps",
    "guidance",
    "shift",
    "seed",
    "model",
    "out",
)


def checkpoint_path(out: Path) -> Path:
    """The resume file a run writing `out` keeps beside it: fox_0.mp4 -> fox_0.mp4.ckpt."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def save(path: Path, state: DenoiseState, request: dict) -> None:
    """Write latents, step, scheduler state and the run's settings atomically (a crash keeps the last one)."""
    missing = [k for k in REQUEST_KEYS if k not in request]
    if missing:
        raise ValueError(f"the request lacks {', '.join(missing)}")
    payload = {
        "format": FORMAT,
        "request": dict(request),
        "step": int(state.step),
        "latents": state.latents.detach().cpu(),
        "scheduler": {k: move(v, "cpu") for k, v in state.scheduler_state.items()},
    }
    if state.step_cache is not None:
        payload["step_cache"] = state.step_cache.to("cpu").to_dict()
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def load(path: Path) -> tuple[DenoiseState, dict]:
    """(state on the CPU, the run's settings); CheckpointError for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Resume file not found: {path}.")
    payload = load_tensors_only(path, what="wanfit resume file", mmap=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a wanfit resume file (written by --checkpoint-every).")
    request, latents = payload.get("request"), payload.get("latents")
    scheduler, step = payload.get("scheduler"), payload.get("step")
    missing = [k for k in REQUEST_KEYS if not isinstance(request, dict) or k not in request]
    if missing or not isinstance(latents, torch.Tensor) or not isinstance(scheduler, dict):
        raise CheckpointError(f"{path} is an incomplete wanfit resume file; it cannot be resumed.")
    if not set(scheduler) <= set(SCHEDULER_STATE_KEYS):  # restored with setattr: known names only
        unknown = ", ".join(sorted(set(scheduler) - set(SCHEDULER_STATE_KEYS)))
        raise CheckpointError(f"{path} holds unknown scheduler state ({unknown}); it cannot be resumed.")
    if not isinstance(step, int) or not 0 <= step <= int(request["steps"]) or latents.ndim != 5:
        raise CheckpointError(
            f"{path} is a damaged wanfit resume file (step {step!r}); it cannot be resumed."
        )
    step_cache = payload.get("step_cache")
    if step_cache is not None:
        step_cache = StepCacheState.from_dict(step_cache, str(path))
    return DenoiseState(latents, step, scheduler, step_cache), request


def saved_lora_requests(request: dict) -> list[tuple[Path, float]]:
    """The saved run's LoRAs as (path, strength), for a resume that names none."""
    return [(Path(r["path"]), float(r["strength"])) for r in request.get("loras") or []]


def lora_difference(request: dict, loras: list[dict]) -> tuple[str, str] | None:
    """(the saved run's LoRAs, these), described, if they differ by content hash or strength; else None."""

    def key(records):
        return sorted((r["sha256"], float(r["strength"])) for r in records)

    def describe(records):
        names = ", ".join(f"{r['name']}:{float(r['strength']):g}" for r in records)
        return f"LoRAs {names}" if records else "no LoRA"

    saved = request.get("loras") or []
    return None if key(saved) == key(loras) else (describe(saved), describe(loras))


def check_same_loras(request: dict, loras: list[dict], path: Path) -> None:
    """Refuse to resume with other LoRAs (by content hash) or strengths than the saved run had."""
    differs = lora_difference(request, loras)
    if differs is not None:
        raise CheckpointError(
            f"{path} holds a run with {differs[0]}, not {differs[1]}; resume it with the same "
            "--lora files and strengths, or start a new run."
        )


def to_device(state: DenoiseState, device: str | torch.device) -> DenoiseState:
    """The state with its latents and every scheduler tensor on `device` (the run's device)."""
    return DenoiseState(
        state.latents.to(device),
        state.step,
        {k: move(v, device) for k, v in state.scheduler_state.items()},
        None if state.step_cache is None else state.step_cache.to(device),
    )


def move(value, device: str | torch.device):
    """Tensors (also inside lists and tuples) moved to `device`; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(move(v, device) for v in value)
    return value
