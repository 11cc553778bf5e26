"""Few-step samplers: the distilled schedule against LightX2V's formula, its re-noising step, CausVid's
schedule, the presets, and a resumed few-step run (its fresh noise comes from a saved generator)."""

import numpy as np
import pytest
import torch

from wanfit import checkpointing
from wanfit.demo import tiny_pipeline
from wanfit.errors import ConfigError
from wanfit.pipeline import DenoiseState
from wanfit.sampling import schedulers
from wanfit.sampling.presets import PRESETS, get_preset


def lightx2v_schedule(step_list, shift):
    """LightX2V's WanStepDistillScheduler.set_denoising_timesteps, written out independently."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    index = [1000 - t for t in step_list]
    return sigmas[index], (sigmas * 1000)[index]


@pytest.mark.parametrize("shift", [5.0, 8.0, 1.0])
def test_distilled_sigmas_and_timesteps_equal_lightx2v(shift):
    scheduler = schedulers.make_scheduler("distilled", shift=shift)
    timesteps = schedulers.set_timesteps(scheduler, 4, official=True)
    sigmas, expected_t = lightx2v_schedule([1000, 750, 500, 250], shift)
    torch.testing.assert_close(scheduler.sigmas[:-1], sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(timesteps, expected_t, rtol=0, atol=1e-4)
    assert scheduler.sigmas[-1] == 0 and timesteps.dtype == torch.float32  # not rounded to integers
    if shift == 5.0:
        np.testing.assert_allclose(timesteps.numpy(), [1000.0, 937.5, 833.3333, 625.0], rtol=1e-6)


def test_other_step_counts_spread_the_steps_evenly():
    from wanfit.sampling.few_step import distilled_step_list

    assert distilled_step_list(4) == [1000, 750, 500, 250]
    assert distilled_step_list(2) == [1000, 500]
    assert distilled_step_list(8) == [1000, 875, 750, 625, 500, 375, 250, 125]


def test_the_distilled_step_predicts_x0_and_renoises_with_its_own_generator():
    scheduler = schedulers.make_scheduler("distilled", shift=5.0)
    timesteps = schedulers.set_timesteps(scheduler, 4, official=True)
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(1, 4, 2, 3, 5, generator=gen), torch.randn(1, 4, 2, 3, 5, generator=gen)
    scheduler.seed_noise(7, tuple(x.shape))
    replay = torch.Generator().manual_seed(7)
    torch.randn(x.shape, generator=replay)  # the initial latents come first from the seed's stream
    sigma, sigma_next = scheduler.sigmas[0], scheduler.sigmas[1]
    out = scheduler.step(v, timesteps[0], x, return_dict=False)[0]
    x0 = x - sigma * v
    expected = (1 - sigma_next) * x0 + sigma_next * torch.randn(x.shape, generator=replay)
    torch.testing.assert_close(out, expected)
    for i in (1, 2):
        out = scheduler.step(v, timesteps[i], out, return_dict=False)[0]
    last = scheduler.step(v, timesteps[3], out, return_dict=False)[0]
    torch.testing.assert_close(last, out - scheduler.sigmas[3] * v)  # the last step returns x0


def test_causvid_schedule_and_its_limit():
    scheduler = schedulers.make_scheduler("causvid", shift=1.0)
    timesteps = schedulers.set_timesteps(scheduler, 6, official=True)
    assert timesteps.tolist() == [1000.0, 934.0, 862.0, 756.0, 603.0, 410.0]
    torch.testing.assert_close(scheduler.sigmas[:-1], timesteps / 1000)
    with pytest.raises(ConfigError, match="at most 9 steps"):
        schedulers.set_timesteps(scheduler, 10, official=True)


def test_presets_name_their_settings():
    preset = get_preset("lightx2v-4step")
    assert (preset.sampler, preset.steps, preset.shift, preset.guidance, preset.lora_strength) == (
        "distilled",
        4,
        5.0,
        1.0,
        1.0,
    )
    assert set(PRESETS) == {"lightx2v-4step", "causvid", "self-forcing"}
    # Self-Forcing's configs: [1000, 750, 500, 250] warped with timestep_shift 5, CFG off: the same
    # schedule as LightX2V's 4-step one.
    sf = PRESETS["self-forcing"]
    assert (sf.sampler, sf.steps, sf.shift, sf.guidance) == ("distilled", 4, 5.0, 1.0)
    assert all(p.sampler in schedulers.SCHEDULERS and p.guidance == 1.0 for p in PRESETS.values())
    with pytest.raises(ConfigError, match="Unknown preset 'turbo'"):
        get_preset("turbo")


JOB = dict(height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=1.0, shift=5.0, seed=11)


def test_a_resumed_few_step_run_gives_the_uninterrupted_frames(tmp_path):
    pipe = tiny_pipeline(device="cpu")
    states = []
    straight = pipe("a fox", sampler="distilled", progress=False, on_step=states.append, **JOB)
    assert pipe.dit_calls == 4  # guidance 1: one DiT pass per step

    path = tmp_path / "run.ckpt"
    request = dict.fromkeys(checkpointing.REQUEST_KEYS) | {"steps": 4}
    checkpointing.save(path, states[1], request)  # stopped after step 2 of 4
    state, _ = checkpointing.load(path)
    assert "noise_generator_state" in state.scheduler_state
    resumed = tiny_pipeline(device="cpu")("a fox", sampler="distilled", progress=False, resume=state, **JOB)
    assert np.array_equal(resumed, straight)

    # The saved generator matters: without it the fresh noise (and the frames) differ.
    fresh = dict(state.scheduler_state)
    del fresh["noise_generator_state"]
    other = tiny_pipeline(device="cpu")(
        "a fox", sampler="distilled", progress=False, resume=DenoiseState(state.latents, 2, fresh), **JOB
    )
    assert not np.array_equal(other, straight)
