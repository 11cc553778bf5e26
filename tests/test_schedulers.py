import numpy as np
import pytest
import torch

from wanfit import checkpointing
from wanfit.errors import ConfigError
from wanfit.pipeline import DenoiseState
from wanfit.sampling import schedulers


def official_shifted_sigmas(steps: int, shift: float) -> np.ndarray:
    """The official release's formula, written out independently of the module under test."""
    sigma = np.linspace(0.999, 0, steps + 1)[:-1]
    return shift * sigma / (1 + (shift - 1) * sigma)


@pytest.mark.parametrize("steps,shift", [(50, 8.0), (10, 5.0), (3, 1.0)])
def test_unipc_uses_the_official_sigmas_and_timesteps(steps, shift):
    scheduler = schedulers.make_scheduler("unipc", shift=shift)
    timesteps = schedulers.set_timesteps(scheduler, steps, official=True)
    expected = official_shifted_sigmas(steps, shift)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), expected, rtol=0, atol=1e-6)
    assert scheduler.sigmas[-1].item() == 0.0
    assert timesteps.dtype == torch.int64
    assert timesteps.tolist() == (expected * 1000).astype(np.int64).tolist()
    assert scheduler.config.solver_order == 2 and scheduler.config.solver_type == "bh2"


def test_euler_uses_the_same_sigma_table():
    scheduler = schedulers.make_scheduler("euler", shift=8.0)
    schedulers.set_timesteps(scheduler, 20, official=True)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), official_shifted_sigmas(20, 8.0), atol=1e-6)


def test_unknown_scheduler_and_bad_steps_are_clear_errors():
    with pytest.raises(ConfigError, match="Unknown scheduler"):
        schedulers.make_scheduler("ddim", shift=1.0)
    with pytest.raises(ConfigError, match="at least 1"):
        schedulers.set_timesteps(schedulers.make_scheduler(shift=1.0), 0, official=True)


def _run(scheduler, timesteps, latents, outputs, start, stop):
    for i in range(start, stop):
        latents = scheduler.step(outputs[i], timesteps[i], latents, return_dict=False)[0]
    return latents


def test_scheduler_state_survives_a_resume_file(tmp_path):
    torch.manual_seed(0)
    steps = 8
    latents = torch.randn(1, 4, 2, 3, 5)
    outputs = [torch.randn_like(latents) for _ in range(steps)]

    straight = schedulers.make_scheduler("unipc", shift=8.0)
    ts = schedulers.set_timesteps(straight, steps, official=True)
    expected = _run(straight, ts, latents, outputs, 0, steps)

    first = schedulers.make_scheduler("unipc", shift=8.0)
    ts = schedulers.set_timesteps(first, steps, official=True)
    half = _run(first, ts, latents, outputs, 0, 5)
    path = tmp_path / "run.ckpt"
    settings = dict.fromkeys(checkpointing.REQUEST_KEYS) | {"seed": 1, "steps": steps}
    checkpointing.save(path, DenoiseState(half, 5, schedulers.scheduler_state(first)), settings)

    state, request = checkpointing.load(path)
    assert request == settings and state.step == 5
    second = schedulers.make_scheduler("unipc", shift=8.0)
    ts = schedulers.set_timesteps(second, steps, official=True)
    schedulers.restore_scheduler_state(second, state.scheduler_state)
    resumed = _run(second, ts, state.latents, outputs, 5, steps)
    assert torch.equal(resumed, expected)
    # Without the scheduler's memory the continuation differs: the state really matters.
    fresh = schedulers.make_scheduler("unipc", shift=8.0)
    ts = schedulers.set_timesteps(fresh, steps, official=True)
    fresh._step_index = 5
    assert not torch.equal(_run(fresh, ts, state.latents, outputs, 5, steps), expected)
