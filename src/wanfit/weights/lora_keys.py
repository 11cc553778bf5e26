"""LoRA files for the Wan2.1 DiT: the format is detected from the keys and converted to official names.

Formats (docs/lora.md has examples of each):
  comfyui     `diffusion_model.blocks.0.self_attn.q.lora_down.weight` / `.lora_up.weight` (or `.lora_A` /
              `.lora_B`), `.alpha`, `.diff` (a full delta of the module's weight, or of a bare parameter
              such as `blocks.0.modulation`), `.diff_b` (a bias delta); LightX2V and Kijai files
  kohya       `lora_unet_blocks_0_self_attn_q.lora_down.weight` / `.lora_up.weight` / `.alpha` (musubi-tuner)
  videox-fun  the same with `lora_unet__`
  diffusers   `transformer.blocks.0.attn1.to_q.lora_A.weight` / `.lora_B.weight` (+ `.lora_B.bias`); alpha
              from the file's PEFT metadata when it has some
  diffsynth   `blocks.0.self_attn.q.lora_A.default.weight` / `.lora_B.default.weight`
A module's update is strength * (alpha / rank) * up @ down; without an alpha, alpha = rank (scale 1).
Diffs are added times the strength. diffusers names are converted with wanfit.weights.dit_keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanfit.errors import CheckpointError
from wanfit.weights import dit_keys
from wanfit.weights.io import LazyStateDict, short_list

# Suffix of a key -> what it holds; the order matters (`.diff_b` before `.diff`).
_ROLES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_B.default.bias", "up_bias"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "up_bias"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)
_DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
_KOHYA_PREFIXES = {"lora_unet__": "videox-fun", "lora_unet_": "kohya"}
_PEFT_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps lora_alpha / r in a safetensors header


@dataclass(frozen=True)
class LowRank:
    """One module's low-rank update: scale * up @ down, added to `module.weight`."""

    down: torch.Tensor  # [rank, in] (or [rank, in, kt, kh, kw] for a convolution)
    up: torch.Tensor  # [out, rank] (or [out, rank, 1, 1, 1])
    scale: float  # alpha / rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """scale * up @ down in fp32, shaped like the weight's leading dims [out, in, ...]."""
        up = self.up.to(device, torch.float32).flatten(1)
        down = self.down.to(device, torch.float32).flatten(1)
        return (up @ down).mul_(self.scale).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class LoraWeights:
    """A converted LoRA file: low-rank updates per official module, diffs per official parameter."""

    path: Path
    sha256: str
    format: str
    low_rank: dict[str, LowRank] = field(default_factory=dict)  # official module -> its weight's update
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)  # official parameter -> delta
    notes: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # keys that name nothing known (check_fits decides)
    skipped_i2v: list[str] = field(default_factory=list)  # image-to-video-only keys, never applied

    @property
    def name(self) -> str:
        return self.path.name

    def record(self, strength: float) -> dict:
        """What the output's metadata and the resume file keep of this LoRA."""
        return {"name": self.name, "sha256": self.sha256, "strength": strength, "path": str(self.path)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_lora(
    path: str | Path,
    model_shapes: Mapping[str, tuple[int, ...]],
    *,
    skip_unknown: bool = False,
    model_name: str = "this model",
) -> LoraWeights:
    """Read a LoRA file and convert it for a DiT whose parameters (official names) have `model_shapes`.

    Image-to-video-only keys are skipped with a note; other keys that fit no parameter raise
    CheckpointError listing them (unless skip_unknown); a LoRA made for another model size raises
    CheckpointError naming the first module whose shape does not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path}.")
    tensors = LazyStateDict([path])
    state = {k: tensors[k] for k in tensors}
    lora = convert(state, model_shapes, peft_metadata=_peft_metadata(path), source=path.name)
    lora.path, lora.sha256 = path.resolve(), file_sha256(path)
    check_fits(lora, model_shapes, skip_unknown=skip_unknown, model_name=model_name)
    return lora


def _peft_metadata(path: Path) -> dict:
    """lora_alpha / alpha_pattern of a diffusers-saved file (its safetensors header), else {}."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(_PEFT_METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    # A pipeline's file prefixes each entry with its component ("transformer.lora_alpha").
    return {k.removeprefix("transformer."): v for k, v in meta.items()} if isinstance(meta, dict) else {}


# --- conversion ------------------------------------------------------------------------------------


@dataclass
class _Parts:
    """The tensors a file holds for one module, by role, with the keys they came from."""

    file_module: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)


def detect_format(keys: list[str]) -> str:
    """'comfyui', 'kohya', 'videox-fun', 'diffusers', 'diffsynth' or 'official' (bare official names)."""
    for prefix, name in _KOHYA_PREFIXES.items():
        if any(k.startswith(prefix) for k in keys):
            return name
    if any(".lora_A.default." in k or ".lora_B.default." in k for k in keys):
        return "diffsynth"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "comfyui"
    if _dotted_layout([_split(k)[0] for k in keys]) == "diffusers":
        return "diffusers"
    return "official"


def _split(key: str) -> tuple[str, str | None]:
    """'blocks.0.self_attn.q.lora_up.weight' -> ('blocks.0.self_attn.q', 'up'); role None if no LoRA key."""
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            for prefix in _DOTTED_PREFIXES:
                if module.startswith(prefix):
                    return module[len(prefix) :], role
            return module, role
    return key, None


def _dotted_layout(modules: list[str]) -> str:
    layout = dit_keys.detect_layout(modules)
    if layout is None and any(".ffn.net." in m or m.startswith("proj_out") for m in modules):
        layout = "diffusers"
    return layout or "official"


def _underscore_names() -> dict[str, str]:
    """kohya's flattened module names -> official ones (`blocks_0_self_attn_q` -> `blocks.0.self_attn.q`)."""
    return {name.replace(".", "_"): name for name in (*dit_keys.TOP_LEVEL_MODULES, *dit_keys.BLOCK_MODULES)}


_KOHYA_BLOCK = re.compile(r"^blocks_(\d+)_(.+)$")


def _official_module(module: str, fmt: str, layout: str, underscore: dict[str, str]) -> str | None:
    """The official module path of a file's module name; None when it names nothing known."""
    if fmt in ("kohya", "videox-fun"):
        flat = module.removeprefix("lora_unet__" if fmt == "videox-fun" else "lora_unet_")
        match = _KOHYA_BLOCK.match(flat)
        if match:
            inner = underscore.get(match.group(2))
            return None if inner is None else f"blocks.{match.group(1)}.{inner}"
        return underscore.get(flat)
    if layout == "diffusers":
        return dit_keys.diffusers_to_official_key(module)
    return module


def convert(
    state: Mapping[str, torch.Tensor],
    model_shapes: Mapping[str, tuple[int, ...]],
    *,
    peft_metadata: Mapping | None = None,
    source: str = "the LoRA",
) -> LoraWeights:
    """A LoRA state dict (any format above) -> LoraWeights in official names, not yet checked (check_fits)."""
    keys = list(state)
    fmt = detect_format(keys)
    layout = _dotted_layout([_split(k)[0] for k in keys]) if fmt not in _KOHYA_PREFIXES.values() else ""
    underscore = _underscore_names()
    lora = LoraWeights(Path(source), "", fmt)
    parts: dict[str, _Parts] = {}
    for key in keys:
        module, role = _split(key)
        official = _official_module(module, fmt, layout, underscore) if role else None
        if official is None:
            lora.unknown.append(key)
            continue
        entry = parts.setdefault(official, _Parts(module))
        entry.tensors[role] = state[key]
        entry.keys.append(key)

    meta = dict(peft_metadata or {})
    for official, entry in parts.items():
        if dit_keys.is_image_to_video_name(official):
            lora.skipped_i2v.extend(entry.keys)
            continue
        if not any(n in model_shapes for n in (official, f"{official}.weight", f"{official}.bias")):
            lora.unknown.extend(entry.keys)  # no such module in this model (a typo, VACE, another model)
            continue
        t = entry.tensors
        if ("down" in t) != ("up" in t):
            have, lack = (
                ("lora_down/lora_A", "lora_up/lora_B")
                if "down" in t
                else ("lora_up/lora_B", "lora_down/lora_A")
            )
            raise CheckpointError(
                f"{source} has {have} but no {lack} for {official}; the file is incomplete."
            )
        scale = 1.0
        if "down" in t:
            rank = t["down"].shape[0]
            alpha = float(t["alpha"].item()) if "alpha" in t else _metadata_alpha(meta, entry.file_module)
            scale = 1.0 if alpha is None else alpha / rank
            lora.low_rank[official] = LowRank(t["down"], t["up"], scale)
        elif "alpha" in t and not ({"diff", "diff_b", "up_bias"} & set(t)):
            lora.unknown.extend(entry.keys)  # an alpha alone updates nothing
            continue
        if "up_bias" in t:  # PEFT's lora_bias: scaled like the low-rank output
            _add_diff(lora, f"{official}.bias", scale * t["up_bias"].float())
        if "diff_b" in t:
            _add_diff(lora, f"{official}.bias", t["diff_b"].float())
        if "diff" in t:
            # A module's weight (`head.head.diff`), or a bare parameter (`blocks.0.modulation.diff`).
            target = f"{official}.weight" if f"{official}.weight" in model_shapes else official
            _add_diff(lora, target, t["diff"].float())
    return lora


def _add_diff(lora: LoraWeights, name: str, delta: torch.Tensor) -> None:
    lora.diffs[name] = lora.diffs[name] + delta if name in lora.diffs else delta


def _metadata_alpha(meta: Mapping, file_module: str) -> float | None:
    """PEFT's alpha for a module: alpha_pattern (matched like PEFT, by name ending) or lora_alpha."""
    for pattern, alpha in (meta.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", file_module):
            return float(alpha)
    return float(meta["lora_alpha"]) if meta.get("lora_alpha") is not None else None


# --- checks against the model ----------------------------------------------------------------------


def check_fits(
    lora: LoraWeights,
    model_shapes: Mapping[str, tuple[int, ...]],
    *,
    skip_unknown: bool = False,
    model_name: str = "this model",
) -> None:
    """Refuse a LoRA for another model (first mismatching module) or with unknown keys; note skips."""
    unknown = list(lora.unknown)
    mismatch = []  # (model order, message)
    order = {name: i for i, name in enumerate(model_shapes)}
    for module, update in list(lora.low_rank.items()):
        weight = f"{module}.weight"
        if weight not in model_shapes:
            unknown.append(module)
            del lora.low_rank[module]
            continue
        shape = tuple(model_shapes[weight])
        lora_shape = (update.up.shape[0], *update.down.shape[1:])
        up_fits = update.up.shape[1] == update.rank and math.prod(update.up.shape[2:]) == 1
        if not up_fits or lora_shape != shape:
            mismatch.append((order[weight], module, list(lora_shape), list(shape)))
    for name, delta in list(lora.diffs.items()):
        if name not in model_shapes:
            unknown.append(name)
            del lora.diffs[name]
        elif tuple(delta.shape) != tuple(model_shapes[name]):
            mismatch.append((order[name], name, list(delta.shape), list(model_shapes[name])))
    if mismatch:
        _, name, theirs, ours = min(mismatch)
        raise CheckpointError(
            f"{lora.name} was made for another model than {model_name}: its {name} is {theirs}, "
            f"where this model's is {ours}."
        )
    skipped = lora.skipped_i2v
    if skipped:
        lora.notes.append(
            f"{lora.name}: skipped {len(skipped)} image-to-video keys (k_img, v_img, img_emb), which a "
            "text-to-video model does not have"
        )
    if unknown and not skip_unknown:
        raise CheckpointError(
            f"{lora.name} has {len(unknown)} keys that fit no weight of {model_name}: "
            f"{short_list(unknown, 5)}; pass --lora-skip-unknown (skip_unknown=True) to load the rest."
        )
    if unknown:
        lora.notes.append(f"{lora.name}: skipped {len(unknown)} unknown keys ({short_list(unknown, 3)})")
    if not lora.low_rank and not lora.diffs:
        raise CheckpointError(f"{lora.name} holds no LoRA weight that applies to {model_name}.")
