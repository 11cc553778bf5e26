"""Load the Wan2.1 VAE from any layout users keep it in.

Layouts: the official Wan2.1_VAE.pth (a torch pickle, read with weights_only), the diffusers `vae/`
folder (config.json + diffusion_pytorch_model.safetensors, or the pipeline folder above it), and
single safetensors files in either naming (ComfyUI keeps official names). The naming is detected
from the keys; the shape of the model is read from the tensor shapes, then from a config.json
beside the weights, then from the caller. The model is built on the meta device and filled tensor
by tensor, so the weights are never held twice.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from wanfit.errors import CheckpointError, ConfigError
from wanfit.models.vae import WAN21_VAE, VAEConfig, WanVAE
from wanfit.paths import user_path
from wanfit.precision import FP8_DTYPES, parse_stored_dtype, parse_weight_dtype
from wanfit.weights import vae_keys
from wanfit.weights.file_names import DIFFUSERS_VAE, DIFFUSERS_WEIGHTS, OFFICIAL_VAE
from wanfit.weights.io import LazyStateDict, read_json, resolve_weight_files, short_list, strip_prefix

_PREFIXES = ("vae.", "first_stage_model.", "model.")
_MAX_LISTED = 8


@dataclass
class VAECheckpoint:
    """What a VAE checkpoint holds, from its headers only: official name -> key in the file."""

    path: Path
    tensors: LazyStateDict
    layout: str  # "official" or "diffusers"
    keys: dict[str, str]
    unexpected: list[str]
    file_config: dict | None  # VAEConfig fields from a diffusers config.json

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors.shape(self.keys[name])


def load_vae(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    config: VAEConfig | dict | None = None,
) -> WanVAE:
    """Load a Wan2.1 VAE from a file or folder of any supported layout.

    dtype: the weights' dtype, which is also the compute dtype (default: the file's, fp32 for the
    released files). config: a VAEConfig, or a dict of its fields overriding what the file says.
    Returns the model in eval mode, without gradients, on `device`.
    """
    checkpoint = inspect_vae(path)
    cfg = resolve_config(checkpoint, config)
    check_checkpoint(checkpoint, cfg)
    dtype = parse_weight_dtype(dtype, "load_vae") if dtype is not None else _file_dtype(checkpoint)
    device = torch.device(device)

    with torch.device("meta"):
        model = WanVAE(cfg)
    for name, _ in list(model.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        tensor = checkpoint.tensors[checkpoint.keys[name]]
        tensor = (
            tensor.to(dtype).to(device)
            if tensor.element_size() > dtype.itemsize
            else tensor.to(device).to(dtype)
        )
        setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
    return model.eval()


def inspect_vae(path: str | os.PathLike) -> VAECheckpoint:
    """Find the weight files, detect the naming and map every key to its official name."""
    path = user_path(path)
    if path.is_dir() and (path / DIFFUSERS_VAE).is_dir():
        path = path / DIFFUSERS_VAE  # a diffusers pipeline folder
    elif path.is_dir() and (path / OFFICIAL_VAE).is_file():
        path = path / OFFICIAL_VAE  # an official model folder
    files = resolve_weight_files(path, stems=(DIFFUSERS_WEIGHTS,))
    tensors = LazyStateDict(files)
    file_keys = list(tensors)
    prefix = strip_prefix(file_keys, _PREFIXES)
    inner = {k[len(prefix) :]: k for k in file_keys}
    layout = vae_keys.detect_layout(inner)
    if layout is None:
        sample = ", ".join(file_keys[:3]) or "no tensors"
        raise CheckpointError(
            f"{path} is not a Wan2.1 VAE checkpoint of a known layout (official or diffusers); its first keys are: {sample}."
        )
    file_config = _read_config_json(path)
    if layout == "diffusers":
        num_res_blocks = (file_config or {}).get("num_res_blocks") or vae_keys.diffusers_num_res_blocks(inner)
        if num_res_blocks is None:
            num_res_blocks = WAN21_VAE.num_res_blocks
        names = {k: vae_keys.diffusers_to_official(k, num_res_blocks) for k in inner}
    else:
        names = {k: k for k in inner}
    keys = {name: inner[k] for k, name in names.items() if name is not None}
    unexpected = [inner[k] for k, name in names.items() if name is None]
    return VAECheckpoint(path, tensors, layout, keys, unexpected, file_config)


def resolve_config(checkpoint: VAECheckpoint, config: VAEConfig | dict | None) -> VAEConfig:
    """The tensor shapes, overridden by config.json, overridden by the caller."""
    if isinstance(config, VAEConfig):
        return config
    if config is not None and not isinstance(config, dict):
        raise ConfigError(f"config must be a VAEConfig or a dict, not {type(config).__name__}.")
    fields = infer_config(checkpoint)
    fields.update(checkpoint.file_config or {})
    fields.update(config or {})
    z_dim = fields.get("z_dim", WAN21_VAE.z_dim)
    if z_dim != WAN21_VAE.z_dim and "latents_mean" not in fields:
        raise CheckpointError(
            f"{checkpoint.path} has {z_dim} latent channels, not Wan2.1's 16, and no config.json with their "
            "mean and std; pass config={'latents_mean': [...], 'latents_std': [...]}."
        )
    return VAEConfig.from_dict(fields)


def infer_config(checkpoint: VAECheckpoint) -> dict:
    """VAEConfig fields that the encoder's tensor shapes tell (empty if it has no encoder)."""
    names = checkpoint.keys
    if "encoder.conv1.weight" not in names or "conv2.weight" not in names:
        return {}
    base_dim = checkpoint.shape("encoder.conv1.weight")[0]
    entries = sorted({int(m.group(1)) for n in names if (m := re.match(r"encoder\.downsamples\.(\d+)\.", n))})
    resamples = [i for i in entries if f"encoder.downsamples.{i}.resample.1.weight" in names]
    levels = len(resamples) + 1
    if not entries or (len(entries) - len(resamples)) % levels:
        return {"base_dim": base_dim}
    num_res_blocks = (len(entries) - len(resamples)) // levels
    firsts = [level * (num_res_blocks + 1) for level in range(levels)]
    first_convs = [f"encoder.downsamples.{i}.residual.2.weight" for i in firsts]
    if not all(n in names for n in first_convs):
        return {"base_dim": base_dim}
    return {
        "base_dim": base_dim,
        "z_dim": checkpoint.shape("conv2.weight")[0],
        "num_res_blocks": num_res_blocks,
        "dim_mult": tuple(checkpoint.shape(n)[0] // base_dim for n in first_convs),
        "temperal_downsample": tuple(f"encoder.downsamples.{i}.time_conv.weight" in names for i in resamples),
    }


def check_checkpoint(checkpoint: VAECheckpoint, cfg: VAEConfig) -> None:
    """Raise one CheckpointError naming every missing, unexpected or mis-shaped (or non-float) tensor."""
    for key in checkpoint.keys.values():  # headers only; an integer tensor would otherwise be cast silently
        stored = checkpoint.tensors.dtype_name(key)
        if parse_stored_dtype(stored) in (None, *FP8_DTYPES):
            raise CheckpointError(
                f"{checkpoint.path}: tensor {key!r} is stored as {stored}; the Wan2.1 VAE has float "
                "weights (fp32, bf16, fp16)."
            )
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in WanVAE(cfg).state_dict().items()}
    missing = [n for n in expected if n not in checkpoint.keys]
    unexpected = [checkpoint.keys[n] for n in checkpoint.keys if n not in expected] + checkpoint.unexpected
    mismatched = [
        f"{checkpoint.keys[n]} (file {list(checkpoint.shape(n))}, model {list(shape)})"
        for n, shape in expected.items()
        if n in checkpoint.keys and checkpoint.shape(n) != shape
    ]
    problems = [
        f"{len(items)} {label}: {short_list(items, _MAX_LISTED)}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of the wrong shape", mismatched),
        )
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{checkpoint.path} ({checkpoint.layout} layout) does not fit the Wan2.1 VAE of base_dim "
            f"{cfg.base_dim}, z_dim {cfg.z_dim}: tensors {'; '.join(problems)}."
        )


def config_from_diffusers(raw: dict, source: Path | str = "config.json") -> dict:
    """An AutoencoderKLWan config.json -> VAEConfig fields; other VAE variants are refused."""
    if raw.get("is_residual") or raw.get("patch_size") or raw.get("z_dim", 16) == 48:
        raise CheckpointError(f"{source} describes the Wan2.2 VAE; wanfit loads the Wan2.1 VAE.")
    decoder_dim = raw.get("decoder_base_dim")
    if raw.get("attn_scales") or (decoder_dim is not None and decoder_dim != raw.get("base_dim")):
        raise CheckpointError(f"{source} describes a VAE variant that is not the Wan2.1 architecture.")
    if raw.get("in_channels", 3) != 3 or raw.get("out_channels", 3) != 3:
        raise CheckpointError(f"{source} describes a VAE for other than 3-channel video.")
    fields = (
        "base_dim",
        "z_dim",
        "dim_mult",
        "num_res_blocks",
        "temperal_downsample",
        "latents_mean",
        "latents_std",
    )
    return {
        k: tuple(raw[k]) if isinstance(raw[k], list) else raw[k] for k in fields if raw.get(k) is not None
    }


def _read_config_json(path: Path) -> dict | None:
    """VAEConfig fields from an AutoencoderKLWan config.json beside the weights, if there is one."""
    file = (path if path.is_dir() else path.parent) / "config.json"
    if not file.is_file():
        return None
    raw = read_json(file)
    if raw.get("_class_name") != "AutoencoderKLWan" and not {"base_dim", "z_dim"} <= raw.keys():
        return None  # another model's config (e.g. the DiT's, in an official folder)
    return config_from_diffusers(raw, file)


def _file_dtype(checkpoint: VAECheckpoint) -> torch.dtype:
    """The dtype most of the file's parameters are stored in (fp64 and unknown -> fp32)."""
    counts: dict[torch.dtype, int] = {}
    for name, key in checkpoint.keys.items():
        dtype = parse_stored_dtype(checkpoint.tensors.dtype_name(key)) or torch.float32
        size = 1
        for d in checkpoint.shape(name):
            size *= d
        counts[dtype] = counts.get(dtype, 0) + size
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return torch.float32 if dtype == torch.float64 else dtype
