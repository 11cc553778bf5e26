"""Text-to-video: encode the prompts, denoise the latents, decode the video, under a Plan."""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from wanfit.errors import ConfigError
from wanfit.models.configs import VAE_STRIDE, latent_shape  # noqa: F401  (latent_shape: public here too)
from wanfit.plan.compile_costs import StepClock
from wanfit.plan.plan import ATTENTION_KINDS, Plan
from wanfit.runtime.placement import DiTLayout, Placements, TextEncoderLayout, TextEncoderPlacement
from wanfit.sampling import schedulers
from wanfit.sampling.step_cache import StepCache, StepCacheState

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


SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63 (torch.Generator.manual_seed's range, non-negative)


def validate_request(
    height: int,
    width: int,
    num_frames: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int | None = None,
) -> None:
    """One clear sentence for each setting no model can run (the CLI and the Python API both ask here)."""
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
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT
    ):
        raise ConfigError(f"The seed must be a whole number from 0 to 2**63-1, got {seed!r}.")


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise from a CPU generator: the same seed gives the same video on any device."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """[1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], rounded as diffusers' video processor does.

    Converted on the host (fp32 copies of a whole video on the card would add to the decode's peak),
    in place: one fp32 copy and the uint8 frames (wanfit.plan.host_estimates.video_host).
    """
    video = video[0].to("cpu", torch.float32, copy=True)
    video.div_(2).add_(0.5).clamp_(0, 1).mul_(255).round_()
    return video.to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


@dataclass
class DenoiseState:
    """Everything needed to continue a denoising run from `step` (saved by --checkpoint-every)."""

    latents: torch.Tensor
    step: int
    scheduler_state: dict = field(default_factory=dict)
    step_cache: StepCacheState | None = None  # the step cache's per-stream state (--cache runs)


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
        model_key: str | None = None,
    ):
        """plan: a PlanResult from wanfit.plan.planning.plan_for (its frozen fields and hardware are
        kept for re-planning), a bare Plan (obeyed as it is), or None: everything resident with this
        machine's dtypes. text_encoder_loader(plan): loads the text encoder again for `plan` (on the
        host if the plan streams it), after a plan freed it; the pipeline places it. model_key: where
        this DiT's step-cache calibrations are stored (wanfit.sampling.step_cache.tables)."""
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
        self.model_key = model_key
        self.step_cache_report: dict | None = None  # the last run's step cache and its skipped steps
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
        # Within batch(): the last prompt's embeddings, so the next videos of a prompt skip the encoder.
        self._prompt_memo: dict | None = None
        self.dispatchers = self._make_dispatchers()
        # Where each model lives and its run-time state; the DiT is placed when denoising starts.
        self.placement = Placements.of(dit, vae, text_encoder)
        self.placement.text_encoder.apply(self.plan)  # loaded for this plan (from_pretrained): streamed if so
        self.placement.vae.apply(self.plan)
        from wanfit.runtime.lora import DiTLoras

        self.lora = DiTLoras(dit, self.placement.dit)  # the LoRAs applied (none yet)

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
                "text_encoder": (
                    f"rank {plan.text_encoder_rank} alone, "
                    if plan.world_size > 1 and plan.text_encoder_rank is not None
                    else ""
                )
                + (
                    plan.text_encoder_device
                    if plan.text_encoder_blocks_resident is None
                    else f"{plan.text_encoder_device}, streamed"
                ),
                "vae": plan.device,
            },
            "timings": self.timings,
            "oom_steps": [list(step) for step in self.oom_steps],
            "step_cache": self.step_cache_report,
            # What ran: "fast" names the lossy fp8 GEMMs; a plan's fast tier the card refused runs exact.
            "tier": self.placement.dit.tier,
            "given_up": dict(self.placement.dit.failures),
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
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        progress: bool = True,
        dit: str | Path | None = None,
        vae: str | Path | None = None,
        text_encoder: str | Path | None = None,
        tokenizer: str | Path | None = None,
        with_text_encoder: bool = True,
        **overrides,
    ):
        """Load an official release folder, a diffusers-layout folder or a ComfyUI models/ folder; `~`
        and $VARS are expanded. dit / vae / text_encoder / tokenizer: files that replace the folder's
        own parts (ComfyUI's single files, say); with all three, model_dir may be None.

        plan: "auto" (the default) plans for this machine (or `hardware`: a probe or an --emulate card
        name) and a job of height x width x num_frames, as `wanfit plan` would, under `constraints`
        (wanfit.plan.planning.Constraints); or a PlanResult / Plan to obey. scheduler_config: a
        diffusers scheduler_config.json to use instead of the folder's own (or, for an official folder,
        instead of the official UniPC); with_text_encoder: False loads no umT5 (a process of a parallel
        run that receives the embeddings from Plan.text_encoder_rank); overrides: SamplingDefaults fields.
        model_dir "builtin" is the built-in shapes model that `wanfit generate` runs without --model
        (wanfit.builtin: its shipped release folder, with its own sampling defaults; a folder of that
        name: "./builtin").
        """
        from wanfit import load_dit, load_text_encoder, load_vae
        from wanfit.paths import user_path
        from wanfit.plan.planning import BUILTIN
        from wanfit.sampling.step_cache.tables import dit_model_key
        from wanfit.weights.model_dir import find_model_files

        components = {"dit": dit, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
        if isinstance(model_dir, str) and model_dir == BUILTIN:
            from wanfit.builtin import builtin_pipeline

            size = {"height": height, "width": width, "num_frames": num_frames}
            return builtin_pipeline(
                device=device, plan=plan, scheduler_config=scheduler_config, hardware=hardware,
                constraints=constraints, progress=progress, with_text_encoder=with_text_encoder,
                **{k: v for k, v in size.items() if v is not None}, **components, **overrides,
            )  # fmt: skip
        # The video a plan="auto" is made for, unless given: the released models' default.
        height, width, num_frames = height or 480, width or 832, num_frames or 81
        files = find_model_files(model_dir, **components)
        planned = plan
        if isinstance(plan, str) and plan == "auto":
            from wanfit.plan.planning import Constraints, model_request, plan_for

            constraints = constraints or Constraints()
            if device is not None:
                constraints = replace(constraints, device=device)
            guidance = overrides.get("guidance_scale", SamplingDefaults.guidance_scale) != 1.0
            request = model_request(
                model_dir,
                width=width,
                height=height,
                frames=num_frames,
                guidance=guidance,
                **components,
                steps=overrides.get("num_inference_steps"),
            )
            planned = plan_for(request, constraints, hardware)
        plan = getattr(planned, "plan", planned)
        if not isinstance(plan, Plan):
            raise ConfigError(f"plan must be 'auto', a Plan or a PlanResult, not {plan!r}.")
        dtype = plan.torch_compute_dtype
        from wanfit.runtime.allocator import apply_allocator

        apply_allocator(plan)  # the loaders' device allocations already follow it

        # Streamed models are loaded on the host; their placements stream them block by block.
        def text_encoder_loader(plan: Plan = plan):
            layout = TextEncoderLayout.from_plan(plan)
            text_encoder = load_text_encoder(
                files.text_encoder,
                tokenizer=files.tokenizer,
                device=layout.load_device,
                dtype=layout.load_dtype,  # None: as the file has them (blocks streamed from the file)
                compute_dtype=None if layout.load_dtype is None else layout.compute_dtype,
            )
            text_encoder.compute_dtype = TextEncoderLayout.from_plan(
                plan, text_encoder.storage_dtype
            ).compute_dtype
            return text_encoder

        from tqdm.auto import tqdm

        # Transient: the bar clears itself, so an error about a file stands alone on its line.
        total = 3 if with_text_encoder else 2
        with tqdm(total=total, desc="loading DiT", unit="model", disable=not progress, leave=False) as bar:
            layout = DiTLayout.from_plan(plan)
            # fp8 storage keeps an fp8 file's matrices as they are (its bytes and scales, mapped).
            dit = load_dit(files.dit, device=layout.load_device, dtype=layout.load_dtype, keep_fp8=layout.fp8)
            bar.set_description("loading VAE")
            bar.update(1)
            vae = load_vae(files.vae, device=plan.device, dtype=dtype)
            bar.update(1)
            text_encoder = None
            if with_text_encoder:
                bar.set_description("loading text encoder")
                text_encoder = text_encoder_loader(plan)
                bar.update(1)

        defaults = SamplingDefaults(**overrides) if overrides else None
        return cls(
            dit,
            vae,
            text_encoder,
            plan=planned,
            defaults=defaults,
            scheduler_config=user_path(scheduler_config) if scheduler_config else files.scheduler_config,
            name=str(files.root),
            text_encoder_loader=text_encoder_loader,
            model_key=dit_model_key(files.dit),
        )

    # -- plan ----------------------------------------------------------------------------------

    def apply_plan(self, plan) -> None:
        """Switch to `plan` (a Plan, or a PlanResult whose frozen fields and request the OOM guard then
        keeps), also mid-run: the placements move, stream, compile and chunk what it changes (a DiT
        released to the host stays there until the next denoising); the other settings (cfg_batch,
        ...) are read at each call."""
        from wanfit.plan.planner import PlanResult

        if isinstance(plan, PlanResult):
            self.planning, plan = plan, plan.plan
        # The LoRAs follow a plan that applies them otherwise; one that says nothing keeps their mode.
        if self.lora.loras:
            if plan.lora_mode is None:
                plan = replace(plan, lora_mode=self.lora.mode)
            if plan.lora_base_copy is None:
                plan = replace(plan, lora_base_copy=self.lora.base_copy)
            if plan.lora_mode != self.lora.mode:
                self.lora.apply(self.lora.loras, plan.lora_mode, plan.lora_base_copy, plan.lora_fused_ffn)
            else:
                if plan.lora_base_copy != self.lora.base_copy:
                    self.lora.keep_base(plan.lora_base_copy)
                if plan.lora_fused_ffn != self.lora.fused_ffn:
                    self.lora.set_fused_ffn(plan.lora_fused_ffn)
            plan = replace(plan, lora_base_copy=self.lora.base_copy)  # a dropped copy stays dropped
        self.plan = plan
        self.placement.apply(plan)

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
        host = self.planning.budget.host_bytes if self.planning is not None else None
        nxt = step_down(plan, self._request, phase, frozen=frozen, host_budget=host)
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
        """The planner's Request for this call: the planned one resized, else one from the DiT's config;
        with the LoRAs applied now (their memory)."""
        from wanfit.models.configs import WAN_T2V_1_3B, DiTConfig
        from wanfit.plan.estimates import Request
        from wanfit.plan.lora import LoraShapes

        size = dict(height=height, width=width, num_frames=num_frames, guidance=guidance)
        loras = LoraShapes.of(self.lora.loras)
        if self.planning is not None:
            request = self.planning.requested or self.planning.request
            return replace(request, **size, loras=loras)
        config = getattr(self.dit, "config", None)
        return Request(config if isinstance(config, DiTConfig) else WAN_T2V_1_3B, **size, loras=loras)

    # -- phases --------------------------------------------------------------------------------

    @contextmanager
    def batch(self):
        """Within: the videos of one prompt encode it once (its embeddings are kept until the next
        prompt; a list of prompts given to the pipeline runs this way)."""
        outer = self._prompt_memo
        self._prompt_memo = {} if outer is None else outer
        try:
            yield self
        finally:
            self._prompt_memo = outer

    def encode_prompts(
        self, prompt: str, negative_prompt: str, *, with_negative: bool
    ) -> tuple[torch.Tensor, ...]:
        key = (prompt, negative_prompt, with_negative, self.plan.device, self.plan.compute_dtype)
        if self._prompt_memo is not None and key in self._prompt_memo:
            return self._prompt_memo[key]
        embeds = self._encode(prompt, negative_prompt, with_negative=with_negative)
        if self._prompt_memo is not None:
            self._prompt_memo.clear()  # only the current prompt's: a long batch holds one at a time
            self._prompt_memo[key] = embeds
        return embeds

    def _encode(self, prompt: str, negative_prompt: str, *, with_negative: bool) -> tuple[torch.Tensor, ...]:
        """The prompts' embeddings, one [1, L, C] each, on the plan's device. On several processes with
        a text encoder rank (Plan.text_encoder_rank) only that one encodes; it broadcasts them."""
        prompts = [prompt, negative_prompt] if with_negative else [prompt]
        text_len = getattr(getattr(self.dit, "config", None), "text_len", 512)
        device, dtype = torch.device(self.plan.device), self.plan.torch_compute_dtype
        parallel = self.parallel
        embeds = None
        if parallel is None or parallel.encodes_prompts:
            embeds = self._run_text_encoder(prompts, text_len).to(device=device, dtype=dtype)
        if parallel is not None and parallel.text_encoder_rank is not None:
            embeds = parallel.share_embeddings(embeds, device, dtype)
        return tuple(embeds[i : i + 1] for i in range(len(prompts)))

    def _run_text_encoder(self, prompts: list[str], text_len: int) -> torch.Tensor:
        """umT5 on this process: placed per the plan, stepped down on out-of-memory, freed if planned."""
        self._warn_if_truncated(prompts, text_len)
        if getattr(self.text_encoder, "model", True) is None and self.text_encoder_loader is not None:
            # An earlier call freed it (the plan said so): load it again, placed as the plan says.
            self.text_encoder = self.text_encoder_loader(self.plan)
            self.placement.text_encoder = TextEncoderPlacement(self.text_encoder)
        self.placement.text_encoder.apply(self.plan)  # also follows a plan set directly
        # Out of memory: stream the encoder or move it to the CPU (the planner's next notch) and retry.
        embeds = self._oom_guard().run(
            "text_encoder", lambda: self.text_encoder.encode(prompts, max_length=text_len)
        )
        if self.plan.free_text_encoder:
            self.placement.text_encoder.release()
        return embeds

    def _warn_if_truncated(self, prompts: list[str], text_len: int) -> None:
        """The DiT reads text_len tokens (512 for Wan2.1): say so when a prompt the user gave is longer."""
        import warnings

        from wanfit.errors import WanfitWarning

        count = getattr(self.text_encoder, "token_count", None)
        if self.parallel is not None and not self.parallel.speaks_for_prompts:
            return  # said once
        for text in prompts:
            if count is None or text == self.defaults.negative_prompt:
                continue
            tokens = count(text)
            if tokens > text_len:
                start = text[:40] + ("..." if len(text) > 40 else "")
                warnings.warn(
                    f"the prompt {start!r} is {tokens} tokens long; the model reads the first {text_len} "
                    "and ignores the rest.",
                    WanfitWarning,
                    stacklevel=3,
                )

    def make_scheduler(self, shift: float | None, sampler: str | None = None):
        """The sampler asked for; else a diffusers folder's own scheduler (its shift unless one is given),
        else our official UniPC."""
        if sampler is None and self.scheduler_config is not None:
            return schedulers.make_scheduler(config_path=self.scheduler_config, shift=shift)
        return schedulers.make_scheduler(
            sampler or self.defaults.scheduler, shift=self.defaults.shift if shift is None else shift
        )

    # -- LoRAs ---------------------------------------------------------------------------------

    def load_lora(self, path, strength: float = 1.0, *, skip_unknown: bool = False, mode: str | None = None):
        """Add a LoRA file (any format of wanfit.weights.lora_keys) at `strength`; several add up.

        mode: "merge", "merge_per_call" or "runtime", to override the plan's Plan.lora_mode (default: the plan's; a plan
        made before any LoRA was known asks the planner's rule, wanfit.plan.lora). The plan records the
        mode applied. Returns the converted LoraWeights; its `notes` say what was skipped.
        """
        return self.load_loras([(path, strength)], skip_unknown=skip_unknown, mode=mode)[0]

    def load_loras(self, loras, *, skip_unknown: bool = False, mode: str | None = None) -> list:
        """Add several LoRAs ([(file or LoraWeights, strength)]) in one merge: each weight is read,
        changed and written once. Returns their converted LoraWeights."""
        from wanfit.plan.lora import lora_mode_rule
        from wanfit.weights.lora_keys import LoraWeights, load_lora

        if getattr(self.plan, "dit_sharding", "none") != "none":
            raise ConfigError(
                "LoRAs cannot be applied to a DiT sharded across processes (dit_sharding=fsdp) yet; "
                "drop --lora, or give the run GPUs that hold the DiT whole."
            )
        converted = []
        for path, strength in loras:
            lora = path
            if not isinstance(path, LoraWeights):
                shapes, name = self.dit_parameter_shapes()
                lora = load_lora(path, shapes, skip_unknown=skip_unknown, model_name=name)
            converted.append((lora, float(strength)))
        applied = [*self.lora.loras, *converted]
        mode = mode or self.plan.lora_mode or lora_mode_rule(self.plan)[0]
        base_copy = self.plan.lora_base_copy or self._lora_base_copy(
            replace(self.plan, lora_mode=mode), applied
        )
        self.lora.apply(applied, mode, base_copy, self.plan.lora_fused_ffn)
        # What runs, in the run's record (a base copy already dropped stays dropped).
        self.plan = replace(
            self.plan, lora_mode=mode, lora_base_copy=self.lora.base_copy, lora_fused_ffn=self.lora.fused_ffn
        )
        return [lora for lora, _ in converted]

    def _lora_base_copy(self, plan: Plan, loras) -> str:
        """Where a plan made before any LoRA was known keeps their base weights: the planner's choice
        for this budget (wanfit.plan.planner.lora_base_copy_choice); the host without a planned budget."""
        if self.planning is None:
            return "host"
        from wanfit.plan.lora import LoraShapes
        from wanfit.plan.planner import lora_base_copy_choice

        request = replace(self.planning.request, loras=LoraShapes.of(loras))
        return lora_base_copy_choice(request, plan, self.planning.budget, self.planning.attention_backend)

    def unload_loras(self) -> None:
        """Remove every LoRA: the DiT's weights are the base weights again, bit for bit (a plan that
        kept no base copy, Plan.lora_base_copy="none", as the CLI's: to the storage dtype's rounding)."""
        self.lora.remove()

    @property
    def loras(self) -> list[dict]:
        """The applied LoRAs (file name, content hash, strength, path), for metadata and resume files."""
        return [lora.record(strength) for lora, strength in self.lora.loras]

    @property
    def lora_mode(self) -> str | None:
        """How the LoRAs are applied ("merge", "merge_per_call" or "runtime"), None without LoRAs."""
        return self.lora.mode if self.lora.loras else None

    def dit_parameter_shapes(self) -> tuple[dict[str, tuple[int, ...]], str]:
        """(official parameter name -> shape, a name for messages) of this pipeline's DiT."""
        from wanfit.runtime.lora import parameter_shapes
        from wanfit.weights.dit_keys import describe_size

        config = self.dit.config
        return parameter_shapes(config), describe_size(config.dim, config.num_layers, config.in_dim)

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        uncond,
        guidance: float,
        cache: StepCache | None = None,
        step: int = 0,
    ):
        """One guided DiT prediction: cond and uncond in one batch or one after the other, per the plan
        (or, CFG-parallel, on two groups of processes).

        With a step cache (one process only; at denoising step `step`), each batch row is a stream,
        "cond" or "uncond", whose DiT work the cache may skip.
        """
        dtype = self.plan.torch_compute_dtype
        x = latents.to(dtype)
        parallel = self.parallel
        # The DiT as placed (compiled blocks when the plan compiles), or sharded over several processes.
        placed = self.placement.dit if parallel is None else parallel.bind(self.dit)

        def dit(x, t, context, streams):
            return placed(x, t, context) if cache is None else cache.forward(placed, x, t, context, streams)

        if cache is not None:
            cache.begin_step(step)
        rows = x.shape[0]  # one per prompt of the pass
        if uncond is None:
            self.dit_calls += 1
            noise = dit(x, t.expand(rows), cond, ("cond",)).float()
        elif parallel is not None and parallel.cfg_parallel:
            self.dit_calls += 1
            noise_cond, noise_uncond = parallel.guided_pair(self.dit, x, t, cond, uncond)
        elif self.plan.cfg_batch:
            self.dit_calls += 1
            both = dit(
                torch.cat([x, x]), t.expand(2 * rows), torch.cat([cond, uncond]), ("cond", "uncond")
            ).float()
            noise_cond, noise_uncond = both.chunk(2)
        else:
            self.dit_calls += 2
            noise_cond = dit(x, t.expand(rows), cond, ("cond",)).float()
            noise_uncond = dit(x, t.expand(rows), uncond, ("uncond",)).float()
        if uncond is not None:
            noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        if cache is not None:
            cache.end_step()
        return noise

    def make_step_cache(self, steps: int, state: StepCacheState | None = None) -> StepCache | None:
        """The plan's step cache for a run of `steps` (None: no cache); ConfigError where it cannot apply."""
        if self.plan.cache is None:
            if state is not None:
                raise ConfigError(
                    f"The resume file was written with --cache {state.spec}; resume with the same --cache."
                )
            return None
        from wanfit.models.configs import DiTConfig
        from wanfit.sampling.step_cache import build

        config = getattr(self.dit, "config", None)
        if not isinstance(config, DiTConfig) or not hasattr(self.dit, "run_blocks"):
            raise ConfigError("A step cache needs wanfit's WanDiT (embed / run_blocks / unembed).")
        world_size = max(self.plan.world_size, 2 if self.parallel is not None else 1)
        return build(
            self.plan.cache, config, steps, model_key=self.step_cache_key, state=state, world_size=world_size
        )

    @property
    def step_cache_key(self) -> str | None:
        """Where step-cache calibrations of this DiT, with the LoRAs applied now, are stored."""
        from wanfit.sampling.step_cache.tables import calibration_key

        return calibration_key(self.model_key, self.loras)

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
        step_cache: StepCache | None = None,
    ) -> torch.Tensor:
        """Sample from state.step to the end; step_cache: one to use instead of the plan's (calibration)."""
        from tqdm.auto import tqdm

        latents = state.latents
        cache = (
            step_cache if step_cache is not None else self.make_step_cache(len(timesteps), state.step_cache)
        )
        self.step_cache_report = None
        self.placement.dit.place(self.plan)
        self.lora.make_device_copies()  # where the blocks now run, before a compiled block traces
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
                        lambda x=latents, t=t, i=i: self.predict_noise(
                            x, t.to(x.device).float(), cond, uncond, guidance, cache, i
                        ),
                        what=f"step {i}",
                    )
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                bar.n = i + 1  # exact at each step's end, whatever the blocks added (or a retried step)
                bar.refresh()
                if on_step is not None:
                    snapshot = cache.snapshot() if cache is not None else None
                    on_step(DenoiseState(latents, i + 1, schedulers.scheduler_state(scheduler), snapshot))
        finally:
            for hook in hooks:
                hook.remove()
            bar.close()
        if cache is not None:
            self.step_cache_report = cache.report()
        return latents

    def decode(self, latents: torch.Tensor, *, progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        if self.plan.offload_dit_before_decode:
            self.placement.dit.release()
            self.lora.release_device_copies()  # a LoRA branch's factors would stay on the card
        self.placement.vae.apply(self.plan)
        z = self.vae.denormalize(latents.to(self.vae.dtype))
        with torch.no_grad(), tqdm(desc="decoding", unit="frame", disable=not progress) as bar:

            def report(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            extra = {"progress": report} if progress else {}
            video = self.vae.decode(z, tile=self.placement.vae.tile, **extra)
        return frames_to_uint8(video)

    def _end_phase(self, phase: str, started: float) -> None:
        """Record a phase's wall time and, on CUDA, its peak device memory (then reset the peak)."""
        device = torch.device(self.plan.device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.timings[f"{phase}_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        self.timings[f"{phase}_s"] = time.perf_counter() - started

    def _record_steps(self, step_s: list[float], guidance: bool, cached: bool) -> None:
        """Step times into the timings, and, for a resident DiT on a real CUDA card with every step
        computed in full (no step cache) on one process, into this card's compile costs (what the
        planner weighs when it decides whether to compile)."""
        from wanfit.plan import compile_costs

        if len(step_s) >= 2:
            steady, extra = compile_costs.steady_and_first_extra(step_s)
            self.timings["denoise_step_s"] = steady
            self.timings["denoise_first_step_extra_s"] = extra
        hw, placed = self._hardware(), self.placement.dit
        if (
            hw.device_type != "cuda"
            or hw.emulated
            or self.oom_steps
            or cached
            or self.parallel is not None
            or placed.layout is None
            or placed.layout.streamed
            or "compile" in placed.failures
        ):
            return
        key, _ = compile_costs.job(
            self._request.config,
            self._request.tokens,
            guidance=guidance,
            cfg_batch=self.plan.cfg_batch,
            dtype=self.plan.compute_dtype,
            fp8_gemm=placed.tier == "fast",
        )
        try:
            compile_costs.record_run(hw, key, compiled=placed.compiled_blocks is not None, step_s=step_s)
        except OSError:
            pass  # a read-only cache dir costs the planner its measurements, not the run

    # -- the whole job ---------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        seed: int | Sequence[int] | None = None,
        latents: torch.Tensor | None = None,
        progress: bool = True,
        resume: DenoiseState | None = None,
        on_step: Callable[[DenoiseState], None] | None = None,
        sampler: str | None = None,
        step_cache: StepCache | None = None,
    ) -> np.ndarray | list | None:
        """sampler: one of wanfit.sampling.schedulers.SCHEDULERS (default: the folder's or the official).
        None on the processes other than rank 0 of a run on several processes (rank 0 has the frames).

        A list of prompts gives a list of videos, one per prompt, with the same settings (each prompt
        encoded once); seed: one for all of them, or a list, one per prompt. The plan's
        prompts_per_pass of them are denoised together (Plan.samples_per_pass), each from its own
        seed's noise with its own scheduler: the same videos as one call per prompt.
        """
        if isinstance(prompt, str):
            videos = self._generate(
                [prompt], [seed], negative_prompt, height, width, num_frames, num_inference_steps,
                guidance_scale, shift, latents=latents, progress=progress, resume=resume,
                on_step=on_step, sampler=sampler, step_cache=step_cache,
            )  # fmt: skip
            return None if videos is None else videos[0]
        if resume is not None or latents is not None or step_cache is not None:
            raise ConfigError(
                "resume=, latents= and step_cache= belong to one video; give one prompt with them."
            )
        prompts = [str(p) for p in prompt]
        if seed is None or isinstance(seed, numbers.Integral):
            seeds = [seed] * len(prompts)
        else:
            seeds = list(seed)
            if len(seeds) != len(prompts):
                raise ConfigError(
                    f"{len(prompts)} prompts were given with {len(seeds)} seeds; give one each."
                )
        # on_step sees one video's state (what a resume file holds), and a run on several processes
        # shares one sample's work: one prompt per pass then.
        size = self.plan.samples_per_pass if on_step is None and self.parallel is None else 1
        videos: list = []
        with self.batch():
            for start in range(0, len(prompts), size):
                group = self._generate(
                    prompts[start : start + size], seeds[start : start + size], negative_prompt, height,
                    width, num_frames, num_inference_steps, guidance_scale, shift, progress=progress,
                    on_step=on_step, sampler=sampler,
                )  # fmt: skip
                videos += [None] * len(prompts[start : start + size]) if group is None else group
        return videos

    def _generate(
        self,
        prompts: list[str],
        seeds: list[int | None],
        negative_prompt: str | None,
        height: int,
        width: int,
        num_frames: int,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        shift: float | None,
        *,
        latents: torch.Tensor | None = None,
        progress: bool = True,
        resume: DenoiseState | None = None,
        on_step: Callable[[DenoiseState], None] | None = None,
        sampler: str | None = None,
        step_cache: StepCache | None = None,
    ) -> list[np.ndarray] | None:
        """The videos of `prompts` (one seed each) denoised in one loop: the DiT sees one row per prompt
        (two with batched guidance); latents=, resume= and on_step= belong to a single prompt."""
        steps = self.defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        for seed in seeds:
            validate_request(height, width, num_frames, steps, guidance, seed)
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

        with tqdm(total=len(prompts), desc="encoding prompts", unit="batch", disable=not progress) as bar:
            embeds = []
            for prompt in prompts:
                embeds.append(self.encode_prompts(prompt, negative_prompt, with_negative=use_cfg))
                bar.update(1)
        cond = torch.cat([e[0] for e in embeds]) if len(embeds) > 1 else embeds[0][0]
        uncond = None
        if use_cfg:
            uncond = torch.cat([e[1] for e in embeds]) if len(embeds) > 1 else embeds[0][1]
        self._end_phase("text_encoder", started)

        folder_scheduler = sampler is None and self.scheduler_config is not None
        per_prompt = []
        for _ in prompts:
            scheduler = self.make_scheduler(shift, sampler)
            timesteps = schedulers.set_timesteps(
                scheduler, steps, official=not folder_scheduler, device=device
            )
            per_prompt.append(scheduler)

        in_channels = getattr(getattr(self.dit, "config", None), "in_dim", 16)
        shape = latent_shape(1, in_channels, height, width, num_frames)
        if resume is not None:
            state = resume
            schedulers.restore_scheduler_state(per_prompt[0], resume.scheduler_state)
        else:
            if latents is None:
                latents = torch.cat(
                    [initial_noise(shape, 0 if seed is None else int(seed)) for seed in seeds]
                )
            elif tuple(latents.shape) != shape:
                raise ConfigError(f"The given latents have shape {tuple(latents.shape)}, expected {shape}.")
            state = DenoiseState(latents.to(device=device, dtype=torch.float32), 0)
            for scheduler, seed in zip(per_prompt, seeds):
                if hasattr(scheduler, "seed_noise"):  # a sampler that re-noises: its noise follows the seed
                    scheduler.seed_noise(0 if seed is None else seed, shape)
        scheduler = per_prompt[0] if len(per_prompt) == 1 else schedulers.PerSampleSchedulers(per_prompt)
        state.latents = state.latents.to(device=device, dtype=torch.float32)
        if self.parallel is not None:
            state.latents = self.parallel.same_latents(state.latents)

        started = time.perf_counter()
        clock = StepClock(device)
        clock.start()
        final = self.denoise(
            state,
            scheduler,
            timesteps,
            cond,
            uncond,
            guidance,
            progress=progress,
            on_step=clock.wrap(on_step),
            step_cache=step_cache,
        )
        self._end_phase("denoise", started)
        self._record_attention("denoise", ("self", "cross"))
        if len(prompts) == 1:  # the compile costs are measured for one prompt's steps
            self._record_steps(
                clock.step_s, use_cfg, cached=step_cache is not None or self.plan.cache is not None
            )
        if self.parallel is not None and not self.parallel.is_output_rank:
            return None  # rank 0 decodes and writes

        started = time.perf_counter()
        videos = []
        for row in range(len(prompts)):  # one video at a time: the decode's peak is one video's
            video = final[row : row + 1]
            videos.append(
                self._oom_guard().run("vae_decode", lambda v=video: self.decode(v, progress=progress))
            )
        self._end_phase("vae_decode", started)
        self._record_attention("vae_decode", ("vae",))
        return videos
