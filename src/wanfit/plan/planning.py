"""The one planning call: hardware + the job + the user's constraints -> a PlanResult.

`plan_for` is what `wanfit generate`, `wanfit plan`, `wanfit doctor`, `WanPipeline.from_pretrained`,
the hardware doc generator and the benchmarks call; nothing else turns a machine into a Plan. It
probes (or emulates) the card, applies the precision policy, asks an attention dispatcher on that
card which backend serves each kind of attention call of the job, and runs the planner with the
user's settings frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from wanfit.errors import AttentionUnavailableError, CheckpointError, ConfigError
from wanfit.hardware.probe import HardwareProbe, host_cpu, probe
from wanfit.models.configs import DIT_PRESETS, WAN21_TEXT_ENCODER, DiTConfig
from wanfit.models.vae import WAN21_VAE
from wanfit.plan.estimates import Request
from wanfit.plan.plan import ATTENTION_KINDS, parse_plan_overrides
from wanfit.plan.planner import PlanResult, budget_from_probe, parse_bytes, plan_run

BUILTIN = "builtin"  # the model name of the built-in shapes model (wanfit.builtin, shipped files)


@dataclass(frozen=True)
class Constraints:
    """What the user fixed: each one is a frozen Plan field the planner and the OOM guard respect."""

    vram: int | None = None  # bytes the plan may use on the device, instead of what is free
    ram: int | None = None  # bytes of host RAM the run may use, instead of what is free (or a cgroup leaves)
    dtype: str | None = None  # compute dtype (bf16, fp16, fp32)
    attention: str | None = None  # a backend to force
    allow_lossy_attention: bool = False
    fp8: bool = False
    device: str | None = None  # cpu, cuda, cuda:N
    overrides: Mapping[str, object] = field(default_factory=dict)  # checked Plan field values (--set)
    allow_downscale: bool = False
    fast: bool = False  # the fast tier (--fast): lossy fp8 GEMMs, sm_89+

    @classmethod
    def from_options(
        cls,
        *,
        vram: str | int | None = None,
        ram: str | int | None = None,
        dtype: str | None = None,
        attention: str | None = None,
        allow_lossy_attention: bool = False,
        fp8: bool = False,
        device: str | None = None,
        settings: list[str] | tuple[str, ...] = (),
        allow_downscale: bool = False,
        fast: bool = False,
    ) -> Constraints:
        """From the words a user types (the CLI's options, or the same in Python); checked."""
        if isinstance(vram, str):
            vram = parse_bytes(vram)
        if isinstance(ram, str):
            ram = parse_bytes(ram, "--ram")
        return cls(
            vram=vram,
            ram=ram,
            dtype=dtype,
            attention=None if attention in (None, "", "auto") else attention,
            allow_lossy_attention=allow_lossy_attention,
            fp8=fp8,
            device=device,
            overrides=parse_plan_overrides(settings),
            allow_downscale=allow_downscale,
            fast=fast,
        )


def model_request(
    model: str | Path | None,
    *,
    width: int = 832,
    height: int = 480,
    frames: int = 81,
    guidance: bool = True,
    dit: str | Path | None = None,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
    tokenizer: str | Path | None = None,
    steps: int | None = None,
    loras=(),
    lora_unloadable: bool = True,
    prompts: int = 1,
) -> Request:
    """The job as the planner sees it. model: a folder (official, diffusers or ComfyUI), a preset name
    (1.3B, 14B), or None/"builtin"; dit / vae / text_encoder / tokenizer: files that replace the
    folder's own (all three: no folder needed). Headers only: no weights are read. steps: the
    denoising steps (None: the sampler's default), which decide whether compiling pays. loras: the
    converted LoRAs the job applies (LoraWeights, or (LoraWeights, strength) as read_loras gives
    them): how they are applied is planned (Plan.lora_mode), and their memory counted;
    lora_unloadable=False (a CLI job) keeps no copy of the base weights they change. prompts: how
    many prompts of this size a batch job has (the planner may denoise several in one pass)."""
    from wanfit.plan.lora import LoraShapes

    components = {"dit": dit, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
    request = _model_request(model, width, height, frames, guidance, components)
    return replace(
        request, steps=steps, loras=LoraShapes.of(loras), lora_unloadable=lora_unloadable, prompts=prompts
    )


def _model_request(model, width: int, height: int, frames: int, guidance: bool, components: dict) -> Request:
    named = any(v is not None for v in components.values())
    size = {"height": height, "width": width, "num_frames": frames, "guidance": guidance}
    if not named and (model is None or str(model) == BUILTIN):
        from wanfit.builtin import MODEL_DIR

        # Its shipped release folder, read like any other.
        return replace(
            _model_request(MODEL_DIR, width, height, frames, guidance, components), model_name=BUILTIN
        )
    if not named and str(model) in DIT_PRESETS:
        return Request(DIT_PRESETS[str(model)], model_name=str(model), **size)
    from wanfit.paths import user_path
    from wanfit.weights.dit_loader import folder_dit_config
    from wanfit.weights.inspect import component_dtypes, component_shapes
    from wanfit.weights.model_dir import find_model_files

    model = None if model is None else user_path(model)
    if named:
        files = find_model_files(model, **components)
        config, name = folder_dit_config(files=files)
        text_encoder_config, vae_config = component_shapes(files)
        dit_dtype, text_encoder_dtype = component_dtypes(files)
    else:
        config, name = folder_dit_config(model)
        # The text encoder and VAE as the folder's files have them (a small model plans small); a
        # folder that holds only the DiT's config plans with the released sizes and dtypes.
        try:
            text_encoder_config, vae_config = component_shapes(model)
            dit_dtype, text_encoder_dtype = component_dtypes(model)
        except CheckpointError:
            text_encoder_config, vae_config = WAN21_TEXT_ENCODER, WAN21_VAE
            dit_dtype = text_encoder_dtype = None
    return Request(
        config,
        model_name=name,
        text_encoder=text_encoder_config,
        vae=vae_config,
        dit_file_dtype=dit_dtype,
        text_encoder_file_dtype=text_encoder_dtype,
        **size,
    )


def resolve_hardware(hardware: HardwareProbe | str | None) -> HardwareProbe:
    """A probe as given, an emulated card by name, or this machine (WANFIT_EMULATE honoured)."""
    if isinstance(hardware, HardwareProbe):
        return hardware
    return probe(emulate=hardware)


def plan_for(
    request: Request,
    constraints: Constraints | None = None,
    hardware: HardwareProbe | str | None = None,
) -> PlanResult:
    """The fastest plan that fits this machine (or `hardware`) for `request` under `constraints`.

    Raises ConfigError for settings this machine cannot honour and PlanError when nothing fits.
    """
    constraints = constraints or Constraints()
    hw = device_probe(resolve_hardware(hardware), constraints)
    overrides = dict(constraints.overrides)
    overrides.pop("device", None)  # chosen above, with the probe
    notes: list[str] = []

    from wanfit.precision import dtype_name, precision_policy

    dtype = constraints.dtype or overrides.get("compute_dtype")
    precision = precision_policy(hw, compute=dtype)
    notes += precision.notes
    if dtype is not None:
        overrides["compute_dtype"] = dtype_name(precision.compute)
    forced = constraints.attention or overrides.get("attention")
    if forced is not None:
        overrides["attention"] = forced
    _check_text_encoder_device(overrides.get("text_encoder_device"), hw)
    fast = False
    if constraints.fast or overrides.get("fp8_gemm"):
        overrides["fp8_gemm"], fast_notes = fast_tier(hw, precision.compute, constraints.fast)
        notes += fast_notes
        fast = overrides["fp8_gemm"]

    per_kind = {kind: overrides[f"{kind}_attention"] for kind in ATTENTION_KINDS if overrides.get(f"{kind}_attention")}
    attention, attention_notes = select_attention(
        request, hw, precision.compute, forced, constraints, per_kind=per_kind
    )
    notes += attention_notes
    device = budget_from_probe(hw, attention["self"])
    result = plan_run(
        device,
        request,
        vram=constraints.vram,
        ram=constraints.ram,
        overrides=overrides,
        allow_downscale=constraints.allow_downscale,
        fp8=constraints.fp8,
        attention=attention,
    )
    if fast and forced is None and "self" not in per_kind and result.plan.fast_tier_in_place:
        result, note = _fast_self_attention(result, request, hw, precision.compute)
        notes.append(note)
    return replace(result, notes=tuple(notes) + result.notes, hardware=hw)


def _fast_self_attention(
    result: PlanResult, request: Request, hw: HardwareProbe, dtype
) -> tuple[PlanResult, str]:
    """The fast tier's self-attention: lossy kernels (int8_triton, sage) compete on speed for the DiT's
    self-attention, where attention's time is; the winner goes into the Plan's self_attention, with a
    note. Only where the fast tier is in place (a declined or exact-running fast tier runs nothing
    lossy), only a kernel of the exact choice's memory class, and only where the plan still fits
    with the kernel's own scratch (its quantised copies) in the estimates."""
    from wanfit.attention.dispatch import Dispatcher
    from wanfit.plan.estimates import estimate_phases
    from wanfit.plan.planner import _fits

    lossy = Dispatcher(hw, allow_lossy=True)
    call = attention_calls(request, hw, dtype, lossy)["self"]
    chosen = lossy.select(call).backend
    exact = result.plan.self_attention
    registry = lossy.registry
    if registry[chosen].exact or registry.memory_class(chosen) != registry.memory_class(exact):
        refused = "; ".join(
            f"{c.name} {c.reason.rstrip('.')}"
            for c in lossy.candidates(call)
            if not c.exact and not c.available
        )
        return result, f"the fast tier: the DiT's self-attention stays exact ({exact}): " + (
            f"{refused}." if refused else "an exact kernel ranks faster here."
        )
    plan = replace(result.plan, self_attention=chosen)
    phases = estimate_phases(request, plan, chosen)
    over = _fits(phases, result.budget)
    if over is not None:
        return result, (
            f"the fast tier: the DiT's self-attention stays exact ({exact}): {chosen}'s quantised copies "
            f"would put the {over} phase over the device budget."
        )
    return replace(result, plan=plan, phases=phases, attention_backend=chosen), (
        f"the fast tier: the DiT's self-attention runs {chosen} (lossy: quantised q, k and v)."
    )


def fast_tier(hw: HardwareProbe, compute, by_flag: bool) -> tuple[bool, list[str]]:
    """Whether the fast tier's fp8 GEMMs run here: ConfigError (one sentence) when the card or dtype
    cannot have them; (False, a note) when the kernel fails its smoke test on the real device."""
    from wanfit.runtime.fp8_linear import fast_tier_status

    refused, failed = fast_tier_status(hw, compute)
    if refused is not None:
        asked = "--fast" if by_flag else "--set fp8_gemm=true"
        raise ConfigError(f"{asked} was asked for, but {refused}")
    if failed is not None:
        return False, [
            f"the fast tier's fp8 GEMM failed its smoke test on this card ({failed}): running exact."
        ]
    if not hw.device_present:
        return True, ["the fast tier's fp8 GEMM is planned from the card's declarations (emulated: not run)."]
    return True, []


def device_probe(hw: HardwareProbe, constraints: Constraints) -> HardwareProbe:
    """The probe of the device the run will use: --device (or --set device=) checked against it."""
    asked = constraints.device or constraints.overrides.get("device")
    if asked is None:
        return hw
    import torch

    flag = "--device" if constraints.device else "--set device="
    given = f"--device {asked}" if constraints.device else f"--set device={asked}"
    try:
        device = torch.device(str(asked))
    except RuntimeError:
        raise ConfigError(f"Unknown {flag} {asked!r}; use cpu, cuda or cuda:N.") from None
    if device.type == "cpu":
        return host_cpu(hw)
    if device.type not in ("cuda", "mps"):
        raise ConfigError(f"Unsupported {flag} {asked!r}; use cpu, cuda or cuda:N.")
    if hw.device_type != device.type:
        what = (
            f"--emulate {hw.emulated} describes a {hw.device_type} device"
            if hw.emulated
            else (f"this machine has no usable {device.type.upper()} device")
        )
        raise ConfigError(f"{given} was asked for, but {what}.")
    if device.type == "cuda" and device.index is not None and hw.device_present:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ConfigError(f"{given} was asked for, but this machine has {count} CUDA device(s).")
        if device.index != (hw.device_index or 0):
            return probe(emulate=hw.emulated, device_index=device.index)
    return hw


def _check_text_encoder_device(asked: str | None, hw: HardwareProbe) -> None:
    if asked is None or asked == "cpu":
        return
    if asked.split(":")[0] != hw.device_type:
        raise ConfigError(
            f"Plan setting text_encoder_device takes cpu or this run's device ({hw.device_type}), got {asked!r}."
        )


def select_attention(
    request: Request,
    hw: HardwareProbe,
    dtype,
    forced: str | None,
    constraints: Constraints,
    per_kind: dict[str, str] | None = None,
) -> tuple[dict[str, str | None], list[str]]:
    """The backend a dispatcher on `hw` picks for each kind of the job's attention calls.

    A forced backend must serve the DiT's self-attention (else one sentence says why); where it cannot
    serve cross or VAE attention, those keep the ranked choice, with a note. per_kind: a backend the
    user set for one kind (`--set self_attention=...`), which must serve that kind's call.
    """
    from wanfit.attention.dispatch import Dispatcher

    dispatcher = Dispatcher(hw, forced=forced, allow_lossy=constraints.allow_lossy_attention)
    auto = Dispatcher(hw, allow_lossy=constraints.allow_lossy_attention, registry=dispatcher.registry)
    forced = dispatcher.forced  # normalised (a typo is a ConfigError there)
    calls = attention_calls(request, hw, dtype, dispatcher)
    chosen: dict[str, str | None] = {}
    notes = []
    for kind in ATTENTION_KINDS:
        call = calls[kind]
        if per_kind and kind in per_kind:
            asked = per_kind[kind].strip().lower()  # a registry name: the setting's parser checked it
            selection, cand = dispatcher.selection_for(asked, call, None, auto=False)
            if selection is None:
                raise AttentionUnavailableError(
                    f"Plan setting {kind}_attention={asked} was asked for but {cand.reason}"
                )
            chosen[kind] = selection.backend
            continue
        if forced is not None:
            selection, cand = dispatcher.selection_for(forced, call, None, auto=False)
            if selection is not None:
                chosen[kind] = selection.backend
                continue
            if kind == "self":
                raise AttentionUnavailableError(
                    f"The attention backend {forced} was asked for but {cand.reason}"
                )
            notes.append(
                f"--attention {forced} cannot serve the {kind} attention ({cand.reason.rstrip('.')})."
            )
        try:
            chosen[kind] = auto.select(call).backend
        except AttentionUnavailableError as err:
            if kind == "self":
                raise
            chosen[kind] = None
            notes.append(f"no attention backend was found for the {kind} attention here: {err}")
    return chosen, notes


def attention_calls(request: Request, hw: HardwareProbe, dtype, dispatcher) -> dict:
    """The job's typical call of each kind: DiT self (tokens x tokens), cross (tokens x text), VAE
    (one head over the pixels of a latent frame, in query blocks as the VAE runs it)."""
    from wanfit.models.vae import AttentionBlock

    cfg: DiTConfig = request.config
    h, w = request.latent_hw
    vae_dim = request.vae.base_dim * request.vae.dim_mult[-1]
    pixels = h * w
    return {
        "self": dispatcher.call_on_probe(
            dtype, q_len=request.tokens, heads=cfg.num_heads, head_dim=cfg.head_dim
        ),
        "cross": dispatcher.call_on_probe(
            dtype, q_len=request.tokens, kv_len=cfg.text_len, heads=cfg.num_heads, head_dim=cfg.head_dim
        ),
        "vae": dispatcher.call_on_probe(
            dtype, q_len=min(pixels, AttentionBlock.query_chunk), kv_len=pixels, heads=1, head_dim=vae_dim
        ),
    }
