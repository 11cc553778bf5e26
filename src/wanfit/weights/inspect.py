"""The shapes of a model folder's text encoder and VAE, read without loading their weights.

The planner sizes its estimates from them, so a small model is planned as small. Sources, first
found wins: a diffusers config.json, else the tensor shapes (safetensors headers; a .pth is memory
mapped by the lazy reader, its tensors never read).
"""

from __future__ import annotations

import os
from pathlib import Path

from wanfit.errors import CheckpointError
from wanfit.models.configs import TextEncoderConfig
from wanfit.models.vae import VAEConfig
from wanfit.weights import t5_keys
from wanfit.weights.io import (
    LazyStateDict,
    find_weight_files,
    read_json,
    resolve_weight_files,
    stored_dtype_name,
    strip_prefix,
)
from wanfit.weights.model_dir import ModelFiles, find_model_files
from wanfit.weights.vae_loader import inspect_vae, resolve_config


def _files(model: str | os.PathLike | ModelFiles) -> ModelFiles:
    return model if isinstance(model, ModelFiles) else find_model_files(model)


def component_shapes(model: str | os.PathLike | ModelFiles) -> tuple[TextEncoderConfig, VAEConfig]:
    """(text encoder, VAE) configs of a model folder of any layout (or of its ModelFiles)."""
    files = _files(model)
    return text_encoder_config(files.text_encoder), vae_config(files.vae)


def component_dtypes(model: str | os.PathLike | ModelFiles) -> tuple[str | None, str | None]:
    """(DiT, text encoder): the dtype most of each one's stored weights have, from headers only."""
    from wanfit.weights.dit_loader import inspect_dit

    files = _files(model)
    dit = inspect_dit(files.dit)
    return stored_dtype_name(dit.tensors, dit.keys.values()), stored_dtype_name(
        _text_encoder_state(files.text_encoder)
    )


def _text_encoder_state(path: Path) -> LazyStateDict:
    path = Path(path)
    if path.is_dir():
        return LazyStateDict(find_weight_files(path, stems=("model",)))
    return LazyStateDict(resolve_weight_files(path))


def vae_config(path: str | os.PathLike) -> VAEConfig:
    """The VAE's config from its config.json and tensor shapes, as load_vae would build it."""
    return resolve_config(inspect_vae(path), None)


def text_encoder_config(path: str | os.PathLike) -> TextEncoderConfig:
    """The umT5 shape of a text_encoder/ folder (its config.json) or a weight file (its tensor shapes)."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            raw = read_json(config)
            if raw.get("model_type") != "umt5":
                raise CheckpointError(
                    f"{config} describes a {raw.get('model_type')!r} model, not the umT5 text encoder."
                )
            return TextEncoderConfig.from_umt5(raw)
    from wanfit.weights.text_encoder_loader import is_bookkeeping

    state = _text_encoder_state(path)
    names = [n for n in state if not is_bookkeeping(n)]
    prefix = strip_prefix(names, t5_keys.KNOWN_PREFIXES)
    local = {name[len(prefix) :]: name for name in names}  # without the prefix -> in the file
    if t5_keys.detect_t5_format(local) == "official":
        to_file = t5_keys.official_to_transformers(local)  # transformers name -> name without prefix
    else:
        to_file = {name: name for name in local}
    shapes = {name: state.shape(local[src]) for name, src in to_file.items()}
    return TextEncoderConfig.from_umt5(t5_keys.umt5_config_from_shapes(shapes))
