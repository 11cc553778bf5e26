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
releases and the results can be checked anywhere. Which model streams, and how many blocks stay
resident, is the Plan's; runtime/placement.py builds and holds the streamers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Pinned staging buffers of a stream from the mapped file: one being filled while the other is copied.
STAGING_BUFFERS = 2


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

    def get(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.get().data = tensor
        else:
            setattr(self.module, self.name, tensor)  # a registered buffer stays one


def _slots(block: nn.Module) -> list[_Slot]:
    seen, out = set(), []
    for module in block.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(_Slot(module, name, True, p.dtype))
        for name, b in module.named_buffers(recurse=False):
            if id(b) not in seen:
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
                self._store(slot, slot.get(), where)
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
