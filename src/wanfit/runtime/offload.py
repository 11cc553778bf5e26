"""Block streaming: run an nn.ModuleList whose weights mostly live in host memory.

`BlockStreamer(blocks, device, resident=k)` keeps k blocks (evenly spaced) on the device; every other
block lives in pinned host memory and is copied to the device just before it runs, the copy of the
next streamed block issued on a side CUDA stream while the current one computes, and the device
copy dropped after use. It works through forward hooks on each block, so the model that loops
`for block in self.blocks: x = block(x, ...)` stays device-agnostic and unchanged.

Optional fp8 storage: 2-D weights are kept as float8_e4m3fn with one fp32 scale per tensor (host
and device copies are half of bf16) and upcast to their original dtype right before the block runs.

Memory on the device: k resident blocks + the block in use + the next one being copied (+ the
upcast copy of the block in use with fp8). The host thread waits for the block before last to
finish on the GPU before it allocates the next copy, so the GPU never holds more than that.

On a CPU "device" (tests) the same bookkeeping runs with plain copies, so the order of fetches and
releases and the results can be checked anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from wanfit.runtime.chunking import apply_chunking

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def resident_indices(n: int, k: int) -> list[int]:
    """k of n block indices, evenly spread, so every streamed copy overlaps resident compute too."""
    k = max(0, min(n, k))
    return sorted({int((i + 0.5) * n / k) for i in range(k)}) if k else []


def _quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 with a per-tensor scale: t ~= q.float() * scale."""
    scale = t.detach().abs().amax().float().clamp_min(1e-12) / FP8_MAX
    return (t.detach().float() / scale).to(FP8), scale


class _Slot:
    """One tensor of a block: where it lives in the module, its original dtype, its stored copy."""

    __slots__ = ("module", "name", "is_param", "dtype", "stored", "scale")

    def __init__(self, module: nn.Module, name: str, is_param: bool, dtype: torch.dtype):
        self.module, self.name, self.is_param, self.dtype = module, name, is_param, dtype
        self.stored: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor


def _slots(block: nn.Module) -> list[_Slot]:
    seen, out = set(), []
    for module in block.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(_Slot(module, name, True, p.dtype))
        for name, b in module._buffers.items():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                out.append(_Slot(module, name, False, b.dtype))
    return out


class BlockStreamer:
    """Streams the blocks of `blocks` through `device`, `resident` of them kept there.

    fp8=True stores 2-D floating-point weights as scaled float8_e4m3fn (resident ones too).
    move_inputs=True moves a block's tensor arguments to the device first (for a model whose
    embedding stays on the host). `events` records ("fetch"|"use"|"release", index) when
    record=True; `max_streamed_on_device` is the most streamed-block copies the streamer held at once
    (in use or prefetched; on CUDA the block released last may still be computing besides).
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        device: str | torch.device,
        *,
        resident: int,
        fp8: bool = False,
        pin_memory: bool | None = None,
        move_inputs: bool = False,
        record: bool = False,
    ):
        self.blocks = blocks
        self.device = torch.device(device)
        n = len(blocks)
        self.resident = resident_indices(n, resident)
        self.streamed = [i for i in range(n) if i not in set(self.resident)]
        self.fp8 = fp8 and FP8 is not None
        self.move_inputs = move_inputs
        self.cuda = self.device.type == "cuda"
        self.pin = self.cuda if pin_memory is None else pin_memory
        self.record = record
        self.events: list[tuple[str, int]] = []
        self.max_streamed_on_device = 0
        self._slots = [_slots(b) for b in blocks]
        self._next = {s: self.streamed[(j + 1) % len(self.streamed)] for j, s in enumerate(self.streamed)}
        self._pending: dict[int, tuple[list[torch.Tensor], object]] = {}  # prefetched copies
        self._in_use: dict[int, list[torch.Tensor]] = {}
        self._last_done = None  # CUDA event: the last streamed block finished on the GPU
        self._side = torch.cuda.Stream(self.device) if self.cuda else None
        self._hooks = []
        self._place()
        for i, block in enumerate(blocks):
            if self.move_inputs or self.fp8 or i in self._next:
                self._hooks.append(block.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
                self._hooks.append(block.register_forward_hook(self._post_hook(i)))

    # -- placement

    def _store(self, slot: _Slot, tensor: torch.Tensor, device: torch.device) -> None:
        t = tensor.detach()
        if self.fp8 and t.is_floating_point() and t.ndim == 2:
            t, scale = _quantize(t.to(device))
            slot.scale = scale.to(self.device)  # on the device: a host scalar would sync each upcast
        t = t.to(device)
        if device.type == "cpu" and self.pin and not t.is_pinned():
            t = t.pin_memory()
        slot.stored = t

    def _place(self) -> None:
        host = torch.device("cpu")
        for i, slots in enumerate(self._slots):
            streamed = i in self._next
            where = host if streamed else self.device
            for slot in slots:
                current = (
                    slot.module._parameters[slot.name] if slot.is_param else slot.module._buffers[slot.name]
                )
                self._store(slot, current, where)
                if not streamed and slot.scale is None:
                    slot.set(slot.stored)  # resident and not quantized: the stored copy is the weight
                else:
                    # A placeholder that holds no device memory; the pre-hook swaps real weights in.
                    slot.set(torch.empty(0, dtype=slot.dtype, device=where))

    def _copy_in(self, i: int) -> list[torch.Tensor]:
        """Device copies of streamed block i's stored tensors (on the side stream on CUDA)."""
        if not self.cuda:
            return [s.stored.to(self.device, copy=True) for s in self._slots[i]]
        with torch.cuda.stream(self._side):
            return [s.stored.to(self.device, non_blocking=True) for s in self._slots[i]]

    def _fetch(self, i: int) -> None:
        if i in self._pending:
            return
        copies = self._copy_in(i)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self._side)
        self._pending[i] = (copies, event)
        self._log("fetch", i)
        self.max_streamed_on_device = max(self.max_streamed_on_device, len(self._pending) + len(self._in_use))

    # -- hooks

    def _pre_hook(self, i: int):
        def hook(module, args, kwargs):
            for stale in list(self._in_use):  # left by a call that raised (e.g. out of memory)
                self._release(stale)
            if i in self._next:
                if i not in self._pending:
                    self._fetch(i)  # the first call, or after a failed one
                copies, event = self._pending.pop(i)
                if self.cuda:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(event)
                    for t in copies:
                        t.record_stream(stream)  # keep the memory until this stream is done with it
                self._in_use[i] = copies
                for slot, t in zip(self._slots[i], copies):
                    slot.set(self._upcast(slot, t) if slot.scale is not None else t)
                self._log("use", i)
            elif self.fp8:
                for slot in self._slots[i]:
                    if slot.scale is not None:
                        slot.set(self._upcast(slot, slot.stored))
            if self.move_inputs:
                return self._to_device(args), self._to_device(kwargs)
            return None

        return hook

    @staticmethod
    def _upcast(slot: _Slot, t: torch.Tensor) -> torch.Tensor:
        return (t.to(torch.float32) * slot.scale.to(t.device)).to(slot.dtype)

    def _release(self, i: int) -> None:
        for slot in self._slots[i]:
            slot.set(torch.empty(0, dtype=slot.dtype, device="cpu"))
        del self._in_use[i]
        self._log("release", i)

    def _post_hook(self, i: int):
        def hook(module, args, output):
            if i in self._next:
                self._release(i)
                if self.cuda:
                    done = torch.cuda.Event()
                    done.record(torch.cuda.current_stream(self.device))
                    if self._last_done is not None:
                        # Do not run ahead: the streamed block before this one must be finished (its
                        # memory free) before the next copy is allocated; this one keeps the GPU busy.
                        self._last_done.synchronize()
                    self._last_done = done
                self._fetch(self._next[i])
            elif self.fp8:
                for slot in self._slots[i]:
                    if slot.scale is not None:
                        slot.set(torch.empty(0, dtype=slot.dtype, device=self.device))
            return None

        return hook

    def _to_device(self, value):
        if isinstance(value, torch.Tensor):
            return value.to(self.device, non_blocking=True) if value.device != self.device else value
        if isinstance(value, tuple):
            return tuple(self._to_device(v) for v in value)
        if isinstance(value, list):
            return [self._to_device(v) for v in value]
        if isinstance(value, dict):
            return {k: self._to_device(v) for k, v in value.items()}
        return value

    def _log(self, what: str, i: int) -> None:
        if self.record:
            self.events.append((what, i))

    # -- the stored copies (LoRA merges write here: a parameter of a streamed block is a placeholder)

    def find_slot(self, module: nn.Module, name: str) -> tuple[int, _Slot] | None:
        """(block index, slot) of `module`'s tensor `name` if this streamer holds it, else None."""
        for i, slots in enumerate(self._slots):
            for slot in slots:
                if slot.module is module and slot.name == name:
                    return i, slot
        return None

    def replace_stored(self, i: int, slot: _Slot, tensor: torch.Tensor) -> None:
        """Store a new value for a slot of block i as placement does (fp8 re-quantised, host copies pinned);
        prefetched device copies are dropped so that the next call uses it."""
        streamed = i in self._next
        self._store(slot, tensor, torch.device("cpu") if streamed else self.device)
        if not streamed and slot.scale is None:
            slot.set(slot.stored)
        self.reset()

    # -- teardown

    def reset(self) -> None:
        """Drop device copies held for a call that raised, and the prefetched copy for the next call."""
        for i in list(self._in_use):
            self._release(i)
        self._pending.clear()

    def detach(self, device: str | torch.device | None = None) -> None:
        """Remove the hooks and put every block, in its original dtype, on `device` (default: the device)."""
        device = torch.device(device) if device is not None else self.device
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._pending.clear()
        self._in_use.clear()
        for slots in self._slots:
            for slot in slots:
                t = slot.stored.to(device)
                if slot.scale is not None:
                    t = (t.to(torch.float32) * slot.scale.to(device)).to(slot.dtype)
                slot.set(t)
                slot.stored = slot.scale = None


# ----------------------------------------------------------------------------- the DiT under a plan


def _non_block_modules(model: nn.Module, blocks: nn.Module) -> Iterable[nn.Module]:
    return (child for child in model.children() if child is not blocks)


def _move_own_tensors(model: nn.Module, device: torch.device) -> None:
    for p in model._parameters.values():
        if p is not None:
            p.data = p.data.to(device)
    for name, b in model._buffers.items():
        if b is not None:
            model._buffers[name] = b.to(device)


def configure_dit(dit: nn.Module, plan, *, pin_memory: bool | None = None) -> BlockStreamer | None:
    """Place `dit` (a model with an nn.ModuleList `blocks`) as the plan says and set its chunking.

    Whole model on plan.device when plan.dit_blocks_resident is None and storage is not fp8; else the
    non-block modules go to the device and the blocks are streamed (k resident; all resident with
    fp8 storage alone). Idempotent: a second call with the same placement only resets chunking.
    Dtypes are left as loaded. Returns the BlockStreamer, if any (also at dit._wanfit_streamer).
    """
    device = torch.device(plan.device)
    fp8 = plan.storage_dtype is not None and plan.storage_dtype.startswith("float8")
    key = (str(device), plan.dit_blocks_resident, fp8)
    streamer = getattr(dit, "_wanfit_streamer", None)
    if getattr(dit, "_wanfit_placement", None) != key:
        if streamer is not None:
            streamer.detach("cpu")
            streamer = None
        for child in _non_block_modules(dit, dit.blocks):
            child.to(device)
        _move_own_tensors(dit, device)
        if plan.dit_blocks_resident is None and not fp8:
            dit.blocks.to(device)
        else:
            n = len(dit.blocks)
            k = n if plan.dit_blocks_resident is None else plan.dit_blocks_resident
            streamer = BlockStreamer(dit.blocks, device, resident=k, fp8=fp8, pin_memory=pin_memory)
        dit._wanfit_streamer = streamer
        dit._wanfit_placement = key
    elif streamer is not None:
        streamer.reset()
    apply_chunking(dit.blocks, attention_chunk=plan.attention_chunk, ffn_chunk=plan.ffn_chunk)
    return streamer


def release_dit(dit: nn.Module) -> None:
    """Move the whole DiT to host memory (before the VAE decode); configure_dit places it again."""
    streamer = getattr(dit, "_wanfit_streamer", None)
    if streamer is not None:
        streamer.detach("cpu")
    dit._wanfit_streamer = None
    dit._wanfit_placement = None
    dit.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stream_text_encoder(text_encoder, device: str | torch.device, resident: int) -> BlockStreamer:
    """Stream umT5's blocks through `device` (k resident); the embedding stays on the host.

    The token embedding (1 GB in bf16) is a lookup: it runs on the host and only the hidden states
    move; the final norm sits on the device, so the encoder's output comes back from there.
    """
    encoder = text_encoder.model.encoder
    streamer = BlockStreamer(encoder.block, device, resident=resident, move_inputs=True)
    encoder.final_layer_norm.to(device)
    text_encoder._wanfit_streamer = streamer
    return streamer
