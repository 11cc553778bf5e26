"""Block streaming: run an nn.ModuleList whose weights mostly live in host memory.

`BlockStreamer(blocks, device, resident=k)` keeps k blocks (evenly spaced) on the device; every other
block is copied to the device just before it runs, the copy of the next streamed block issued on a
side CUDA stream while the current one computes, and the device copy dropped after use. It works
through forward hooks on each block, so the model that loops `for block in self.blocks: x = block(x)`
stays device-agnostic and unchanged.

Where the streamed blocks come from (`source`):
    "pinned"  a page-locked host copy of each streamed block, packed in one buffer of exactly its size
              (wanfit.runtime.pinned): one copy to the device per block, the fastest.
    "mmap"    the tensors the blocks were loaded with, as they are (a memory-mapped checkpoint: nothing
              is copied on the host). A worker thread reads the next block's bytes into one of
              STAGING_BUFFERS page-locked staging buffers while the current block computes; the
              buffer is copied to the device and converted there. Host RAM: the staging ring, and
              the file pages being read.
`dtype`: the dtype the weights compute in (floating tensors are converted on the device when they
travel in another one: a bf16 file under an fp16 plan). fp8=True stores 2-D weights as float8_e4m3fn
with one fp32 scale per tensor and upcasts them right before their block runs; weights loaded in that
form already (an fp8 file's, `scales` giving theirs) are kept as they are, bytes and scale.

Memory on the device: k resident blocks + the block in use + the next one being copied (+ the upcast
copy of the block in use with fp8, or the raw copy of a block converted from the file's dtype). The
host thread waits for the block before last to finish on the GPU before it allocates the next copy,
so the GPU never holds more than that. `prefetch_first=False` (a text encoder run once per prompt)
fetches nothing past the last block of a call.

On a CPU "device" (tests) the same bookkeeping runs with plain copies, so the order of fetches and
releases and the results can be checked anywhere. Which model streams, from where and how many
blocks stay resident, is the Plan's; runtime/placement.py builds and holds the streamers.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn as nn

from wanfit.precision import FP8_STORAGE_DTYPE, quantize_fp8
from wanfit.runtime.pinned import host_buffer

FP8 = FP8_STORAGE_DTYPE
# Pinned staging buffers of a stream from the mapped file: one being filled while the other is copied.
STAGING_BUFFERS = 2
SOURCES = ("pinned", "mmap")
_ALIGN = 64  # bytes between tensors packed in one buffer (any dtype's element size divides it)


def resident_indices(n: int, k: int) -> list[int]:
    """k of n block indices, evenly spread, so every streamed copy overlaps resident compute too."""
    k = max(0, min(n, k))
    return sorted({int((i + 0.5) * n / k) for i in range(k)}) if k else []


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (no copy)."""
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


class _Slot:
    """One tensor of a block: where it lives in the module, the dtype it computes in, its stored form.

    stored: a pinned host view (a streamed block's packed copy), a device tensor (resident), or the
    source tensor itself (streamed from the mapped file); scale: fp8's. offset: where its bytes sit
    in the block's packed buffer."""

    __slots__ = ("module", "name", "is_param", "dtype", "stored", "scale", "source", "offset")

    def __init__(self, module: nn.Module, name: str, is_param: bool, dtype: torch.dtype):
        self.module, self.name, self.is_param, self.dtype = module, name, is_param, dtype
        self.stored: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.source: torch.Tensor | None = None  # the loaded tensor, kept when it costs nothing (mmap)
        self.offset = 0

    def get(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.get().data = tensor
        else:
            setattr(self.module, self.name, tensor)  # a registered buffer stays one


def _slots(block: nn.Module, dtype: torch.dtype | None) -> list[_Slot]:
    seen, out = set(), []
    for module in block.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(t) not in seen:
                seen.add(id(t))
                target = dtype if dtype is not None and t.is_floating_point() else t.dtype
                out.append(_Slot(module, name, isinstance(t, nn.Parameter), target))
    return out


def _pack(slots: list[_Slot], tensors: list[torch.Tensor]) -> int:
    """Set each slot's offset for `tensors` packed in one buffer; returns the buffer's size."""
    size = 0
    for slot, t in zip(slots, tensors):
        slot.offset = size
        size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return size


def _view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """The bytes of `buffer` at `offset` seen as a tensor of like's dtype and shape."""
    n = like.numel() * like.element_size()
    return buffer[offset : offset + n].view(like.dtype).view(like.shape)


class BlockStreamer:
    """Streams the blocks of `blocks` through `device`, `resident` of them kept there.

    source: "pinned" or "mmap" (the module docstring). dtype: the compute dtype of floating weights
    (None: as they are). fp8=True stores 2-D floating-point weights as scaled float8_e4m3fn
    (resident ones too; streamed ones as pinned copies, whatever the source); `scales` maps weights
    already in float8_e4m3fn (an fp8 file's, as loaded) to their fp32 scale: those are stored as they
    are, not quantised again, and detach() on the host gives them back. move_inputs=True moves
    a block's tensor arguments to the device first (for a model whose embedding stays on the host).
    `events` records ("fetch"|"use"|"release", index) when record=True; `max_streamed_on_device`
    is the most streamed-block copies the streamer held at once (in use or prefetched; on CUDA the
    block released last may still be computing besides).
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        device: str | torch.device,
        *,
        resident: int,
        fp8: bool = False,
        scales: dict[torch.Tensor, torch.Tensor] | None = None,
        source: str = "pinned",
        dtype: torch.dtype | None = None,
        pin_memory: bool | None = None,
        move_inputs: bool = False,
        prefetch_first: bool = True,
        record: bool = False,
    ):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
        self.blocks = blocks
        self.device = torch.device(device)
        n = len(blocks)
        self.resident = resident_indices(n, resident)
        self.streamed = [i for i in range(n) if i not in set(self.resident)]
        self.fp8 = fp8 and FP8 is not None
        self._file_scales = scales or {}  # a weight (the Parameter as loaded) -> its file's fp8 scale
        self.source = "pinned" if self.fp8 else source  # fp8 copies are made here, not read from a file
        self.dtype = dtype
        self.move_inputs = move_inputs
        self.cuda = self.device.type == "cuda"
        self.pin = self.cuda if pin_memory is None else pin_memory
        self.record = record
        self.events: list[tuple[str, int]] = []
        self.max_streamed_on_device = 0
        self._slots = [_slots(b, dtype) for b in blocks]
        order = self.streamed
        self._next = {s: order[(j + 1) % len(order)] for j, s in enumerate(order)}
        if not prefetch_first and order:
            self._next[order[-1]] = None
        self._position = {s: j for j, s in enumerate(order)}
        self._buffers: dict[int, torch.Tensor] = {}  # streamed block -> its packed pinned copy
        self._sizes: dict[int, int] = {}  # streamed block -> bytes as it travels
        self._pending: dict[int, tuple[list[torch.Tensor], object]] = {}  # prefetched copies
        self._in_use: dict[int, list[torch.Tensor]] = {}
        self._last_done = None  # CUDA event: the last streamed block finished on the GPU
        self._side = torch.cuda.Stream(self.device) if self.cuda else None
        self._staging: list[torch.Tensor] = []
        self._staging_free: list[object] = []  # per staging buffer: its last copy to the device done
        self._reads: dict[int, Future] = {}
        self._reader: ThreadPoolExecutor | None = None
        self._hooks = []
        self._place()
        for i, block in enumerate(blocks):
            if self.move_inputs or self.fp8 or i in self._next:
                self._hooks.append(block.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
                self._hooks.append(block.register_forward_hook(self._post_hook(i)))

    # -- placement

    def _stored_form(self, slot: _Slot, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`tensor` as this streamer keeps it on `device`: in its compute dtype, or quantised to fp8
        (setting the slot's scale). Converted on the smaller side of the move."""
        t = tensor.detach()
        if self.fp8 and t.is_floating_point() and t.ndim == 2:
            file_scale = self._file_scales.get(slot.get()) if t.dtype == FP8 else None
            if file_scale is not None:  # an fp8 file's bytes and scale, as they are
                q, scale = t.to(device), file_scale
            else:
                q, scale = quantize_fp8(t.to(device))
            slot.scale = scale.to(self.device)  # on the device: a host scalar would sync each upcast
            return q
        if t.dtype != slot.dtype and t.element_size() > slot.dtype.itemsize:
            return t.to(slot.dtype).to(device)
        return t.to(device).to(slot.dtype)

    def _kept_from_file(self, slot: _Slot) -> bool:
        """An fp8 file's weight stored as loaded: its host tensor is the mapped file, free to keep."""
        t = slot.get()
        return self.fp8 and t.dtype == FP8 and t.device.type == "cpu" and t in self._file_scales

    def _place(self) -> None:
        host = torch.device("cpu")
        for i, slots in enumerate(self._slots):
            if i not in self._next:
                for slot in slots:
                    kept = self._kept_from_file(slot)
                    slot.stored = self._stored_form(slot, slot.get(), self.device)
                    if self.source == "mmap" or kept:
                        slot.source = slot.get().detach()  # free to keep: it is the mapped file
                    slot.set(slot.stored if slot.scale is None else self._placeholder(slot, self.device))
            elif self.source == "mmap":
                for slot in slots:
                    slot.stored = slot.source = slot.get().detach()
                    slot.set(self._placeholder(slot, host))
                self._sizes[i] = _pack(slots, [s.stored for s in slots])
            else:
                kept = [self._kept_from_file(s) for s in slots]
                self._pin_block(i, [self._stored_form(s, s.get(), host) for s in slots])
                for slot, from_file in zip(slots, kept):
                    if from_file:
                        slot.source = slot.get().detach()
                    slot.set(self._placeholder(slot, host))
        if self.source == "mmap" and self.streamed:
            size = max(self._sizes.values())
            count = min(STAGING_BUFFERS, len(self.streamed))
            self._staging = [host_buffer(size, pin=self.pin) for _ in range(count)]
            self._staging_free = [None] * len(self._staging)
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="wanfit-stream")

    def _pin_block(self, i: int, tensors: list[torch.Tensor]) -> None:
        """Pack streamed block i's stored tensors into one pinned buffer; the slots view it."""
        slots = self._slots[i]
        size = _pack(slots, tensors)
        buffer = host_buffer(size, pin=self.pin)
        for slot, t in zip(slots, tensors):
            view = _view(buffer, slot.offset, t)
            view.copy_(t)
            slot.stored = view
        self._buffers[i], self._sizes[i] = buffer, size

    @staticmethod
    def _placeholder(slot: _Slot, device: torch.device) -> torch.Tensor:
        """A tensor that holds no memory; the pre-hook swaps real weights in."""
        return torch.empty(0, dtype=slot.dtype, device=device)

    # -- copies to the device

    def _read(self, i: int, ring: int, free) -> None:
        """The worker thread's job: block i's bytes from its source into staging buffer `ring`."""
        if free is not None:
            free.synchronize()  # the buffer's previous copy to the device must be done
        staging = self._staging[ring]
        for slot in self._slots[i]:
            n = slot.stored.numel() * slot.stored.element_size()
            staging[slot.offset : slot.offset + n].copy_(_raw_bytes(slot.stored.contiguous()))

    def _start_read(self, i: int | None) -> None:
        if i is None or i in self._reads or i in self._pending or self._reader is None:
            return
        ring = self._position[i] % len(self._staging)
        self._reads[i] = self._reader.submit(self._read, i, ring, self._staging_free[ring])

    def _host_copy(self, i: int) -> torch.Tensor:
        """Streamed block i's bytes on the host, ready to copy: its pinned buffer, or a staging buffer."""
        if self.source == "pinned":
            return self._buffers[i]
        self._start_read(i)
        self._reads.pop(i).result()
        return self._staging[self._position[i] % len(self._staging)]

    def _to_device(self, i: int, flat: torch.Tensor) -> list[torch.Tensor]:
        """Block i's tensors on the device, in their compute dtype (fp8 ones as stored)."""
        size = self._sizes[i]
        raw = torch.empty(size, dtype=torch.uint8, device=self.device)
        raw.copy_(flat[:size], non_blocking=self.cuda)
        if self.source == "mmap" and self.cuda:
            done = torch.cuda.Event()
            done.record(self._side)
            self._staging_free[self._position[i] % len(self._staging)] = done
        copies = []
        for slot in self._slots[i]:
            t = _view(raw, slot.offset, slot.stored)
            if slot.scale is None and t.dtype != slot.dtype:
                t = t.to(slot.dtype)  # a file's dtype converted on the device
            copies.append(t)
        return copies

    def _fetch(self, i: int) -> None:
        if i in self._pending:
            return
        flat = self._host_copy(i)
        if self.cuda:
            with torch.cuda.stream(self._side):
                copies = self._to_device(i, flat)
            event = torch.cuda.Event()
            event.record(self._side)
        else:
            copies, event = self._to_device(i, flat), None
        self._pending[i] = (copies, event)
        self._log("fetch", i)
        self.max_streamed_on_device = max(self.max_streamed_on_device, len(self._pending) + len(self._in_use))
        self._start_read(self._next.get(i))  # the next block's bytes, read while this one computes

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
                return self._move(args), self._move(kwargs)
            return None

        return hook

    @staticmethod
    def _upcast(slot: _Slot, t: torch.Tensor) -> torch.Tensor:
        return (t.to(torch.float32) * slot.scale.to(t.device)).to(slot.dtype)

    def _release(self, i: int) -> None:
        for slot in self._slots[i]:
            slot.set(self._placeholder(slot, torch.device("cpu")))
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
                if self._next[i] is not None:
                    self._fetch(self._next[i])
            elif self.fp8:
                for slot in self._slots[i]:
                    if slot.scale is not None:
                        slot.set(self._placeholder(slot, self.device))
            return None

        return hook

    def _move(self, value):
        if isinstance(value, torch.Tensor):
            return value.to(self.device, non_blocking=True) if value.device != self.device else value
        if isinstance(value, tuple):
            return tuple(self._move(v) for v in value)
        if isinstance(value, list):
            return [self._move(v) for v in value]
        if isinstance(value, dict):
            return {k: self._move(v) for k, v in value.items()}
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
        """Store a new value for a slot of block i as placement does (fp8 re-quantised, pinned copies
        written in place; a mapped file is never written: the value replaces it); prefetched device
        copies are dropped so that the next call uses it."""
        self._wait_for_reads()
        if i not in self._next:
            slot.stored = self._stored_form(slot, tensor, self.device)
            slot.source = None
            if slot.scale is None:
                slot.set(slot.stored)
        elif self.source == "mmap":
            slot.stored = tensor.detach().to("cpu", slot.stored.dtype).contiguous()
            slot.source = None
        else:
            slot.stored.copy_(self._stored_form(slot, tensor, torch.device("cpu")))
        self.reset()

    # -- teardown

    def _wait_for_reads(self) -> None:
        for future in self._reads.values():
            future.result()
        self._reads.clear()

    def reset(self) -> None:
        """Drop device copies held for a call that raised, and the prefetched copy for the next call."""
        self._wait_for_reads()
        for i in list(self._in_use):
            self._release(i)
        self._pending.clear()

    def _unhook(self) -> None:
        self._wait_for_reads()
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._pending.clear()
        self._in_use.clear()

    def detach(self, device: str | torch.device | None = None) -> None:
        """Remove the hooks and put every block back, in its compute dtype, on `device` (default: the
        device). On the host, blocks streamed from a mapped file get their mapped tensors back."""
        device = torch.device(device) if device is not None else self.device
        self._unhook()
        for slots in self._slots:
            for slot in slots:
                if slot.source is not None and device.type == "cpu":
                    slot.set(slot.source)
                else:
                    t = slot.stored.to(device)
                    if slot.scale is not None:
                        t = (t.to(torch.float32) * slot.scale.to(device)).to(slot.dtype)
                    slot.set(t.to(slot.dtype))
                slot.stored = slot.scale = slot.source = None
        self._buffers.clear()
        self._staging.clear()

    def close(self) -> None:
        """Remove the hooks and drop every copy (the model's weights are left as placeholders): for a
        model about to be freed, so its pinned and device memory goes now, not at the next garbage
        collection."""
        self._unhook()
        for slots in self._slots:
            for slot in slots:
                slot.set(self._placeholder(slot, torch.device("cpu")))
                slot.stored = slot.scale = slot.source = None
        self._buffers.clear()
        self._staging.clear()
