"""The umT5-XXL text encoder: transformers' UMT5EncoderModel and T5 tokenizer, with the prompt handling
of the reference pipelines (official Wan2.1 and diffusers' WanPipeline).

A prompt is cleaned (ftfy, HTML unescaped twice, whitespace collapsed), tokenized to max_length with
truncation, encoded with its attention mask, and every row past its token count is set to zero.
Encoded prompts are kept in a disk cache (text_cache.py), so repeated prompts skip the encoder.

Precision: umT5 overflows in fp16. `text_encoder_precision` is the policy the planner calls; an fp16
run is watched for inf/NaN and redone in fp32 (with a warning) if it overflows. See
docs/text_encoder.md.

The encoder exposes its parts (embedding, blocks, final_norm) so the runtime can place and stream them
without knowing transformers' module names. Loading: wanfit.weights.text_encoder_loader.
"""

from __future__ import annotations

import hashlib
import html
import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from wanfit.errors import CheckpointError, ConfigError
from wanfit.models.configs import WAN21_TEXT_ENCODER
from wanfit.models.text_cache import PromptCache
from wanfit.precision import dtype_name

TEXT_LEN = 512

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


def text_encoder_compute(compute_dtype: torch.dtype, device_type: str, storage: torch.dtype) -> torch.dtype:
    """What umT5 computes in over weights stored in `storage`, for a plan computing in `compute_dtype`:
    the policy's dtype when the weights are already in it, else fp32 (block by block; never fp16)."""
    policy = text_encoder_precision(compute_dtype, device_type).compute
    return policy if policy == storage else torch.float32


# -- the encoder ---------------------------------------------------------------------------------


class WanTextEncoder(nn.Module):
    """umT5 encoder + tokenizer: prompts -> context [B, max_length, dim], rows past each prompt zero.

    Weights are held in their storage dtype (that of the blocks' matrices); `compute_dtype` may be fp32
    over half-precision or fp8 weights, in which case each block is converted just for its own forward
    (one block's fp32 copy at a time). scales: parameter name -> the fp32 scale of a weight stored in
    fp8 (weight = stored * scale); an fp8 weight without one has scale 1.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        compute_dtype: torch.dtype | None = None,
        cache: PromptCache | None = None,
        fingerprint: str | None = None,
        scales: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.cache = cache
        self._fingerprint = fingerprint
        self._dim = int(model.config.d_model)
        # The parameters themselves are the keys: a streamer swaps their data, never the objects.
        params = dict(model.named_parameters())
        self._scales = {params[name]: scale for name, scale in (scales or {}).items() if name in params}
        matrix = next(
            (m.weight for m in model.get_encoder().block[0].modules() if isinstance(m, nn.Linear)), None
        )
        self.storage_dtype = (matrix if matrix is not None else model.get_input_embeddings().weight).dtype
        # fp8 weights never compute as they are: by default they are upcast block by block to fp32.
        default = self.storage_dtype if self.storage_dtype.itemsize > 1 else torch.float32
        self.compute_dtype = compute_dtype or default
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
        return self.embedding.weight.device

    @property
    def released(self) -> bool:
        return self.model is None

    @property
    def embedding(self) -> nn.Embedding:
        """The token embedding (a lookup: it may stay on the host while the blocks run elsewhere)."""
        return self._loaded().get_input_embeddings()

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, run in order on the embedded tokens."""
        return self._loaded().encoder.block

    @property
    def final_norm(self) -> nn.Module:
        """The norm after the last block; its output is the context."""
        return self._loaded().encoder.final_layer_norm

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

    def _loaded(self) -> nn.Module:
        if self.model is None:
            raise ConfigError(
                "The text encoder was released after encoding; a new prompt needs it loaded again."
            )
        return self.model

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The token embedding's rows for `ids`, in the compute dtype (fp8 rows read as bytes and upcast)."""
        weight = self.embedding.weight
        ids = ids.to(weight.device)
        if weight.element_size() == 1:
            rows = weight.view(torch.uint8)[ids].view(weight.dtype).to(torch.float32)
            scale = self._scales.get(weight)
            rows = rows * scale.to(rows.device) if scale is not None else rows
        else:
            rows = weight[ids]
        return rows.to(self.compute_dtype)

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
        model = self._loaded()
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
        if ids.max() >= model.config.vocab_size:
            raise CheckpointError(
                f"The tokenizer produced token id {int(ids.max())}, beyond the encoder's vocabulary of "
                f"{model.config.vocab_size}: tokenizer and weights belong to different models."
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
        embeds = self._embed(ids)
        with _modules_in([*self.blocks, self.final_norm], self.compute_dtype, self._scales):
            hidden = self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return hidden.to(self.compute_dtype)


@contextmanager
def _modules_in(
    modules: Sequence[nn.Module], dtype: torch.dtype, scales: dict | None = None
) -> Iterator[None]:
    """Run each of `modules` (the blocks and the final norm) with its weights converted to `dtype`
    for its own forward only: half-precision or fp8 weights (times their scale, when `scales` has
    one), fp32 arithmetic, one block's fp32 copy in memory."""
    originals: dict[nn.Parameter, torch.Tensor] = {}
    scales = scales or {}

    def convert(module, args):
        for p in module.parameters():
            originals[p] = p.data
            scale = scales.get(p)
            if scale is not None:
                p.data = (p.data.to(torch.float32) * scale.to(p.device)).to(dtype)
            else:
                p.data = p.data.to(dtype)

    def restore(module, args, output):
        for p in module.parameters():
            p.data = originals.pop(p)

    handles = []
    for module in modules:
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
