"""The bytes of the tensors a piece of code makes, alive at once: the CPU's stand-in for
torch.cuda.max_memory_allocated (which counts the same storages, rounded up to its blocks)."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Inside `with LiveBytes() as live:`, every storage an op makes is counted from then until it is
    freed (views of a storage made before, inputs included, are not); `live.peak` is the most at once."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if _is_tensor(t)}
        for t in tree_flatten(out)[0]:
            if not _is_tensor(t):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or key in inputs or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            # A storage's Python object lives as long as the storage (PyTorch keeps it): freed with it.
            weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.now)
        return out

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)


def _is_tensor(t) -> bool:
    return isinstance(t, torch.Tensor)
