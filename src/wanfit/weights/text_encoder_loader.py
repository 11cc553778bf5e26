"""Load the umT5 text encoder from any layout Wan2.1 is shipped in, into a WanTextEncoder.

Layouts: the official models_t5_umt5-xxl-enc-bf16.pth (official names, tokenizer in google/umt5-xxl/
beside it), the diffusers text_encoder/ folder (transformers names, tokenizer in ../tokenizer/), a
diffusers model root, and single safetensors files. The model is built on the meta device and filled
tensor by tensor (build_umt5), so the weights are never held twice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wanfit.errors import CheckpointError
from wanfit.models.text_cache import PromptCache, cache_enabled_by_env, files_fingerprint
from wanfit.models.text_encoder import WanTextEncoder
from wanfit.paths import user_path
from wanfit.weights import t5_keys
from wanfit.weights.file_names import (
    DIFFUSERS_TEXT_ENCODER,
    DIFFUSERS_TOKENIZER,
    OFFICIAL_T5,
    OFFICIAL_TOKENIZER,
    TOKENIZER_FILES,
    TRANSFORMERS_WEIGHTS,
)
from wanfit.weights.io import (
    LazyStateDict,
    find_weight_files,
    read_json,
    resolve_weight_files,
    short_list,
    strip_prefix,
)


def load_text_encoder(
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    prompt_cache: bool | str | os.PathLike = True,
) -> WanTextEncoder:
    """Load umT5 from any layout Wan2.1 is shipped in.

    path: the diffusers `text_encoder/` folder (tokenizer from its sibling `tokenizer/`), a diffusers
    model root, the official `models_t5_umt5-xxl-enc-bf16.pth` (tokenizer from `google/umt5-xxl/`
    beside it), an official release root, or a single safetensors file in transformers names.
    tokenizer: a tokenizer folder or object; found beside the weights when not given.
    dtype: storage dtype of the weights (default: as stored in the file); compute_dtype: what the
    encoder runs in (default: the storage dtype; fp32 over half weights runs block by block).
    prompt_cache: True (default folder, unless WANFIT_PROMPT_CACHE=0), False, or a cache folder.
    """
    weight_files, config_file, tokenizer_dirs = _locate(user_path(path))
    state = LazyStateDict(weight_files)
    config = _umt5_config(config_file) if config_file is not None else None
    model = build_umt5(state, config, device=device, dtype=dtype, source=str(path))
    tok, tokenizer_dir = _load_tokenizer(tokenizer, tokenizer_dirs)
    if len(tok) > model.config.vocab_size:
        raise CheckpointError(
            f"The tokenizer has {len(tok)} tokens but the text encoder only {model.config.vocab_size}: "
            "they belong to different models."
        )
    fingerprint = None  # a tokenizer object is fingerprinted by its vocabulary, later and only if needed
    if tokenizer_dir is not None:
        files = [*weight_files, *([config_file] if config_file else [])]
        fingerprint = files_fingerprint(files + [p for p in tokenizer_dir.iterdir() if p.is_file()])
    cache = None
    if prompt_cache is not False and cache_enabled_by_env():
        cache = PromptCache(None if prompt_cache is True else user_path(prompt_cache))
    return WanTextEncoder(model, tok, compute_dtype=compute_dtype, cache=cache, fingerprint=fingerprint)


def _umt5_config(config_file: Path) -> dict:
    config = read_json(config_file)
    if config.get("model_type") != "umt5":
        raise CheckpointError(
            f"{config_file} describes a {config.get('model_type')!r} model, not the umT5 text encoder."
        )
    return config


def build_umt5(
    state: Mapping[str, torch.Tensor],
    config: dict | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "the checkpoint",
) -> nn.Module:
    """A UMT5EncoderModel holding the tensors of `state` (official or transformers names).

    The model is built on the meta device and the tensors are assigned, converted one at a time, so
    the weights are never allocated twice. `config`: UMT5Config arguments; inferred from the shapes
    when None. Missing, unexpected or misshapen tensors raise one CheckpointError naming them.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    names = list(state)
    prefix = strip_prefix(names, t5_keys.KNOWN_PREFIXES)
    local = {n[len(prefix) :]: n for n in names}  # name without prefix -> name in the file
    mapping = _transformers_mapping(list(local))  # transformers name -> name without prefix
    shapes = {hf: _shape(state, local[src]) for hf, src in mapping.items()}
    if config is None:
        config = t5_keys.umt5_config_from_shapes(shapes)
    config = UMT5Config.from_dict({**config, "dropout_rate": 0.0})
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}

    missing = [n for n in expected if n not in mapping]
    used = set(mapping.values()) | set(t5_keys.EMBEDDING_NAMES)
    unexpected = [n for n in local if n not in used]
    misshapen = [
        f"{n} (file {list(shapes[n])}, model {list(expected[n])})"
        for n in expected
        if n in shapes and shapes[n] != expected[n]
    ]
    if missing or unexpected or misshapen:
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if items:
                problems.append(f"{label}: {short_list(items, 8)}")
        raise CheckpointError(
            f"{source} does not match a umT5 encoder with {config.num_layers} layers of width "
            f"{config.d_model}; " + "; ".join(problems) + "."
        )

    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    loaded: dict[str, torch.Tensor] = {}
    tensors = {}
    for name in expected:
        src = local[mapping[name]]
        if src not in loaded:
            tensor = state[src]
            target = dtype or (tensor.dtype if tensor.is_floating_point() and tensor.itemsize >= 2 else None)
            target = target or torch.bfloat16  # fp8 storage: bf16 is the closest dtype that computes
            # As transformers' from_pretrained does: fp16 models keep the FFN output projection in fp32.
            if target == torch.float16 and keep_fp32 & set(name.split(".")):
                target = torch.float32
            loaded[src] = tensor.to(device=device, dtype=target)
        tensors[name] = loaded[src]
    model.load_state_dict(tensors, strict=True, assign=True)
    # assign=True gave the two embedding names two Parameters over one tensor; tie them back into one.
    model.encoder.embed_tokens.weight = model.shared.weight
    return model.eval().requires_grad_(False)


def _transformers_mapping(names: list[str]) -> dict[str, str]:
    """transformers name -> file name (without prefix) for a state dict in either naming."""
    if t5_keys.detect_t5_format(names) == "official":
        return t5_keys.official_to_transformers(names)
    mapping = {n: n for n in names if n not in t5_keys.EMBEDDING_NAMES}
    # transformers' encoder reads encoder.embed_tokens; `shared` is tied to it, so both names share
    # one tensor (the file's embed_tokens when it has both, as transformers' own loader uses).
    present = [n for n in t5_keys.EMBEDDING_NAMES if n in names]
    if present:
        for n in t5_keys.EMBEDDING_NAMES:
            mapping[n] = present[0]
    return mapping


def _shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    if isinstance(state, LazyStateDict):
        return state.shape(name)
    return tuple(state[name].shape)


def _locate(path: Path) -> tuple[list[Path], Path | None, list[Path]]:
    """Weight files, the config.json to honour (None: infer from shapes), tokenizer folders to try."""
    if not path.exists():
        raise CheckpointError(f"Text encoder path not found: {path}.")
    if path.is_file():
        files = resolve_weight_files(path)
        folder = path.parent
        # A safetensors file may sit in its text_encoder/ folder; an official root's config.json is the DiT's.
        config = folder / "config.json"
        if files[0].suffix != ".safetensors" or not config.is_file():
            config = None
        elif read_json(config).get("model_type") != "umt5":
            config = None
        tokenizers = [
            folder / OFFICIAL_TOKENIZER,
            folder.parent / DIFFUSERS_TOKENIZER,
            folder / DIFFUSERS_TOKENIZER,
            folder,
        ]
        return files, config, tokenizers
    if (path / DIFFUSERS_TEXT_ENCODER).is_dir():  # diffusers model root
        return _locate(path / DIFFUSERS_TEXT_ENCODER)
    if (path / OFFICIAL_T5).is_file():  # official release root
        return [path / OFFICIAL_T5], None, [path / OFFICIAL_TOKENIZER]
    if (path / "config.json").is_file() or any(path.glob("*.safetensors")):  # a text_encoder/ folder
        files = find_weight_files(path, stems=(TRANSFORMERS_WEIGHTS,))
        config = path / "config.json"
        return files, config if config.is_file() else None, [path.parent / DIFFUSERS_TOKENIZER, path]
    raise CheckpointError(
        f"{path} holds no umT5 text encoder: expected a diffusers text_encoder/ folder (config.json + "
        f"safetensors), a model root with text_encoder/, or {OFFICIAL_T5}."
    )


def _is_tokenizer_dir(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def _load_tokenizer(tokenizer: Any, candidates: list[Path]) -> tuple[Any, Path | None]:
    """The tokenizer object and the folder it came from (None for a given object)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer, None
    if tokenizer is not None:
        folder = user_path(tokenizer)
        if not _is_tokenizer_dir(folder):
            raise CheckpointError(
                f"{folder} is not a tokenizer folder (it needs one of {', '.join(TOKENIZER_FILES)})."
            )
    else:
        folder = next((c for c in candidates if _is_tokenizer_dir(c)), None)
        if folder is None:
            looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
            raise CheckpointError(
                f"No tokenizer found for the text encoder (looked in {looked}); pass tokenizer= the "
                "google/umt5-xxl tokenizer folder."
            )
    from transformers import AutoTokenizer, T5Tokenizer

    errors = []
    for cls in (AutoTokenizer, T5Tokenizer):
        try:
            return cls.from_pretrained(str(folder), local_files_only=True), folder
        except Exception as err:  # transformers raises many types here
            errors.append(f"{cls.__name__}: {err}")
    raise CheckpointError(f"Could not load the tokenizer in {folder} ({'; '.join(errors)}).")
