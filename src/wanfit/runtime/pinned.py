"""Page-locked host buffers of exactly the size asked for.

torch's pinned allocator rounds every allocation up to a power of two and keeps freed blocks for
reuse: a 80 MiB umT5 matrix takes 128 MiB, and a freed text encoder's copies stay with the process.
`host_buffer(n, pin=True)` maps n bytes (rounded to a page) and registers them with CUDA
(cudaHostRegister); the registration ends, and the memory goes back to the system, when the last
tensor viewing the buffer is gone. Where registration is not possible it falls back to torch's
pinned memory, once with a warning.
"""

from __future__ import annotations

import mmap
import warnings

import torch

_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process
_fallback_warned = False


class _RegisteredMap(mmap.mmap):
    """An anonymous mapping; once registered, unregistered when the mapping itself is freed (after the
    last tensor over it, which keeps it alive through the buffer protocol)."""

    address: int | None = None

    def __del__(self):
        if self.address is not None:
            try:
                torch.cuda.cudart().cudaHostUnregister(self.address)
            except Exception:  # interpreter shutdown, or no CUDA any more: the OS frees it with the process
                pass
            self.address = None


def _cuda_ok(result) -> bool:
    return int(getattr(result, "value", result)) == 0


def host_buffer(nbytes: int, *, pin: bool) -> torch.Tensor:
    """A uint8 tensor of `nbytes` on the host: ordinary memory, or (pin=True) page-locked memory of
    exactly that size, so non_blocking copies to the GPU overlap compute."""
    nbytes = max(1, int(nbytes))
    if not pin:
        return torch.empty(nbytes, dtype=torch.uint8)
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    try:
        # Private anonymous memory, like malloc's: counted as the process's own (anon), never shared.
        region = _RegisteredMap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer = torch.frombuffer(region, dtype=torch.uint8, count=nbytes)
        address = buffer.data_ptr()
        if not _cuda_ok(torch.cuda.cudart().cudaHostRegister(address, size, _PORTABLE)):
            raise RuntimeError("cudaHostRegister failed")
        region.address = address
        return buffer
    except Exception as err:  # no CUDA runtime API here, or the driver refused
        global _fallback_warned
        if not _fallback_warned:
            _fallback_warned = True
            warnings.warn(
                f"could not page-lock host buffers directly ({err}); using torch's pinned memory, which "
                "rounds each buffer up to a power of two.",
                stacklevel=2,
            )
        return torch.empty(nbytes, dtype=torch.uint8).pin_memory()
