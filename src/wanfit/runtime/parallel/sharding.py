"""The DiT's blocks sharded over every process of a run (Plan.dit_sharding "fsdp"), with FSDP2.

Each block becomes its own `torch.distributed.fsdp.fully_shard` unit over a one-dimensional mesh of
the whole world: a process keeps 1/world of every block's weights (as DTensor shards), and each
block's forward all-gathers its whole weights first and frees them after (reshard_after_forward).
Every process runs the same blocks in the same order (CFG-parallel and Ulysses both do), so the
gathers match. The DiT's other parts (embeddings, head: a few percent) stay whole on every process.
Inference only: no gradients, no optimizer state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from wanfit.errors import ParallelError


def shard_blocks(blocks: nn.ModuleList, device: str | torch.device) -> None:
    """Shard each block over every process of the run, on `device` (the process's GPU, or the CPU on
    gloo); a block on the host moves to the device one at a time, so only one is ever there whole."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        raise ParallelError(
            "dit_sharding=fsdp shards the DiT over the processes of a run on several; this process runs alone."
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        block.to(device)
        fully_shard(block, mesh=mesh, reshard_after_forward=True)


def is_sharded(blocks: nn.ModuleList) -> bool:
    """Whether shard_blocks sharded these blocks."""
    from torch.distributed.fsdp import FSDPModule

    return len(blocks) > 0 and all(isinstance(block, FSDPModule) for block in blocks)
