"""Published step-cache constants for Wan2.1 T2V, and the store of measured MagCache ratios.

TeaCache4Wan2.1 (github.com/ali-vilab/TeaCache, teacache_generate.py): polynomials, highest power
first, that rescale the relative L1 change of the time embedding between steps into an estimate of
the change of the model's output; one per model, with and without "ret steps".

MagCache4Wan2.1 (github.com/Zehong-Ma/MagCache, magcache_generate.py): the magnitude ratio of the
blocks' residual between consecutive steps, mean over tokens of ||r_t|| / ||r_t-1||, measured at 50
steps for cond and uncond (the first entry, which has no previous step, is 1.0), and the settings
its README recommends per model. `wanfit calibrate-cache` measures the same ratios for any model and
step count and stores them here, where `--cache magcache` looks first.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wanfit.errors import ConfigError

# (model, ret_steps) -> coefficients, highest power first (numpy.poly1d order).
TEACACHE_COEFFICIENTS: dict[tuple[str, bool], tuple[float, ...]] = {
    ("1.3B", False): (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
    ("1.3B", True): (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    ("14B", False): (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    ("14B", True): (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
}


@dataclass(frozen=True)
class MagRatios:
    """Per-step magnitude ratios of one model at one step count, for each stream (entry 0 is 1.0)."""

    cond: tuple[float, ...]
    uncond: tuple[float, ...] | None = None  # None: measured without guidance (cond stands in)
    source: str = "measured"

    @property
    def steps(self) -> int:
        return len(self.cond)

    def stream(self, name: str) -> tuple[float, ...]:
        return self.cond if name == "cond" or self.uncond is None else self.uncond

    def resampled(self, steps: int) -> MagRatios:
        """The ratios at another step count, by MagCache's nearest-neighbour interpolation."""
        if steps == self.steps:
            return self
        uncond = None if self.uncond is None else nearest_interp(self.uncond, steps)
        return MagRatios(
            nearest_interp(self.cond, steps), uncond, f"{self.source}, {self.steps} -> {steps} steps"
        )


def nearest_interp(values: tuple[float, ...], length: int) -> tuple[float, ...]:
    """MagCache's resampling: entry i takes source index round(i * (n - 1) / (length - 1)), numpy rounding."""
    if length == 1:
        return (values[-1],)
    scale = (len(values) - 1) / (length - 1)
    index = np.round(np.arange(length) * scale).astype(int)
    return tuple(float(values[i]) for i in index)


# fmt: off
PUBLISHED_MAG_RATIOS: dict[str, MagRatios] = {
    "1.3B": MagRatios(
        cond=(
            1.0,
            1.0124, 1.00166, 0.99791, 0.99682, 0.99634, 0.99567, 0.99416, 0.99578, 0.9957, 0.99511, 0.99535,
            0.99552, 0.99541, 0.9954, 0.99489, 0.99518, 0.99484, 0.99481, 0.99415, 0.99419, 0.99396, 0.99388,
            0.99349, 0.99309, 0.9927, 0.99228, 0.99171, 0.99137, 0.99068, 0.99005, 0.98944, 0.98849, 0.98758,
            0.98644, 0.98504, 0.9836, 0.98202, 0.97977, 0.97717, 0.9741, 0.97003, 0.96538, 0.9593, 0.95086,
            0.94013, 0.92402, 0.90241, 0.86821, 0.81838
        ),
        uncond=(
            1.0,
            1.02213, 1.0041, 1.00061, 0.99762, 0.99685, 0.99586, 0.99422, 0.99575, 0.99563, 0.99506, 0.99531,
            0.99549, 0.99539, 0.99536, 0.99485, 0.99514, 0.99478, 0.99479, 0.99413, 0.99416, 0.99393, 0.99386,
            0.99349, 0.99304, 0.9927, 0.99226, 0.9917, 0.99135, 0.99063, 0.99003, 0.98942, 0.98849, 0.98757,
            0.98643, 0.98503, 0.98359, 0.98201, 0.97978, 0.97718, 0.97411, 0.97002, 0.96541, 0.95933, 0.95089,
            0.94019, 0.92414, 0.9026, 0.86868, 0.81939
        ),
        source="MagCache4Wan2.1, T2V-1.3B, 50 steps",
    ),
    "14B": MagRatios(
        cond=(
            1.0,
            1.02504, 1.00025, 0.9985, 0.99779, 0.9966, 0.99482, 0.99467, 0.99664, 0.99434, 0.99533, 0.99468,
            0.99438, 0.99516, 0.99384, 0.99404, 0.99517, 0.99409, 0.99428, 0.99347, 0.99418, 0.99271, 0.99313,
            0.99215, 0.99218, 0.99216, 0.99163, 0.99138, 0.98982, 0.98996, 0.9887, 0.98772, 0.98767, 0.98573,
            0.98501, 0.9838, 0.98177, 0.98037, 0.97678, 0.97546, 0.97184, 0.96711, 0.96349, 0.95629, 0.94926,
            0.93964, 0.92511, 0.90693, 0.8796, 0.86111
        ),
        uncond=(
            1.0,
            1.03017, 1.00251, 0.99962, 0.99771, 0.99658, 0.99476, 0.99451, 0.99656, 0.99431, 0.99545, 0.99465,
            0.99434, 0.99517, 0.9938, 0.99401, 0.99516, 0.99408, 0.99426, 0.99343, 0.99416, 0.99269, 0.99311,
            0.99215, 0.99215, 0.99217, 0.99161, 0.99135, 0.9898, 0.98995, 0.98866, 0.9877, 0.98765, 0.9857,
            0.98498, 0.98376, 0.98173, 0.98035, 0.97677, 0.97543, 0.97183, 0.96708, 0.96345, 0.95625, 0.94929,
            0.93961, 0.92504, 0.90678, 0.87945, 0.86189
        ),
        source="MagCache4Wan2.1, T2V-14B, 50 steps",
    ),
}
# fmt: on

# MagCache's README commands for T2V (E012K4R02 for 1.3B, E024K6R02 for 14B).
MAGCACHE_RECOMMENDED: dict[str, dict[str, float]] = {
    "1.3B": {"threshold": 0.12, "K": 4, "retention": 0.2},
    "14B": {"threshold": 0.24, "K": 6, "retention": 0.2},
}

# --- measured ratios (wanfit calibrate-cache) ---------------------------------------------------------

RATIOS_FORMAT = "wanfit-magcache-ratios-1"


def ratios_dir() -> Path:
    """Where calibrations live: <wanfit cache>/step_cache/<model key>/magcache-<steps>.json."""
    from wanfit.attention.ranking import cache_dir

    return cache_dir() / "step_cache"


def ratios_path(model_key: str, steps: int) -> Path:
    return ratios_dir() / model_key / f"magcache-{steps}.json"


def save_ratios(model_key: str, ratios: MagRatios, about: dict) -> Path:
    """Write a calibration atomically; `about` records how it was measured (size, prompt, ...)."""
    from wanfit.video import atomic_path

    path = ratios_path(model_key, ratios.steps)
    payload = {
        "format": RATIOS_FORMAT,
        "model_key": model_key,
        "steps": ratios.steps,
        "cond": list(ratios.cond),
        "uncond": None if ratios.uncond is None else list(ratios.uncond),
        "measured": about,
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
    return path


def load_ratios(path: Path) -> MagRatios:
    """A calibration file (ours, or a JSON list of published-style interleaved ratios); ConfigError if bad."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"Could not read the MagCache ratios {path}: {getattr(err, 'strerror', None) or err}."
        ) from None
    if isinstance(data, list):  # MagCache's own format: cond and uncond interleaved
        data = {"format": RATIOS_FORMAT, "cond": data[0::2], "uncond": data[1::2]}
    cond, uncond = data.get("cond"), data.get("uncond") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("format") != RATIOS_FORMAT
        or not _ratio_list(cond)
        or not (uncond is None or (_ratio_list(uncond) and len(uncond) == len(cond)))
    ):
        raise ConfigError(f"{path} is not a MagCache ratios file (wanfit calibrate-cache writes them).")
    return MagRatios(
        tuple(map(float, cond)), None if uncond is None else tuple(map(float, uncond)), str(path)
    )


def _ratio_list(values) -> bool:
    return (
        isinstance(values, list)
        and len(values) >= 2
        and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)
    )


def find_calibration(model_key: str | None, steps: int) -> MagRatios | None:
    """This model's calibration at `steps`, else its calibration with the most steps, else None."""
    if model_key is None:
        return None
    exact = ratios_path(model_key, steps)
    if exact.is_file():
        return load_ratios(exact)
    found = sorted(
        (int(p.stem.removeprefix("magcache-")), p)
        for p in (ratios_dir() / model_key).glob("magcache-*.json")
        if p.stem.removeprefix("magcache-").isdigit()
    )
    return load_ratios(found[-1][1]) if found else None


def calibration_key(model_key: str | None, loras: list[dict]) -> str | None:
    """The store's key for a DiT with LoRAs applied (their records: sha256, strength), which change
    its ratios; the model's own key without LoRAs; None: no store."""
    if model_key is None or not loras:
        return model_key
    applied = sorted([r["sha256"], float(r["strength"])] for r in loras)
    return f"{model_key}-lora-{hashlib.sha256(json.dumps(applied).encode()).hexdigest()[:16]}"


def dit_model_key(dit_dir: Path) -> str:
    """A DiT's calibration key: a fingerprint of its weight files (names, sizes, times; no data read).

    dit_dir: the folder holding diffusion_pytorch_model*.safetensors (ModelFiles.dit).
    """
    from wanfit.models.text_cache import files_fingerprint

    files = sorted(Path(dit_dir).glob("diffusion_pytorch_model*.safetensors"))
    return "dit-" + files_fingerprint(files)[:20]
