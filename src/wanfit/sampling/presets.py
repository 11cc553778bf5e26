"""Named recipes for the step-distilled LoRAs: sampler, steps, shift, guidance and LoRA strength.

A preset fills only what the user did not set (`--steps 6 --preset lightx2v-4step` runs 6 steps);
its strength is the default for every `--lora FILE` given without `:STRENGTH`. Sources in docs/lora.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wanfit.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    sampler: str
    steps: int
    shift: float
    guidance: float
    lora_strength: float
    source: str  # where the recipe is published

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    p.name: p
    for p in (
        # LightX2V configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json: denoising_step_list
        # [1000, 750, 500, 250], sample_shift 5, enable_cfg false, LoRA strength 1.0.
        Preset(
            "lightx2v-4step", "distilled", 4, 5.0, 1.0, 1.0, "LightX2V wan_t2v_distill_lora_4step_cfg.json"
        ),
        # Kijai's CausVid LoRA notes: CFG 1, strength about 0.5 with the flowmatch_causvid schedule, 4-9 steps.
        Preset("causvid", "causvid", 8, 1.0, 1.0, 0.5, "Kijai's CausVid LoRA (flowmatch_causvid, CFG 1)"),
        # Self-Forcing's own configs (guandeh17/Self-Forcing, configs/self_forcing_dmd.yaml): denoising_step_list
        # [1000, 750, 500, 250] warped through the flow sigmas (warp_denoising_step), timestep_shift 5,
        # each step x0 then re-noised: 'distilled'; CFG off (the distilled model has it built in).
        # ComfyUI workflows for the LoRA extracted from it often use shift 8 (`--shift 8`).
        Preset(
            "self-forcing", "distilled", 4, 5.0, 1.0, 1.0, "Self-Forcing configs/self_forcing_dmd.yaml (shift 5)"
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name]
