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
from wanfit.precision import parse_dtype, quantize_fp8
from wanfit.weights import comfy_keys, t5_keys
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
    dtype: torch.dtype | str | None = None,
    compute_dtype: torch.dtype | None = None,
    prompt_cache: bool | str | os.PathLike = True,
) -> WanTextEncoder:
    """Load umT5 from any layout Wan2.1 is shipped in.

    path: the diffusers `text_encoder/` folder (tokenizer from its sibling `tokenizer/`), a diffusers
    model root, the official `models_t5_umt5-xxl-enc-bf16.pth` (tokenizer from `google/umt5-xxl/`
    beside it), an official release root, or a single safetensors file in transformers names, such as
    ComfyUI's umt5_xxl_fp16 and umt5_xxl_fp8_e4m3fn_scaled (their tokenizer is inside the file).
    tokenizer: a tokenizer folder or object; found beside the weights (or in the file) when not given.
    dtype: storage dtype of the weights: bf16, fp16, fp32, or fp8 (the blocks' matrices in
    float8_e4m3fn with a scale each, upcast per block); default: as stored in the file (a scaled fp8
    file's weights and scales kept). compute_dtype: what the encoder runs in (default: the storage
    dtype; fp32 over half or fp8 weights runs block by block).
    prompt_cache: True (default folder, unless WANFIT_PROMPT_CACHE=0), False, or a cache folder.
    """
    weight_files, config_file, tokenizer_dirs = _locate(user_path(path))
    state = LazyStateDict(weight_files)
    config = _umt5_config(config_file) if config_file is not None else None
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    scales: dict[str, torch.Tensor] = {}
    model = build_umt5(state, config, device=device, dtype=dtype, source=str(path), scales=scales)
    tok, tokenizer_dir = _load_tokenizer(tokenizer, tokenizer_dirs, _embedded_tokenizer(state))
    if len(tok) > model.config.vocab_size:
        raise CheckpointError(
            f"The tokenizer has {len(tok)} tokens but the text encoder only {model.config.vocab_size}: "
            "they belong to different models."
        )
    fingerprint = None  # a tokenizer object is fingerprinted by its vocabulary, later and only if needed
    if tokenizer_dir is not None:
        files = [*weight_files, *([config_file] if config_file else [])]
        fingerprint = files_fingerprint(files + [p for p in tokenizer_dir.iterdir() if p.is_file()])
    elif tokenizer is None:  # the tokenizer came from the weight file itself
        fingerprint = files_fingerprint(list(weight_files))
    cache = None
    if prompt_cache is not False and cache_enabled_by_env():
        cache = PromptCache(None if prompt_cache is True else user_path(prompt_cache))
    return WanTextEncoder(
        model, tok, compute_dtype=compute_dtype, cache=cache, fingerprint=fingerprint, scales=scales
    )


def _umt5_config(config_file: Path) -> dict:
    config = read_json(config_file)
    if config.get("model_type") != "umt5":
        raise CheckpointError(
            f"{config_file} describes a {config.get('model_type')!r} model, not the umT5 text encoder."
        )
    return config


def is_bookkeeping(name: str) -> bool:
    """A key of a ComfyUI file that holds no weight: the fp8 marker and scales, the tokenizer."""
    leaf = name.rsplit(".", 1)[-1]
    return (
        leaf in (comfy_keys.FP8_MARKER_KEY, comfy_keys.TOKENIZER_KEY)
        or name.endswith(comfy_keys.FP8_WEIGHT_SCALE)
        or name.endswith(comfy_keys.FP8_INPUT_SCALE)
    )


def weight_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of `state`'s weights (ComfyUI's bookkeeping keys left out), without a common prefix."""
    names = [n for n in state if not is_bookkeeping(n)]
    prefix = strip_prefix(names, t5_keys.KNOWN_PREFIXES)
    return [n[len(prefix) :] for n in names]


def build_umt5(
    state: Mapping[str, torch.Tensor],
    config: dict | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "the checkpoint",
    scales: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A UMT5EncoderModel holding the tensors of `state` (official or transformers names).

    The model is built on the meta device and the tensors are assigned, converted one at a time, so
    the weights are never allocated twice. `config`: UMT5Config arguments; inferred from the shapes
    when None. Missing, unexpected or misshapen tensors raise one CheckpointError naming them.
    dtype: the storage dtype (fp8: the blocks' nn.Linear weights quantised, the rest in bf16); None:
    as stored. `scales`, when given, is filled with parameter name -> fp32 scale of each weight kept
    in fp8; without it, fp8 weights are upcast to bf16.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    names = [n for n in state if not is_bookkeeping(n)]
    prefix = strip_prefix(names, t5_keys.KNOWN_PREFIXES)
    local = {n[len(prefix) :]: n for n in names}  # name without prefix -> name in the file
    file_scales = {
        n[len(prefix) : -len(comfy_keys.FP8_WEIGHT_SCALE)] + ".weight": n
        for n in state
        if n.endswith(comfy_keys.FP8_WEIGHT_SCALE) and n.startswith(prefix)
    }
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
    matrices = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    fp8 = dtype is not None and dtype.itemsize == 1
    keep_file_fp8 = dtype is None and scales is not None  # a scaled fp8 file kept as it is
    loaded: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    tensors = {}
    for name in expected:
        src = local[mapping[name]]
        if src not in loaded:
            tensor = state[src]
            scale_key = file_scales.get(mapping[name])
            scale = state[scale_key].float().reshape(()) if scale_key is not None else None
            file_fp8 = tensor.element_size() == 1 and tensor.is_floating_point()
            kept_fp8 = name in matrices and (fp8 or (keep_file_fp8 and file_fp8))
            loaded[src] = _stored_form(name, tensor, scale, device, dtype, kept_fp8=kept_fp8)
            if not (fp8 and name in matrices) and loaded[src][0].dtype == torch.float16:
                # As transformers' from_pretrained does: fp16 models keep the FFN output projection in fp32.
                if keep_fp32 & set(name.split(".")):
                    loaded[src] = (loaded[src][0].float(), None)
        tensors[name] = loaded[src][0]
        if loaded[src][1] is not None and scales is not None:
            scales[name] = loaded[src][1]
    model.load_state_dict(tensors, strict=True, assign=True)
    # assign=True gave the two embedding names two Parameters over one tensor; tie them back into one.
    model.encoder.embed_tokens.weight = model.shared.weight
    return model.eval().requires_grad_(False)


def _stored_form(
    name: str,
    tensor: torch.Tensor,
    scale: torch.Tensor | None,
    device,
    dtype: torch.dtype | None,
    *,
    kept_fp8: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the tensor as the model keeps it, its fp8 scale or None).

    kept_fp8: a matrix that stays (or becomes) fp8: an fp8 one as stored with its scale, others
    quantised. Everything else: fp8 upcast (times its scale) to bf16 or `dtype`, others converted to
    `dtype` (None: as stored; under fp8 storage: bf16)."""
    stored_fp8 = tensor.element_size() == 1 and tensor.is_floating_point()
    if kept_fp8 and stored_fp8:
        return tensor.to(device), None if scale is None else scale.to(device)
    if stored_fp8:
        tensor = tensor.to(device).float() * (1.0 if scale is None else scale.to(device))
    if kept_fp8:
        return quantize_fp8(tensor.to(device))
    if dtype is not None and dtype.itemsize == 1:
        return tensor.to(device=device, dtype=torch.bfloat16), None  # fp8 storage's other tensors
    target = dtype or (tensor.dtype if tensor.is_floating_point() and not stored_fp8 else None)
    return tensor.to(device=device, dtype=target or torch.bfloat16), None


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


def _embedded_tokenizer(state: LazyStateDict) -> bytes | None:
    """The sentencepiece model a ComfyUI umT5 file carries (uint8 tensor `spiece_model`), or None."""
    key = next((n for n in state if n.rsplit(".", 1)[-1] == comfy_keys.TOKENIZER_KEY), None)
    return None if key is None else state[key].numpy().tobytes()


def tokenizer_from_sentencepiece(model: bytes):
    """A T5 tokenizer (no extra ids) over a sentencepiece model given as bytes."""
    import tempfile

    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "spiece.model").write_bytes(model)
        try:
            return T5Tokenizer.from_pretrained(folder, extra_ids=0, local_files_only=True)
        except Exception as err:  # transformers and sentencepiece raise many types here
            raise CheckpointError(
                f"The tokenizer inside the text encoder file is unreadable ({err})."
            ) from err


def _load_tokenizer(
    tokenizer: Any, candidates: list[Path], embedded: bytes | None = None
) -> tuple[Any, Path | None]:
    """The tokenizer object and the folder it came from (None for a given object or one from the file)."""
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
        if folder is None and embedded is not None:
            return tokenizer_from_sentencepiece(embedded), None
        if folder is None:
            looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
            raise CheckpointError(
                f"No tokenizer found for the text encoder (looked in {looked}); pass tokenizer= (or "
                "--tokenizer) the google/umt5-xxl tokenizer folder."
            )
    from transformers import AutoTokenizer, T5Tokenizer

    errors = []
    for cls in (AutoTokenizer, T5Tokenizer):
        try:
            return cls.from_pretrained(str(folder), local_files_only=True), folder
        except Exception as err:  # transformers raises many types here
            errors.append(f"{cls.__name__}: {err}")
    raise CheckpointError(f"Could not load the tokenizer in {folder} ({'; '.join(errors)}).")
