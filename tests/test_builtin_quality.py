"""The built-in model follows its prompts, and stops doing so when the sampler is broken (issue 16).

The attribute grid (every colour x shape x direction, backgrounds in turn) is generated with the
shipped model on the exact default path and read back by wanfit.quality's detector. Each negative
test puts one classic bug into the pipeline on purpose and checks that the accuracy collapses: a
test suite that cannot tell these apart from the real sampler would pass them all.
"""

import pytest

from wanfit.builtin import SAMPLING
from wanfit.quality import GRID, Setting, evaluate

# Every fifth cell of the grid: all colours, shapes, directions and both backgrounds.
SUBSET = GRID[::5]


@pytest.fixture(scope="module")
def default_report():
    return evaluate(psnr=False)


def test_the_model_draws_what_the_prompt_says(default_report):
    summary = default_report.summary()
    assert len(default_report.scenes) == 75
    assert summary["colour"] >= 0.9, summary
    assert summary["direction"] >= 0.9, summary
    assert summary["shape"] >= 0.7, summary


def flipped_velocity(pipe):
    """The sampler reads the DiT's velocity with the wrong sign."""
    predict = pipe.predict_noise
    pipe.predict_noise = lambda *args, **kwargs: -predict(*args, **kwargs)


def swapped_guidance(pipe):
    """Classifier-free guidance pushes away from the prompt: cond and uncond swapped."""
    predict = pipe.predict_noise
    pipe.predict_noise = lambda x, t, cond, uncond, guidance: predict(x, t, uncond, cond, guidance)


def unshifted_timesteps(pipe):
    """The solver steps along the shifted sigmas, but the DiT is told the unshifted timestep."""
    predict, shift = pipe.predict_noise, SAMPLING.shift

    def told_unshifted(x, t, cond, uncond, guidance):
        sigma = t / 1000
        return predict(x, 1000 * sigma / (shift - (shift - 1) * sigma), cond, uncond, guidance)

    pipe.predict_noise = told_unshifted


def raw_latents(pipe):
    """The VAE decodes the DiT's normalised latent without denormalising it."""
    pipe.vae.denormalize = lambda z: z


BUGS = {
    "velocity sign": Setting("velocity sign", patch=flipped_velocity),
    "guidance swapped": Setting("guidance swapped", patch=swapped_guidance),
    "shift: unshifted timesteps": Setting("unshifted timesteps", patch=unshifted_timesteps),
    "shift inverted": Setting("shift inverted", call={"shift": 1 / SAMPLING.shift}),
    "latent normalisation": Setting("latents not denormalised", patch=raw_latents),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_each_broken_sampler_is_caught(bug, default_report):
    broken = evaluate(BUGS[bug], scenes=SUBSET, psnr=False)
    right = default_report.accuracy("all")
    assert right >= 0.6
    assert broken.accuracy("all") <= right / 3, broken.summary()


def test_the_harness_reports_accuracy_and_psnr_against_the_default_path(default_report):
    subset = [default_report.frames[GRID.index(s)] for s in SUBSET]
    reference = type(default_report)("default", SUBSET, [], subset)
    fewer = evaluate(Setting("6 steps", call={"num_inference_steps": 6}), scenes=SUBSET, reference=reference)
    assert 10 < fewer.psnr < 60, fewer.summary()
    same = evaluate(
        Setting("cfg unbatched", plan={"cfg_batch": False}), scenes=SUBSET[:3], reference=reference
    )
    assert same.psnr > 40  # exact up to float rounding: the same prediction in two calls
    assert set(fewer.summary()) == {"setting", "videos", "colour", "shape", "direction", "all", "psnr_db"}
