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
        # The self-forcing (lightx2v cfg/step-distill) LoRA as ComfyUI users run it: LCM sampler with the
        # simple schedule (the same steps and re-noising as 'distilled'), 4 steps, shift 8, CFG 1, strength 1.
        Preset(
            "self-forcing", "distilled", 4, 8.0, 1.0, 1.0, "Kijai's lightx2v self-forcing LoRA (LCM, shift 8)"
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name]
