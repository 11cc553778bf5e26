"""Load a Wan2.1 T2V DiT from any layout users keep it in.

Layouts: a diffusers `transformer/` folder (or the pipeline folder above it), the official release
(one file, shards + index, or the model folder), and ComfyUI-style single files (official names,
maybe under `model.diffusion_model.`, in fp32/bf16/fp16/fp8-e4m3, fp8 possibly with per-tensor
`scale_weight`; fp8 matrices upcast on load, or kept as stored with keep_fp8). The layout is detected from the keys; the model is built on the meta device and
filled tensor by tensor from the memory-mapped file, so the weights are never held twice.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from wanfit.errors import CheckpointError, ConfigError
from wanfit.models.configs import DiTConfig
from wanfit.models.dit import WanDiT
from wanfit.paths import user_path
from wanfit.precision import FP8_DTYPES, FP8_STORAGE_DTYPE, parse_stored_dtype, parse_weight_dtype
from wanfit.weights import dit_keys
from wanfit.weights.file_names import DIFFUSERS_DIT, DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS
from wanfit.weights.io import LazyStateDict, read_json, resolve_weight_files, short_list

_MAX_LISTED = 10


@dataclass
class DiTCheckpoint:
    """What a DiT checkpoint holds, read from its headers only (no tensor data)."""

    path: Path
    tensors: LazyStateDict
    layout: str  # "official" or "diffusers"
    keys: dict[str, str]  # official name -> key in the file
    unexpected: list[str]  # keys in the file that are no DiT weight
    scales: dict[str, str] = field(default_factory=dict)  # official name -> its fp8 scale_weight key
    file_config: dict | None = None  # from config.json, official names

    @property
    def files(self) -> list[Path]:
        return self.tensors.files

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors.shape(self.keys[name])

    def stored_dtype(self, name: str) -> torch.dtype:
        stored = self.tensors.dtype_name(self.keys[name])
        dtype = parse_stored_dtype(stored)
        if dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor {self.keys[name]!r} is stored as {stored}; wanfit loads float "
                "weights (fp32, bf16, fp16, fp8), not integer-quantised ones."
            )
        return dtype

    def default_dtype(self, *, fp8_kept: bool = False) -> torch.dtype:
        """The file's dtype (the one most parameters have); bf16 for fp8 files, or with fp8_kept (its
        fp8 matrices kept as they are) the dtype most of its other tensors have."""
        counts: dict[torch.dtype, int] = {}
        for name in self.keys:
            dtype = self.stored_dtype(name)
            if not (fp8_kept and dtype in FP8_DTYPES):
                counts[dtype] = counts.get(dtype, 0) + math.prod(self.shape(name))
        if not counts:
            return torch.float32
        if any(d in FP8_DTYPES for d in counts):
            return torch.bfloat16
        dtype = max(counts, key=counts.get)
        return torch.float32 if dtype == torch.float64 else dtype

    def read(self, name: str) -> torch.Tensor:
        """One tensor as stored, fp8 scale not yet applied."""
        return self.tensors[self.keys[name]]

    def inferred_config(self) -> dict:
        """Config fields (official names) that the tensor shapes tell; the rest is left out."""
        names = self.keys
        cfg: dict = {}
        if "patch_embedding.weight" in names:
            dim, in_dim, *patch = self.shape("patch_embedding.weight")
            cfg.update(dim=dim, in_dim=in_dim, patch_size=tuple(patch))
            if dim % 128 == 0:  # every released Wan2.1 model has heads of 128
                cfg["num_heads"] = dim // 128
            if "head.head.weight" in names:
                cfg["out_dim"] = self.shape("head.head.weight")[0] // math.prod(patch)
        if "text_embedding.0.weight" in names:
            cfg["text_dim"] = self.shape("text_embedding.0.weight")[1]
        if "time_embedding.0.weight" in names:
            cfg["freq_dim"] = self.shape("time_embedding.0.weight")[1]
        if "blocks.0.ffn.0.weight" in names:
            cfg["ffn_dim"] = self.shape("blocks.0.ffn.0.weight")[0]
        blocks = [int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))]
        if blocks:
            cfg["num_layers"] = max(blocks) + 1
            cfg["cross_attn_norm"] = "blocks.0.norm3.weight" in names
            cfg["qk_norm"] = "blocks.0.self_attn.norm_q.weight" in names
        return cfg


def load_dit(
    path: str | os.PathLike,
    *,
    config: DiTConfig | dict | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    keep_fp8: bool = False,
) -> WanDiT:
    """Load a Wan2.1 T2V DiT from a file, shard index or folder of any supported layout.

    config: a DiTConfig, or a dict in official names (dim, num_heads, ...) overriding what
    config.json or the tensor shapes say. dtype: the weights' dtype (default: the file's; bf16
    for fp8 files). keep_fp8: the blocks' float8_e4m3fn matrices stay as the file has them (its
    mapped bytes, nothing converted) with their scale_weight (1 without) in `model.fp8_scales`;
    for a placement with fp8 storage, which upcasts them block by block; the rest in `dtype`, by
    default the file's (its fp8 tensors outside the blocks in fp32). Without it fp8 weights are
    upcast on load. Returns the model in eval mode without gradients, on `device`.
    """
    dtype = parse_weight_dtype(dtype, "load_dit") if dtype is not None else None
    checkpoint = inspect_dit(path)
    cfg = resolve_config(checkpoint, config)
    check_checkpoint(checkpoint, cfg)
    # Kept fp8: the other fp8 tensors (outside the blocks, few) dequantised exactly, in fp32; the
    # placement converts them to the compute dtype as the upcast load would have.
    fp8_rest = dtype or torch.float32
    dtype = dtype or checkpoint.default_dtype(fp8_kept=keep_fp8)
    device = torch.device(device)

    with torch.device("meta"):
        model = WanDiT(cfg)
    for name, param in list(model.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        if keep_fp8 and _kept_in_fp8(checkpoint, name, param):
            tensor = checkpoint.read(name).to(device)
            model.fp8_scales[name] = _file_scale(checkpoint, name)
        else:
            outside = keep_fp8 and not name.startswith("blocks.")
            fp8_outside = outside and checkpoint.stored_dtype(name) in FP8_DTYPES
            tensor = _read_converted(checkpoint, name, device, fp8_rest if fp8_outside else dtype)
        setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
    return model.eval()


def _kept_in_fp8(checkpoint: DiTCheckpoint, name: str, param: torch.Tensor) -> bool:
    """A block matrix stored as float8_e4m3fn: the form fp8 storage keeps (the streamer's)."""
    in_block = name.startswith("blocks.") and param.ndim == 2
    return in_block and checkpoint.stored_dtype(name) == FP8_STORAGE_DTYPE


def _file_scale(checkpoint: DiTCheckpoint, name: str) -> torch.Tensor:
    """An fp8 weight's scale_weight as an fp32 scalar on the host; 1 for an unscaled file."""
    if name not in checkpoint.scales:
        return torch.ones((), dtype=torch.float32)
    return checkpoint.tensors[checkpoint.scales[name]].float().reshape(())


def inspect_dit(path: str | os.PathLike) -> DiTCheckpoint:
    """Open a DiT checkpoint lazily: find its files, strip prefixes, detect the layout, map the keys."""
    path = user_path(path)
    if path.is_dir() and (path / DIFFUSERS_DIT).is_dir() and not list(path.glob(f"{DIFFUSERS_WEIGHTS}*")):
        path = path / DIFFUSERS_DIT  # a diffusers pipeline folder
    files = resolve_weight_files(path, stems=(DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS))
    return map_dit_keys(LazyStateDict(files), path, read_config_json(path))


def map_dit_keys(tensors: LazyStateDict, path: Path, file_config: dict | None = None) -> DiTCheckpoint:
    """Strip the prefix, detect the layout and map every key of `tensors` to its official name."""
    file_keys = list(tensors)

    prefix = dit_keys.find_prefix(file_keys)
    layout = dit_keys.detect_layout([k[len(prefix) :] for k in file_keys if k.startswith(prefix)])
    if layout is None:
        other = dit_keys.describe_other_model(file_keys)
        if other:
            raise CheckpointError(f"{path} holds {other}.")
        sample = ", ".join(file_keys[:3]) or "no tensors"
        raise CheckpointError(
            f"{path} is not a Wan2.1 DiT checkpoint of a known layout (official, diffusers or ComfyUI); "
            f"its first keys are: {sample}."
        )

    to_official = (lambda k: k) if layout == "official" else dit_keys.diffusers_to_official_key
    keys: dict[str, str] = {}
    scales: dict[str, str] = {}
    unexpected: list[str] = []
    for key in file_keys:
        inner = key[len(prefix) :] if key.startswith(prefix) else None
        if inner is not None and inner.endswith(dit_keys.FP8_WEIGHT_SCALE):
            base = to_official(inner[: -len(dit_keys.FP8_WEIGHT_SCALE)] + ".weight")
            if base is not None:
                scales[base] = key
                continue
        if key == dit_keys.FP8_MARKER_KEY or (inner or "").endswith(dit_keys.FP8_INPUT_SCALE):
            continue  # fp8 bookkeeping; inputs are never quantised
        if inner is None:
            continue  # outside the DiT prefix: another part of an all-in-one file (VAE, text encoder)
        name = to_official(inner)
        if name is None or (layout == "official" and not _looks_like_dit_key(name)):
            unexpected.append(key)
        else:
            keys[name] = key

    return DiTCheckpoint(Path(path), tensors, layout, keys, unexpected, scales, file_config)


def resolve_config(checkpoint: DiTCheckpoint, config: DiTConfig | dict | None) -> DiTConfig:
    """What the tensor shapes tell, overridden by config.json, overridden by the caller's config."""
    if isinstance(config, DiTConfig):
        return config
    if config is not None and not isinstance(config, dict):
        raise ConfigError(
            f"config must be a DiTConfig or a dict of official names, not {type(config).__name__}."
        )
    unknown = sorted(set(config or {}) - set(DiTConfig().to_dict()))
    if unknown:
        raise ConfigError(
            f"Unknown DiT config keys: {', '.join(unknown)} (use official names: dim, num_heads, ...)."
        )
    fields = checkpoint.inferred_config()
    fields.update(checkpoint.file_config or {})
    fields.update(config or {})
    if "num_heads" not in fields:
        raise CheckpointError(
            f"Cannot tell the number of attention heads of {checkpoint.path} (dim={fields.get('dim')}) from "
            "its weights; pass config={'num_heads': N} or keep the config.json next to the weights."
        )
    return DiTConfig.from_dict(fields)


def check_checkpoint(checkpoint: DiTCheckpoint, cfg: DiTConfig) -> None:
    """Raise one CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    names = list(checkpoint.keys) + checkpoint.unexpected
    other = dit_keys.describe_other_model(names)
    inferred = checkpoint.inferred_config()
    in_dim = inferred.get("in_dim", cfg.in_dim)
    real_size = inferred.get("dim", 0) >= 1536 and inferred.get("dim", 0) % 128 == 0
    if other is None and real_size and in_dim != 16:
        other = (
            f"a model with {in_dim} input channels (image-to-video or Wan2.2), not a Wan2.1 text-to-video DiT"
        )
    if other:
        raise CheckpointError(f"{checkpoint.path} holds {other}.")

    for name in checkpoint.keys:  # headers only; an integer tensor would otherwise be cast silently
        checkpoint.stored_dtype(name)

    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in WanDiT(cfg).state_dict().items()}
    missing = [n for n in expected if n not in checkpoint.keys]
    unexpected = [n for n in checkpoint.keys if n not in expected] + checkpoint.unexpected
    mismatched = [
        f"{n} (file {list(checkpoint.shape(n))}, model {list(expected[n])})"
        for n in expected
        if n in checkpoint.keys and checkpoint.shape(n) != expected[n]
    ]
    if not (missing or unexpected or mismatched):
        return

    model = dit_keys.describe_size(cfg.dim, cfg.num_layers, cfg.in_dim)
    message = f"{checkpoint.path} does not fit the configured DiT, {model}"
    listed = _MAX_LISTED
    if "dim" in inferred and "num_layers" in inferred:
        found = dit_keys.describe_size(inferred["dim"], inferred["num_layers"], in_dim)
        if found != model:
            message += f": its weights are of another model, {found}"
            listed = 3  # the model names say it all; a few keys are enough
    problems = [
        f"{len(items)} {label}: {short_list(items, listed)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        if items
    ]
    raise CheckpointError(f"{message}. {'; '.join(problems)}.")


def _read_converted(
    checkpoint: DiTCheckpoint, name: str, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    tensor = checkpoint.read(name)
    if name in checkpoint.scales:
        scale = checkpoint.tensors[checkpoint.scales[name]]
        tensor = tensor.to(device).float() * scale.to(device).float()
    # Move in the smaller of the two dtypes: fp8 travels as fp8, fp32 is narrowed before it travels.
    if tensor.element_size() <= dtype.itemsize:
        return tensor.to(device).to(dtype)
    return tensor.to(dtype).to(device)


def _looks_like_dit_key(name: str) -> bool:
    return dit_keys.official_to_diffusers_key(name) is not None


def read_config_json(path: Path) -> dict | None:
    """A DiT config.json beside the weights, in official names; None if there is none or it is another model's."""
    folder = path if path.is_dir() else path.parent
    file = folder / "config.json"
    if not file.is_file():
        return None
    raw = read_json(file)
    if raw.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in raw:
        return config_from_diffusers(raw, file)
    if raw.get("_class_name") == "WanModel" or ("dim" in raw and "num_heads" in raw):
        return config_from_official(raw, file)
    return None


def config_from_diffusers(raw: dict, source: Path | str = "config.json") -> dict:
    """A diffusers WanTransformer3DModel config -> DiTConfig fields (official names)."""
    if raw.get("image_dim") or raw.get("added_kv_proj_dim") or raw.get("pos_embed_seq_len"):
        raise CheckpointError(
            f"{source} describes a Wan image-to-video model; wanfit runs text-to-video models."
        )
    heads, head_dim = raw.get("num_attention_heads", 40), raw.get("attention_head_dim", 128)
    cfg = {"dim": heads * head_dim, "num_heads": heads}
    renames = {
        "in_channels": "in_dim",
        "out_channels": "out_dim",
        "text_dim": "text_dim",
        "freq_dim": "freq_dim",
        "ffn_dim": "ffn_dim",
        "num_layers": "num_layers",
        "cross_attn_norm": "cross_attn_norm",
        "eps": "eps",
        "patch_size": "patch_size",
    }
    cfg.update({ours: raw[theirs] for theirs, ours in renames.items() if raw.get(theirs) is not None})
    if "qk_norm" in raw:
        cfg["qk_norm"] = bool(raw["qk_norm"])
    if "patch_size" in cfg:
        cfg["patch_size"] = tuple(cfg["patch_size"])
    return cfg


def config_from_official(raw: dict, source: Path | str = "config.json") -> dict:
    """An official Wan2.1 config.json (WanModel) -> DiTConfig fields."""
    model_type = raw.get("model_type", "t2v")
    if model_type != "t2v":
        raise CheckpointError(
            f"{source} describes a Wan {model_type} model; wanfit runs text-to-video (t2v) models."
        )
    known = {
        "dim",
        "ffn_dim",
        "freq_dim",
        "num_heads",
        "num_layers",
        "in_dim",
        "out_dim",
        "text_dim",
        "text_len",
    }
    known |= {"patch_size", "eps", "cross_attn_norm", "qk_norm"}
    cfg = {k: v for k, v in raw.items() if k in known}
    if "patch_size" in cfg:
        cfg["patch_size"] = tuple(cfg["patch_size"])
    return cfg


def folder_dit_config(folder: Path | None = None, *, files=None):
    """(DiTConfig, name) of a model folder (or of a model's ModelFiles): its DiT config.json, else the
    DiT's tensor headers (no weights read). A DiT file named on its own (--dit) in a folder with a
    config.json must be that model: headers checked, one sentence if not. name: the preset's ("1.3B",
    "14B") when the shape is one, else "dim N"."""
    from wanfit.models.configs import DIT_PRESETS, DiTConfig
    from wanfit.weights.model_dir import find_model_files

    values = None
    if files is None:
        folder = user_path(folder)
        if not folder.is_dir():
            find_model_files(folder)  # says what is wrong: missing, or a file rather than a folder
        values = read_config_json(folder / DIFFUSERS_DIT) or read_config_json(folder)
        if values is None:
            files = find_model_files(folder)
    elif files.layout in ("official", "diffusers"):
        values = read_config_json(files.root / DIFFUSERS_DIT) or read_config_json(files.root)
    if values is None and files is not None and "dit" in files.given:
        values = read_config_json(files.dit)  # a config.json beside the named file
    if values is not None:
        config = DiTConfig.from_dict(values)
        if files is not None and "dit" in files.given:
            check_checkpoint(inspect_dit(files.dit), config)
    else:
        config = resolve_config(inspect_dit(files.dit), None)
    name = next((n for n, preset in DIT_PRESETS.items() if preset == config), None)
    name = name or next((n for n, p in DIT_PRESETS.items() if p.dim == config.dim), f"dim {config.dim}")
    return config, name
