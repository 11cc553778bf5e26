"""The umT5-XXL text encoder: transformers' UMT5EncoderModel and T5 tokenizer, with the prompt handling
of the reference pipelines (official Wan2.1 and diffusers' WanPipeline).

A prompt is cleaned (ftfy, HTML unescaped twice, whitespace collapsed), tokenized to max_length with
truncation, encoded with its attention mask, and every row past its token count is set to zero.
Encoded prompts are kept in a disk cache (text_cache.py), so repeated prompts skip the encoder.

Precision: umT5 overflows in fp16. `text_encoder_precision` is the policy the planner calls; an fp16
run is watched for inf/NaN and redone in fp32 (with a warning) if it overflows. See
docs/text_encoder.md.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from wanfit.errors import CheckpointError, ConfigError
from wanfit.models.configs import WAN21_TEXT_ENCODER
from wanfit.models.text_cache import PromptCache, cache_enabled_by_env, files_fingerprint
from wanfit.precision import dtype_name
from wanfit.weights import t5_keys
from wanfit.weights.io import (
    LazyStateDict,
    find_weight_files,
    read_json,
    resolve_weight_files,
    short_list,
    strip_prefix,
)

TEXT_LEN = 512
OFFICIAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_TOKENIZER = Path("google") / "umt5-xxl"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")

# The encoder Wan2.1 ships (transformers' UMT5Config arguments).
UMT5_XXL = WAN21_TEXT_ENCODER.umt5_kwargs()

_HALF = (torch.float16, torch.bfloat16)


# -- prompt cleaning -----------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """The reference pipelines' cleaning: ftfy's fix_text, HTML unescaped twice, whitespace collapsed."""
    import ftfy
    import regex  # not `re`: its \\s differs on \\x1c-\\x1f, and the references use `regex`

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


# -- precision policy ----------------------------------------------------------------------------


class TextEncoderPrecision(NamedTuple):
    storage: torch.dtype  # dtype the weights are held in
    compute: torch.dtype  # dtype the encoder runs in


def text_encoder_precision(compute_dtype: torch.dtype, device_type: str) -> TextEncoderPrecision:
    """How to run umT5 for a plan whose DiT computes in `compute_dtype`, on a `device_type` device.

    - Accelerator running bf16 natively (the plan's compute dtype is bf16): bf16 weights, bf16 compute,
      as the model was trained and shipped.
    - fp16-only card (compute fp16, sm_70/75) or fp32 plans: bf16 weights (half the memory, the
      shipped values exactly) computed in fp32 one block at a time; plain fp16 overflows.
    - CPU: bf16 weights, fp32 compute (fast fp32 kernels everywhere; 11.4 GB of RAM instead of 22.7).
    """
    if device_type != "cpu" and compute_dtype == torch.bfloat16:
        return TextEncoderPrecision(torch.bfloat16, torch.bfloat16)
    return TextEncoderPrecision(torch.bfloat16, torch.float32)


# -- the encoder ---------------------------------------------------------------------------------


class WanTextEncoder(nn.Module):
    """umT5 encoder + tokenizer: prompts -> context [B, max_length, dim], rows past each prompt zero.

    Weights are held in their storage dtype; `compute_dtype` may be fp32 over half-precision weights,
    in which case each block is converted just for its own forward (one block's fp32 copy at a time).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        compute_dtype: torch.dtype | None = None,
        cache: PromptCache | None = None,
        fingerprint: str | None = None,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.cache = cache
        self._fingerprint = fingerprint
        self._dim = int(model.config.d_model)
        self.storage_dtype = model.get_input_embeddings().weight.dtype
        self.compute_dtype = compute_dtype or self.storage_dtype
        if self.compute_dtype != self.storage_dtype and self.compute_dtype != torch.float32:
            raise ConfigError(
                f"The text encoder cannot compute in {dtype_name(self.compute_dtype)} over weights stored in "
                f"{dtype_name(self.storage_dtype)}; load it with dtype={dtype_name(self.compute_dtype)} instead."
            )
        self._released_device: torch.device | None = None

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def device(self) -> torch.device:
        if self._released_device is not None:
            return self._released_device
        return self.model.get_input_embeddings().weight.device

    def release(self) -> None:
        """Drop the weights to free memory; prompts already in the cache still encode."""
        if self._released_device is None:
            if self._fingerprint is None:  # computed from the weights, so now or never
                self._fingerprint = _in_memory_fingerprint(self.model, self.tokenizer)
            self._released_device = self.device
            self.model = None

    def fingerprint(self) -> str:
        """Identifies the weights, tokenizer and storage dtype for the prompt cache."""
        if self._fingerprint is None:
            self._fingerprint = _in_memory_fingerprint(self.model, self.tokenizer)
        return hashlib.sha256(f"{self._fingerprint}/{dtype_name(self.storage_dtype)}".encode()).hexdigest()

    @torch.no_grad()
    def encode(
        self, prompts: str | Sequence[str], max_length: int = TEXT_LEN, *, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Context [B, max_length, dim] in `dtype` (default: the compute dtype), on the encoder's device."""
        if max_length < 1:
            raise ConfigError(f"The text length must be at least 1 token, not {max_length}.")
        texts = [clean_prompt(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        rows: dict[str, torch.Tensor] = {}
        keys = {}
        if self.cache is not None:
            for text in dict.fromkeys(texts):
                keys[text] = self.cache.key(self.fingerprint(), text, max_length, self._precision_name())
                hit = self.cache.load(keys[text])
                if hit is not None and hit.shape[-1] == self.dim and hit.shape[0] <= max_length:
                    rows[text] = hit
        todo = [t for t in dict.fromkeys(texts) if t not in rows]
        if todo:
            for text, r in zip(todo, self._encode_texts(todo, max_length)):
                rows[text] = r
                if self.cache is not None:
                    self._store(keys.get(text), text, max_length, r)
        out = torch.zeros(
            len(texts), max_length, self.dim, dtype=dtype or self.compute_dtype, device=self.device
        )
        for i, text in enumerate(texts):
            r = rows[text]
            out[i, : r.shape[0]] = r.to(device=out.device, dtype=out.dtype)
        return out

    # -- internals --

    def token_count(self, prompt: str) -> int:
        """Tokens of a prompt as the encoder would see it untruncated (the end-of-text token included)."""
        return len(
            self.tokenizer(clean_prompt(prompt), add_special_tokens=True, truncation=False)["input_ids"]
        )

    def _precision_name(self) -> str:
        return f"compute={dtype_name(self.compute_dtype)}"

    def _store(self, key: str | None, text: str, max_length: int, rows: torch.Tensor) -> None:
        key = key or self.cache.key(self.fingerprint(), text, max_length, self._precision_name())
        try:
            self.cache.store(key, rows, prompt=text)
        except OSError as err:  # a read-only or full disk must not stop a generation
            warnings.warn(f"Could not write the prompt cache in {self.cache.directory}: {err}", stacklevel=3)

    def _encode_texts(self, texts: list[str], max_length: int) -> list[torch.Tensor]:
        """Each text's rows [seq_len, dim] in the compute dtype (the part before the zero padding)."""
        if self.model is None:
            raise ConfigError(
                "The text encoder was released after encoding; a new prompt needs it loaded again."
            )
        batch = self.tokenizer(
            texts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        if ids.max() >= self.model.config.vocab_size:
            raise CheckpointError(
                f"The tokenizer produced token id {int(ids.max())}, beyond the encoder's vocabulary of "
                f"{self.model.config.vocab_size}: tokenizer and weights belong to different models."
            )
        hidden = self._forward(ids, mask)
        if not bool(torch.isfinite(hidden).all()):
            raise CheckpointError(
                f"The text encoder produced inf/NaN in {dtype_name(self.compute_dtype)}; its weights look corrupt."
            )
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths)]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype == self.storage_dtype and self.compute_dtype != torch.float16:
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.compute_dtype == torch.float16:
            with _watch_nonfinite(self.model) as overflowed:
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            if not overflowed():
                return hidden
            warnings.warn(
                "The text encoder overflowed in float16 (inf/NaN inside umT5); encoding again in "
                "float32, and using float32 from now on. Plan float32 compute for umT5 on this card.",
                stacklevel=4,
            )
            self.compute_dtype = torch.float32
        embeds = self.model.get_input_embeddings()(ids).to(self.compute_dtype)
        with _blocks_in(self.model, self.compute_dtype):
            hidden = self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return hidden.to(self.compute_dtype)


@contextmanager
def _blocks_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run each encoder block and the final norm with its weights converted to `dtype` for its own
    forward only: half-precision weights, fp32 arithmetic, one block's fp32 copy in memory."""
    stack = model.encoder
    originals: dict[nn.Parameter, torch.Tensor] = {}

    def convert(module, args):
        for p in module.parameters():
            originals[p] = p.data
            p.data = p.data.to(dtype)

    def restore(module, args, output):
        for p in module.parameters():
            p.data = originals.pop(p)

    handles = []
    for module in [*stack.block, stack.final_layer_norm]:
        handles.append(module.register_forward_pre_hook(convert))
        # Prepended: restore before any later hook (a block streamer) moves or frees the weights.
        handles.append(module.register_forward_hook(restore, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p, data in originals.items():  # after an exception mid-block
            p.data = data


@contextmanager
def _watch_nonfinite(model: nn.Module) -> Iterator:
    """Flags any inf/NaN in any submodule's output during a forward, before the fp16 clamps in
    transformers' blocks can hide an overflow. One device sync, when asked."""
    flags: list[torch.Tensor] = []

    def check(module, args, output):
        t = output[0] if isinstance(output, tuple) else output
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            flags.append(~torch.isfinite(t).all())

    handles = [m.register_forward_hook(check) for m in model.modules() if m is not model]
    try:
        yield lambda: bool(torch.stack(flags).any()) if flags else False
    finally:
        for h in handles:
            h.remove()


def _in_memory_fingerprint(model: nn.Module, tokenizer: Any) -> str:
    """For encoders built in memory: the config, the tokenizer's vocabulary and a sample of every tensor."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Padding and truncation settings change with each call; they do not change the ids.
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:
        spec = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps(spec, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:16], flat[-16:]]).float().cpu()
        digest.update(name.encode() + str(tuple(tensor.shape)).encode() + sample.numpy().tobytes())
    return digest.hexdigest()


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
    weight_files, config_file, tokenizer_dirs = _locate(Path(path))
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
        cache = PromptCache(None if prompt_cache is True else prompt_cache)
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
        tokenizers = [folder / OFFICIAL_TOKENIZER, folder.parent / "tokenizer", folder / "tokenizer", folder]
        return files, config, tokenizers
    if (path / "text_encoder").is_dir():  # diffusers model root
        return _locate(path / "text_encoder")
    if (path / OFFICIAL_FILE).is_file():  # official release root
        return [path / OFFICIAL_FILE], None, [path / OFFICIAL_TOKENIZER]
    if (path / "config.json").is_file() or any(path.glob("*.safetensors")):  # a text_encoder/ folder
        files = find_weight_files(path, stems=("model",))
        config = path / "config.json"
        return files, config if config.is_file() else None, [path.parent / "tokenizer", path]
    raise CheckpointError(
        f"{path} holds no umT5 text encoder: expected a diffusers text_encoder/ folder (config.json + "
        f"safetensors), a model root with text_encoder/, or {OFFICIAL_FILE}."
    )


def _is_tokenizer_dir(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def _load_tokenizer(tokenizer: Any, candidates: list[Path]) -> tuple[Any, Path | None]:
    """The tokenizer object and the folder it came from (None for a given object)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer, None
    if tokenizer is not None:
        folder = Path(tokenizer)
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
