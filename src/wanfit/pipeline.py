"""Text-to-video: encode the prompts, denoise the latents, decode the video, under a Plan."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wanfit.errors import ConfigError
from wanfit.models.configs import VAE_STRIDE, latent_shape  # noqa: F401  (latent_shape: public here too)
from wanfit.plan.plan import ATTENTION_KINDS, Plan
from wanfit.sampling import schedulers

# The official default negative prompt (Wan2.1's shared config), used when none is given.
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

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


def text_encoder_compute_dtype(plan: Plan) -> torch.dtype:
    """umT5's compute dtype: fp32 over fp32 weights, else the text encoder's policy (never fp16)."""
    from wanfit.models.text_encoder import text_encoder_precision

    if plan.text_encoder_dtype == "float32":
        return torch.float32
    device_type = torch.device(plan.text_encoder_device).type
    return text_encoder_precision(plan.torch_compute_dtype, device_type).compute


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise from a CPU generator: the same seed gives the same video on any device."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """[1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], rounded as diffusers' video processor does.

    Converted on the host: fp32 copies of a whole video on the card would add to the decode's peak.
    """
    video = (video[0].to("cpu", torch.float32) / 2 + 0.5).clamp(0, 1)
    return (video.permute(1, 2, 3, 0).cpu().numpy() * 255).round().astype(np.uint8)


@dataclass
class DenoiseState:
    """Everything needed to continue a denoising run from `step` (saved by --checkpoint-every)."""

    latents: torch.Tensor
    step: int
    scheduler_state: dict = field(default_factory=dict)


def resident_plan(hw, dit=None) -> Plan:
    """Everything resident on the probed device, dtypes by wanfit.precision's policy, no memory check:
    the plan of a pipeline built in code without one (from_pretrained plans for real)."""
    from wanfit.models.configs import WAN_T2V_1_3B, DiTConfig
    from wanfit.plan.estimates import Request
    from wanfit.plan.planner import budget_from_probe, fastest_plan

    config = getattr(dit, "config", None)
    request = Request(config if isinstance(config, DiTConfig) else WAN_T2V_1_3B)
    return fastest_plan(budget_from_probe(hw), request)


class WanPipeline:
    """Wan2.1 text-to-video: `pipe(prompt) -> uint8 frames [F, H, W, 3]` (None on the ranks other than
    0 of a run on several processes)."""

    def __init__(
        self,
        dit: torch.nn.Module,
        vae,
        text_encoder,
        *,
        plan=None,
        defaults: SamplingDefaults | None = None,
        scheduler_config: Path | None = None,
        name: str = "wan2.1",
        text_encoder_loader: Callable[[Plan], object] | None = None,
    ):
        """plan: a PlanResult from wanfit.plan.planning.plan_for (its frozen fields and hardware are
        kept for re-planning), a bare Plan (obeyed as it is), or None: everything resident with this
        machine's dtypes. text_encoder_loader(plan): loads the text encoder again, placed as `plan` says,
        after a plan freed it."""
        from wanfit.plan.planner import PlanResult

        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.planning: PlanResult | None = plan if isinstance(plan, PlanResult) else None
        self.hardware = self.planning.hardware if self.planning is not None else None
        if self.planning is not None:
            plan = self.planning.plan
        self.plan = plan if plan is not None else resident_plan(self._hardware(), dit)
        self.defaults = defaults or SamplingDefaults()
        self.scheduler_config = scheduler_config
        self.name = name
        self.text_encoder_loader = text_encoder_loader
        self.dit_calls = 0  # forward passes of the DiT in the last run (tests read it)
        self.timings: dict[str, float] = {}
        # (plan, phase) -> the next lighter plan or None, for the OOM guard; default: the planner's.
        self.step_down: Callable[[Plan, str], Plan | None] | None = None
        self.oom_steps: list[tuple[str, str, str]] = []  # what the OOM guard gave up in the last run
        self.attention_record: dict[str, dict] = {}  # phase -> kind -> what served it (last run)
        self._request = None  # the planner's view of the current call (for step_down)
        # A run on several processes: wanfit.runtime.parallel.DiTParallel (set by the caller), which
        # spreads each DiT prediction over them; rank 0 alone decodes and returns frames.
        self.parallel = None
        self.dispatchers = self._make_dispatchers()
        if isinstance(getattr(text_encoder, "model", None), torch.nn.Module):
            # Loaded as this plan says (from_pretrained, demo); apply_plan moves it when the plan changes.
            text_encoder._wanfit_placement = (
                self.plan.text_encoder_device,
                self.plan.text_encoder_blocks_resident,
            )

    def _hardware(self):
        if self.hardware is None:
            from wanfit.hardware.probe import probe

            self.hardware = probe()
        return self.hardware

    def _make_dispatchers(self) -> dict:
        """One attention dispatcher per kind, following the Plan's backends, handed to the models."""
        from wanfit.attention.dispatch import Dispatcher

        hw = self._hardware()
        dispatchers = {}
        for kind in ATTENTION_KINDS:
            dispatchers[kind] = Dispatcher(
                hw, forced=self.plan.attention_for(kind) or self.plan.attention, strict=False, kind=kind
            )
        if hasattr(self.dit, "set_attention_dispatchers"):
            self.dit.set_attention_dispatchers(dispatchers["self"], dispatchers["cross"])
        if hasattr(self.vae, "set_attention_dispatcher"):
            self.vae.set_attention_dispatcher(dispatchers["vae"])
        return dispatchers

    def _record_attention(self, phase: str, kinds: tuple[str, ...]) -> None:
        """What served each kind of attention in `phase` (calls per backend, switches), then reset."""
        self.attention_record[phase] = {}
        for kind in kinds:
            d = self.dispatchers[kind]
            self.attention_record[phase][kind] = {"planned": self.plan.attention_for(kind), **d.report()}
            d.reset_report()

    def run_record(self) -> dict:
        """What ran in the last call, for the output's metadata: plan, what the user set, attention per
        phase (backends that served it and any switch), dtypes, placement, step-downs, timings."""
        from wanfit import __version__

        plan = self.plan
        return {
            "tool": "wanfit",
            "wanfit_version": __version__,
            "plan": plan.to_dict(),
            "user_set": sorted(self.planning.frozen) if self.planning is not None else [],
            "attention": self.attention_record,
            "dtypes": {
                "compute": plan.compute_dtype,
                "storage": plan.storage_dtype or plan.compute_dtype,
                "text_encoder": plan.text_encoder_dtype,
            },
            "placement": {
                "dit": plan.device
                if plan.dit_blocks_resident is None
                else f"{plan.device}, {plan.dit_blocks_resident} blocks resident, the rest streamed",
                "text_encoder": plan.text_encoder_device
                if plan.text_encoder_blocks_resident is None
                else f"{plan.text_encoder_device}, streamed",
                "vae": plan.device,
            },
            "timings": self.timings,
            "oom_steps": [list(step) for step in self.oom_steps],
        }

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | None = None,
        plan="auto",
        scheduler_config: str | Path | None = None,
        hardware=None,
        constraints=None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        progress: bool = True,
        **overrides,
    ):
        """Load an official release folder or a diffusers-layout folder.

        plan: "auto" (the default) plans for this machine (or `hardware`: a probe or an --emulate card
        name) and a job of height x width x num_frames, as `wanfit plan` would, under `constraints`
        (wanfit.plan.planning.Constraints); or a PlanResult / Plan to obey. scheduler_config: a
        diffusers scheduler_config.json to use instead of the folder's own (or, for an official folder,
        instead of the official UniPC); overrides: SamplingDefaults fields.
        """
        from wanfit import load_dit, load_text_encoder, load_vae
        from wanfit.weights.model_dir import find_model_files

        files = find_model_files(model_dir)
        planned = plan
        if isinstance(plan, str) and plan == "auto":
            from dataclasses import replace

            from wanfit.plan.planning import Constraints, model_request, plan_for

            constraints = constraints or Constraints()
            if device is not None:
                constraints = replace(constraints, device=device)
            guidance = overrides.get("guidance_scale", SamplingDefaults.guidance_scale) != 1.0
            request = model_request(
                files.root, width=width, height=height, frames=num_frames, guidance=guidance
            )
            planned = plan_for(request, constraints, hardware)
        plan = getattr(planned, "plan", planned)
        if not isinstance(plan, Plan):
            raise ConfigError(f"plan must be 'auto', a Plan or a PlanResult, not {plan!r}.")
        dtype = plan.torch_compute_dtype
        # A streamed (or fp8) DiT is loaded on the host; apply_plan places it block by block.
        streamed = plan.dit_blocks_resident is not None or plan.storage_dtype is not None

        def text_encoder_loader(plan: Plan = plan):
            encoder = load_text_encoder(
                files.text_encoder,
                tokenizer=files.tokenizer,
                device="cpu" if plan.text_encoder_blocks_resident is not None else plan.text_encoder_device,
                dtype=plan.torch_text_encoder_dtype,
                compute_dtype=text_encoder_compute_dtype(plan),
            )
            if plan.text_encoder_blocks_resident is not None:
                from wanfit.runtime.offload import stream_text_encoder

                stream_text_encoder(encoder, plan.text_encoder_device, plan.text_encoder_blocks_resident)
            return encoder

        from tqdm.auto import tqdm

        # Transient: the bar clears itself, so an error about a file stands alone on its line.
        with tqdm(total=3, desc="loading DiT", unit="model", disable=not progress, leave=False) as bar:
            dit = load_dit(files.dit, device="cpu" if streamed else plan.device, dtype=dtype)
            bar.set_description("loading VAE")
            bar.update(1)
            vae = load_vae(files.vae, device=plan.device, dtype=dtype)
            bar.set_description("loading text encoder")
            bar.update(1)
            text_encoder = text_encoder_loader(plan)
            bar.update(1)

        defaults = SamplingDefaults(**overrides) if overrides else None
        return cls(
            dit,
            vae,
            text_encoder,
            plan=planned,
            defaults=defaults,
            scheduler_config=Path(scheduler_config) if scheduler_config else files.scheduler_config,
            name=str(files.root),
            text_encoder_loader=text_encoder_loader,
        )

    # -- plan ----------------------------------------------------------------------------------

    def apply_plan(self, plan: Plan) -> None:
        """Switch to `plan`, also mid-run: the DiT's placement and chunking follow it at once; the
        other settings (cfg_batch, vae_tile, ...) are read at each call."""
        self.plan = plan
        self._place_text_encoder()
        self._place_dit()

    def _place_text_encoder(self) -> None:
        """Follow the plan's text-encoder placement (device, streaming) if it changed."""
        model = getattr(self.text_encoder, "model", None)
        if not isinstance(model, torch.nn.Module):
            return  # released, or not a WanTextEncoder
        from wanfit.runtime.offload import stream_text_encoder

        key = (self.plan.text_encoder_device, self.plan.text_encoder_blocks_resident)
        if getattr(self.text_encoder, "_wanfit_placement", None) == key:
            return
        streamer = getattr(self.text_encoder, "_wanfit_streamer", None)
        if streamer is not None:
            streamer.detach("cpu")
            self.text_encoder._wanfit_streamer = None
        if self.plan.text_encoder_blocks_resident is not None:
            model.to("cpu")
            stream_text_encoder(
                self.text_encoder, self.plan.text_encoder_device, self.plan.text_encoder_blocks_resident
            )
        else:
            model.to(self.plan.text_encoder_device)
        self.text_encoder.compute_dtype = text_encoder_compute_dtype(self.plan)
        self.text_encoder._wanfit_placement = key

    def _place_dit(self) -> None:
        if isinstance(getattr(self.dit, "blocks", None), torch.nn.ModuleList):
            from wanfit.runtime.compile import set_compiled
            from wanfit.runtime.offload import configure_dit

            streamer = configure_dit(self.dit, self.plan)
            # Compiled blocks would trace the streamer's hooks: compile only a resident DiT.
            set_compiled(self.dit, self.plan.compile_dit and streamer is None)

    def _next_plan(self, plan: Plan, phase: str) -> Plan | None:
        """The planner's next notch for `phase`, with the request and the user's frozen settings of
        this plan; PlanError naming the setting when only a user-set one could give."""
        if self.parallel is not None and phase == "denoise":
            raise self.parallel.out_of_memory(phase)
        if self.step_down is not None:
            return self.step_down(plan, phase)
        from wanfit.errors import PlanError
        from wanfit.plan.estimates import estimate_phases
        from wanfit.plan.planner import blocking_setting, fmt_bytes, planned_backend, step_down

        frozen = self.planning.frozen if self.planning is not None else frozenset()
        nxt = step_down(plan, self._request, phase, frozen=frozen)
        if nxt is None:
            setting = blocking_setting(plan, self._request, phase, frozen)
            if setting is not None:
                need = estimate_phases(self._request, plan, planned_backend(plan))[phase].peak
                value = plan.to_dict()[setting]
                raise PlanError(
                    f"Out of memory during {phase}, and only a setting you fixed could give: {setting}={value} "
                    f"(the {phase} phase needs about {fmt_bytes(need)} with it); drop that setting or free memory."
                )
        return nxt

    def _oom_guard(self):
        from wanfit.runtime.oom import OOMGuard

        guard = OOMGuard(lambda: self.plan, self._next_plan, self.apply_plan)
        guard.history = self.oom_steps
        return guard

    def _planner_request(self, height: int, width: int, num_frames: int, guidance: bool):
        """The planner's Request for this call: the planned one resized, else one from the DiT's config."""
        from dataclasses import replace

        from wanfit.models.configs import WAN_T2V_1_3B, DiTConfig
        from wanfit.plan.estimates import Request

        if self.planning is not None:
            request = self.planning.requested or self.planning.request
            return replace(request, height=height, width=width, num_frames=num_frames, guidance=guidance)
        config = getattr(self.dit, "config", None)
        return Request(
            config if isinstance(config, DiTConfig) else WAN_T2V_1_3B,
            height=height,
            width=width,
            num_frames=num_frames,
            guidance=guidance,
        )

    # -- phases --------------------------------------------------------------------------------

    def encode_prompts(
        self, prompt: str, negative_prompt: str, *, with_negative: bool
    ) -> tuple[torch.Tensor, ...]:
        prompts = [prompt, negative_prompt] if with_negative else [prompt]
        text_len = getattr(getattr(self.dit, "config", None), "text_len", 512)
        if getattr(self.text_encoder, "model", True) is None and self.text_encoder_loader is not None:
            # An earlier call freed it (the plan said so): load it again, placed as the plan says.
            self.text_encoder = self.text_encoder_loader(self.plan)
        # Out of memory: stream the encoder or move it to the CPU (the planner's next notch) and retry.
        embeds = self._oom_guard().run(
            "text_encoder", lambda: self.text_encoder.encode(prompts, max_length=text_len)
        )
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
        """One guided DiT prediction: cond and uncond in one batch or one after the other, per the plan
        (or, CFG-parallel, on two groups of processes)."""
        dtype = self.plan.torch_compute_dtype
        x = latents.to(dtype)
        parallel = self.parallel
        dit = self.dit if parallel is None else parallel.bind(self.dit)
        if uncond is None:
            self.dit_calls += 1
            return dit(x, t.expand(1), cond).float()
        if parallel is not None and parallel.cfg_parallel:
            self.dit_calls += 1
            noise_cond, noise_uncond = parallel.guided_pair(self.dit, x, t, cond, uncond)
        elif self.plan.cfg_batch:
            self.dit_calls += 1
            both = dit(torch.cat([x, x]), t.expand(2), torch.cat([cond, uncond])).float()
            noise_cond, noise_uncond = both.chunk(2)
        else:
            self.dit_calls += 2
            noise_cond = dit(x, t.expand(1), cond).float()
            noise_uncond = dit(x, t.expand(1), uncond).float()
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
        self._place_dit()
        guard = self._oom_guard()
        bar = tqdm(
            total=len(timesteps),
            initial=state.step,
            desc="denoising",
            unit="step",
            disable=not progress,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3g}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
        )
        # The bar moves with every DiT block, so a long first step shows progress and an ETA too.
        blocks = getattr(self.dit, "blocks", None)
        hooks = []
        if progress and isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            passes = (
                2 if uncond is not None and not self.plan.cfg_batch and self.plan.cfg_parallel == 1 else 1
            )
            share = 1.0 / (len(blocks) * passes)

            def advance(*_):
                bar.update(share)

            hooks = [block.register_forward_hook(advance) for block in blocks]
        try:
            for i in range(state.step, len(timesteps)):
                t = timesteps[i]
                with torch.no_grad():
                    # Out of memory: step the plan down and predict this step again from the same latents.
                    noise = guard.run(
                        "denoise",
                        lambda x=latents, t=t: self.predict_noise(
                            x, t.to(x.device).float(), cond, uncond, guidance
                        ),
                        what=f"step {i}",
                    )
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                bar.n = i + 1  # exact at each step's end, whatever the blocks added (or a retried step)
                bar.refresh()
                if on_step is not None:
                    on_step(DenoiseState(latents, i + 1, schedulers.scheduler_state(scheduler)))
        finally:
            for hook in hooks:
                hook.remove()
            bar.close()
        return latents

    def decode(self, latents: torch.Tensor, *, progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        if self.plan.offload_dit_before_decode and isinstance(self.dit, torch.nn.Module):
            from wanfit.runtime.offload import release_dit

            release_dit(self.dit)
        z = self.vae.denormalize(latents.to(self.vae.dtype))
        with torch.no_grad(), tqdm(desc="decoding", unit="frame", disable=not progress) as bar:

            def report(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            extra = {"progress": report} if progress else {}
            video = self.vae.decode(z, tile=self.plan.vae_tile, **extra)
        return frames_to_uint8(video)

    def _end_phase(self, phase: str, started: float) -> None:
        """Record a phase's wall time and, on CUDA, its peak device memory (then reset the peak)."""
        device = torch.device(self.plan.device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.timings[f"{phase}_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        self.timings[f"{phase}_s"] = time.perf_counter() - started

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
    ) -> np.ndarray | None:
        steps = self.defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        validate_request(height, width, num_frames, steps, guidance)
        if negative_prompt is None:
            negative_prompt = self.defaults.negative_prompt
        if self.plan.output_size is not None and resume is None and latents is None:
            width, height, num_frames = self.plan.output_size  # the planner downscaled (said loudly)
        self.dit_calls = 0
        self.oom_steps.clear()
        if self.parallel is not None:
            progress = progress and self.parallel.is_output_rank  # one set of bars for the run
        self.attention_record = {}
        for dispatcher in self.dispatchers.values():
            dispatcher.reset_report()
        device = torch.device(self.plan.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        started = time.perf_counter()
        use_cfg = guidance != 1.0
        self._request = self._planner_request(height, width, num_frames, use_cfg)
        from tqdm.auto import tqdm

        with tqdm(total=1, desc="encoding prompts", unit="batch", disable=not progress) as bar:
            embeds = self.encode_prompts(prompt, negative_prompt, with_negative=use_cfg)
            bar.update(1)
        cond, uncond = embeds[0], (embeds[1] if use_cfg else None)
        self._end_phase("text_encoder", started)

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
        if self.parallel is not None:
            state.latents = self.parallel.same_latents(state.latents)

        started = time.perf_counter()
        final = self.denoise(
            state, scheduler, timesteps, cond, uncond, guidance, progress=progress, on_step=on_step
        )
        self._end_phase("denoise", started)
        self._record_attention("denoise", ("self", "cross"))
        if self.parallel is not None and not self.parallel.is_output_rank:
            return None  # rank 0 decodes and writes

        started = time.perf_counter()
        frames = self._oom_guard().run("vae_decode", lambda: self.decode(final, progress=progress))
        self._end_phase("vae_decode", started)
        self._record_attention("vae_decode", ("vae",))
        return frames
