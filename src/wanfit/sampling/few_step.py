"""Few-step samplers for step-distilled Wan2.1 (LightX2V's 4-step LoRA, self-forcing, CausVid).

distilled  LightX2V's WanStepDistillScheduler: denoising steps [1000, 750, 500, 250] (N steps:
           1000 * (1 - i/N), rounded) read off the shifted flow sigmas, sigma(t) = s*u / (1 + (s-1)*u)
           with u = t/1000, timesteps sigma * 1000 (not rounded); each step predicts x0 = x - sigma*v and
           re-noises to the next sigma with fresh Gaussian noise, x = (1 - sigma') x0 + sigma' noise; the last
           step returns x0. That step is diffusers' FlowMatchLCMScheduler; the noise comes from a CPU
           generator seeded with the run's seed and advanced past the initial latents (LightX2V draws both
           from one generator), and its state is saved for --resume.
causvid    the CausVid LoRA recipe's schedule (Wan2GP's and the DiffSynth-style 'flowmatch_causvid'):
           timesteps [1000, 934, 862, 756, 603, 410, 250, 140, 74][:N], sigmas t/1000 (then the
           shift, 1 in the recipe), plain Euler steps (diffusers' FlowMatchEulerDiscreteScheduler).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchLCMScheduler

from wanfit.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000
CAUSVID_TIMESTEPS = (1000, 934, 862, 756, 603, 410, 250, 140, 74)


def distilled_step_list(num_steps: int) -> list[int]:
    """The denoising steps of an N-step distilled run: [1000, 750, 500, 250] for 4."""
    return [round(NUM_TRAIN_TIMESTEPS * (1 - i / num_steps)) for i in range(num_steps)]


def distilled_sigmas(num_steps: int) -> np.ndarray:
    """Unshifted sigmas t/1000 of the step list (the scheduler applies the shift)."""
    return np.array(distilled_step_list(num_steps), dtype=np.float64) / NUM_TRAIN_TIMESTEPS


def causvid_sigmas(num_steps: int) -> np.ndarray:
    if num_steps > len(CAUSVID_TIMESTEPS):
        raise ConfigError(
            f"The causvid sampler runs at most {len(CAUSVID_TIMESTEPS)} steps (its fixed schedule), "
            f"not {num_steps}."
        )
    return np.array(CAUSVID_TIMESTEPS[:num_steps], dtype=np.float64) / NUM_TRAIN_TIMESTEPS


class DistilledFlowScheduler(FlowMatchLCMScheduler):
    """diffusers' flow-match LCM step with its own noise generator, whose state resumes with the run."""

    def __init__(self, shift: float):
        super().__init__(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        self.noise_generator = torch.Generator("cpu").manual_seed(0)

    def seed_noise(self, seed: int, latent_shape: tuple[int, ...]) -> None:
        """Seed with the run's seed and skip the initial latents' draw (they come first from it)."""
        self.noise_generator.manual_seed(seed)
        torch.randn(latent_shape, generator=self.noise_generator, dtype=torch.float32)

    @property
    def noise_generator_state(self) -> torch.Tensor:
        return self.noise_generator.get_state()

    @noise_generator_state.setter
    def noise_generator_state(self, state: torch.Tensor) -> None:
        self.noise_generator.set_state(state.to("cpu"))

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return super().step(
            model_output,
            timestep,
            sample,
            generator=generator or self.noise_generator,
            return_dict=return_dict,
        )
