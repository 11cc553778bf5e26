"""Flow-matching schedulers for Wan2.1, built on diffusers' scheduler classes.

The official sampler is flow-matching UniPC (order 2, bh2, predict-x0) over the sigmas
`linspace(0.999, 0, N+1)[:-1]`, shifted by `s*sigma / (1 + (s-1)*sigma)`, with timesteps
`int64(sigma * 1000)` and a final sigma of 0. diffusers' UniPCMultistepScheduler computes exactly
this when it is given those unshifted sigmas and `use_flow_sigmas=True`, so we use it rather than
hand-write the solver. A diffusers-layout folder's own scheduler_config.json is honoured as is, so
that results equal diffusers' WanPipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from wanfit.errors import CheckpointError, ConfigError

# unipc: the official sampler; euler: flow-match Euler; distilled, causvid: few-step (sampling.few_step).
SCHEDULERS = ("unipc", "euler", "distilled", "causvid")
NUM_TRAIN_TIMESTEPS = 1000


def official_sigmas(num_steps: int) -> np.ndarray:
    """The official release's unshifted sigmas; the scheduler applies the shift."""
    sigma_max = 1.0 - 1.0 / NUM_TRAIN_TIMESTEPS  # 0.999, as the official scheduler's table starts
    return np.linspace(sigma_max, 0.0, num_steps + 1)[:-1].copy()


def sampler_sigmas(name: str, num_steps: int) -> np.ndarray:
    """The unshifted sigma table a sampler of ours runs (the scheduler applies the shift)."""
    from wanfit.sampling import few_step

    if name == "distilled":
        return few_step.distilled_sigmas(num_steps)
    if name == "causvid":
        return few_step.causvid_sigmas(num_steps)
    return official_sigmas(num_steps)


def make_scheduler(name: str = "unipc", *, shift: float, config_path: str | Path | None = None):
    """A diffusers scheduler object for `name`, or the one a diffusers folder's config names."""
    if config_path is not None:
        return _scheduler_from_config(Path(config_path), shift)
    scheduler = _make(name, shift)
    scheduler.wanfit_sampler = name  # which sigma table set_timesteps feeds it
    return scheduler


def _make(name: str, shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if name == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="zero",
        )
    if name in ("euler", "causvid"):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    if name == "distilled":
        from wanfit.sampling.few_step import DistilledFlowScheduler

        return DistilledFlowScheduler(shift=shift)
    raise ConfigError(f"Unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}.")


def _scheduler_from_config(path: Path, shift: float | None):
    import diffusers

    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"Could not read the scheduler config {path}: {err}.") from err
    class_name = config.get("_class_name", "")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not class_name.endswith("Scheduler"):
        raise CheckpointError(f"{path} names an unknown scheduler class {class_name!r}.")
    overrides = {}
    if shift is not None:
        overrides["flow_shift" if "flow_shift" in config else "shift"] = shift
    return cls.from_config({**config, **overrides})


def set_timesteps(
    scheduler, num_steps: int, *, official: bool, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Set the scheduler's steps and return its timesteps.

    `official=True` feeds our sigma table (official for UniPC/Euler, see sampler_sigmas); `False` lets a
    diffusers config compute its own, exactly as diffusers' WanPipeline does.
    """
    if num_steps < 1:
        raise ConfigError(f"The number of steps must be at least 1, got {num_steps}.")
    if official:
        sigmas = sampler_sigmas(getattr(scheduler, "wanfit_sampler", "unipc"), num_steps)
        scheduler.set_timesteps(sigmas=sigmas, device=device)
    else:
        scheduler.set_timesteps(num_steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler.timesteps


# Attributes that carry a multistep scheduler's progress between steps: saved for --resume.
_STATE_ATTRS = (
    "model_outputs",
    "timestep_list",
    "lower_order_nums",
    "last_sample",
    "_step_index",
    "this_order",
    "noise_generator_state",  # the distilled sampler's fresh-noise generator
)


def scheduler_state(scheduler) -> dict:
    """The scheduler's progress, as plain values and tensors (see restore_scheduler_state)."""
    state = {}
    for name in _STATE_ATTRS:
        if hasattr(scheduler, name):
            value = getattr(scheduler, name)
            state[name] = list(value) if isinstance(value, list) else value
    return state


def restore_scheduler_state(scheduler, state: dict) -> None:
    for name, value in state.items():
        setattr(scheduler, name, list(value) if isinstance(value, list) else value)


class PerSampleSchedulers:
    """The schedulers of several videos denoised in one batch, each stepping its own rows: a multistep
    scheduler keeps one video's history (UniPC's model outputs, a re-noising sampler's generator), so
    one instance cannot serve several."""

    def __init__(self, schedulers):
        self.schedulers = list(schedulers)

    def step(self, noise: torch.Tensor, t, latents: torch.Tensor, return_dict: bool = False):
        rows = [
            s.step(noise[i : i + 1], t, latents[i : i + 1], return_dict=False)[0]
            for i, s in enumerate(self.schedulers)
        ]
        return (torch.cat(rows),)
