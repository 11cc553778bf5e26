"""Text-to-video: encode the prompts, denoise the latents, decode the video, under a Plan."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wanfit.errors import ConfigError
from wanfit.plan.plan import Plan, default_plan
from wanfit.sampling import schedulers

# The official default negative prompt (Wan2.1's shared config), used when none is given.
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

VAE_STRIDE = (4, 8, 8)
SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class SamplingDefaults:
    """Official recommendations for T2V-1.3B at 480p; a diffusers folder's scheduler config wins."""

    guidance_scale: float = 6.0
    shift: float = 8.0
    num_inference_steps: int = 50
    scheduler: str = "unipc"
    negative_prompt: str = OFFICIAL_NEGATIVE_PROMPT


def validate_request(
    height: int, width: int, num_frames: int, num_inference_steps: int, guidance_scale: float
) -> None:
    """One clear sentence for each setting no model can run."""
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise ConfigError(
            f"Width and height must be positive multiples of {SIZE_MULTIPLE}, got {width}x{height}."
        )
    if num_frames < 1 or (num_frames - 1) % VAE_STRIDE[0]:
        raise ConfigError(f"The frame count must be 4k+1 (1, 5, 9, ..., 81), got {num_frames}.")
    if num_inference_steps < 1:
        raise ConfigError(f"The number of steps must be at least 1, got {num_inference_steps}.")
    if guidance_scale < 0:
        raise ConfigError(f"The guidance scale must not be negative, got {guidance_scale}.")


def latent_shape(batch: int, channels: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
    return (
        batch,
        channels,
        (num_frames - 1) // VAE_STRIDE[0] + 1,
        height // VAE_STRIDE[1],
        width // VAE_STRIDE[2],
    )


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise from a CPU generator: the same seed gives the same video on any device."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """[1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], rounded as diffusers' video processor does."""
    video = (video[0].float() / 2 + 0.5).clamp(0, 1)
    return (video.permute(1, 2, 3, 0).cpu().numpy() * 255).round().astype(np.uint8)


@dataclass
class DenoiseState:
    """Everything needed to continue a denoising run from `step` (saved by --checkpoint-every)."""

    latents: torch.Tensor
    step: int
    scheduler_state: dict = field(default_factory=dict)


class WanPipeline:
    """Wan2.1 text-to-video: `pipe(prompt) -> uint8 frames [F, H, W, 3]`."""

    def __init__(
        self,
        dit: torch.nn.Module,
        vae,
        text_encoder,
        *,
        plan: Plan | None = None,
        defaults: SamplingDefaults | None = None,
        scheduler_config: Path | None = None,
        name: str = "wan2.1",
    ):
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.plan = plan or default_plan()
        self.defaults = defaults or SamplingDefaults()
        self.scheduler_config = scheduler_config
        self.name = name
        self.dit_calls = 0  # forward passes of the DiT in the last run (tests read it)
        self.timings: dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | None = None,
        plan: Plan | None = None,
        scheduler_config: str | Path | None = None,
        **overrides,
    ):
        """Load an official release folder or a diffusers-layout folder.

        scheduler_config: a diffusers scheduler_config.json to use instead of the folder's own (or, for
        an official folder, instead of the official UniPC); overrides: SamplingDefaults fields.
        """
        from wanfit import load_dit, load_text_encoder, load_vae
        from wanfit.weights.model_dir import find_model_files

        files = find_model_files(model_dir)
        plan = plan or default_plan(device)
        dtype = plan.torch_compute_dtype
        dit = load_dit(files.dit, device=plan.device, dtype=dtype)
        vae = load_vae(files.vae, device=plan.device, dtype=dtype)
        text_encoder = load_text_encoder(
            files.text_encoder,
            tokenizer=files.tokenizer,
            device=plan.text_encoder_device,
            dtype=plan.torch_text_encoder_dtype,
        )
        defaults = SamplingDefaults(**overrides) if overrides else None
        return cls(
            dit,
            vae,
            text_encoder,
            plan=plan,
            defaults=defaults,
            scheduler_config=Path(scheduler_config) if scheduler_config else files.scheduler_config,
            name=str(files.root),
        )

    # -- phases --------------------------------------------------------------------------------

    def encode_prompts(
        self, prompt: str, negative_prompt: str, *, with_negative: bool
    ) -> tuple[torch.Tensor, ...]:
        prompts = [prompt, negative_prompt] if with_negative else [prompt]
        text_len = getattr(getattr(self.dit, "config", None), "text_len", 512)
        embeds = self.text_encoder.encode(prompts, max_length=text_len)
        device, dtype = torch.device(self.plan.device), self.plan.torch_compute_dtype
        embeds = embeds.to(device=device, dtype=dtype)
        if self.plan.free_text_encoder and hasattr(self.text_encoder, "release"):
            self.text_encoder.release()
        return tuple(embeds[i : i + 1] for i in range(len(prompts)))

    def make_scheduler(self, shift: float | None):
        """A diffusers folder's own scheduler (its shift unless one is given), else our official UniPC."""
        if self.scheduler_config is not None:
            return schedulers.make_scheduler(config_path=self.scheduler_config, shift=shift)
        return schedulers.make_scheduler(
            self.defaults.scheduler, shift=self.defaults.shift if shift is None else shift
        )

    def predict_noise(
        self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond, guidance: float
    ):
        """One guided DiT prediction: cond and uncond in one batch or one after the other, per the plan."""
        dtype = self.plan.torch_compute_dtype
        x = latents.to(dtype)
        if uncond is None:
            self.dit_calls += 1
            return self.dit(x, t.expand(1), cond).float()
        if self.plan.cfg_batch:
            self.dit_calls += 1
            both = self.dit(torch.cat([x, x]), t.expand(2), torch.cat([cond, uncond])).float()
            noise_cond, noise_uncond = both.chunk(2)
        else:
            self.dit_calls += 2
            noise_cond = self.dit(x, t.expand(1), cond).float()
            noise_uncond = self.dit(x, t.expand(1), uncond).float()
        return noise_uncond + guidance * (noise_cond - noise_uncond)

    def denoise(
        self,
        state: DenoiseState,
        scheduler,
        timesteps: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        guidance: float,
        *,
        progress: bool = True,
        on_step: Callable[[DenoiseState], None] | None = None,
    ) -> torch.Tensor:
        from tqdm.auto import tqdm

        latents = state.latents
        bar = tqdm(
            total=len(timesteps), initial=state.step, desc="denoising", unit="step", disable=not progress
        )
        try:
            for i in range(state.step, len(timesteps)):
                t = timesteps[i]
                with torch.no_grad():
                    noise = self.predict_noise(latents, t.to(latents.device).float(), cond, uncond, guidance)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                bar.update(1)
                if on_step is not None:
                    on_step(DenoiseState(latents, i + 1, schedulers.scheduler_state(scheduler)))
        finally:
            bar.close()
        return latents

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        z = self.vae.denormalize(latents.to(self.vae.dtype))
        with torch.no_grad():
            video = self.vae.decode(z, tile=self.plan.vae_tile)
        return frames_to_uint8(video)

    # -- the whole job ---------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        progress: bool = True,
        resume: DenoiseState | None = None,
        on_step: Callable[[DenoiseState], None] | None = None,
    ) -> np.ndarray:
        steps = self.defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        validate_request(height, width, num_frames, steps, guidance)
        if negative_prompt is None:
            negative_prompt = self.defaults.negative_prompt
        self.dit_calls = 0
        device = torch.device(self.plan.device)

        started = time.perf_counter()
        use_cfg = guidance != 1.0
        embeds = self.encode_prompts(prompt, negative_prompt, with_negative=use_cfg)
        cond, uncond = embeds[0], (embeds[1] if use_cfg else None)
        self.timings["text_encoder_s"] = time.perf_counter() - started

        scheduler = self.make_scheduler(shift)
        folder_scheduler = self.scheduler_config is not None
        timesteps = schedulers.set_timesteps(scheduler, steps, official=not folder_scheduler, device=device)

        in_channels = getattr(getattr(self.dit, "config", None), "in_dim", 16)
        shape = latent_shape(1, in_channels, height, width, num_frames)
        if resume is not None:
            state = resume
            schedulers.restore_scheduler_state(scheduler, resume.scheduler_state)
        else:
            if latents is None:
                latents = initial_noise(shape, 0 if seed is None else seed)
            elif tuple(latents.shape) != shape:
                raise ConfigError(f"The given latents have shape {tuple(latents.shape)}, expected {shape}.")
            state = DenoiseState(latents.to(device=device, dtype=torch.float32), 0)
        state.latents = state.latents.to(device=device, dtype=torch.float32)

        started = time.perf_counter()
        final = self.denoise(
            state, scheduler, timesteps, cond, uncond, guidance, progress=progress, on_step=on_step
        )
        self.timings["denoise_s"] = time.perf_counter() - started

        started = time.perf_counter()
        frames = self.decode(final)
        self.timings["vae_decode_s"] = time.perf_counter() - started
        return frames
