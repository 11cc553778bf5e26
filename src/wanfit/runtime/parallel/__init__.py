"""Several GPUs (or CPU processes) for one run, on torch.distributed: see docs/multi_gpu.md.

  session.py   the processes: process group from torchrun's environment, ending all of them together
  sequence.py  Ulysses sequence parallelism for the DiT and CFG-parallel guidance
  launch.py    `wanfit generate --gpus N`: torch.distributed.run from inside the CLI

The degrees (cfg_parallel, ulysses) are planning decisions: wanfit.plan.parallel makes them and the
Plan carries them.
"""

from wanfit.runtime.parallel.sequence import (
    DiTParallel,
    Ulysses,
    UlyssesAttention,
    dit_parallel,
    token_shares,
)
from wanfit.runtime.parallel.session import (
    EXIT_PEER_FAILED,
    Groups,
    Session,
    open_session,
    session,
    world_size_from_env,
)

__all__ = [
    "EXIT_PEER_FAILED",
    "DiTParallel",
    "Groups",
    "Session",
    "Ulysses",
    "UlyssesAttention",
    "dit_parallel",
    "open_session",
    "session",
    "token_shares",
    "world_size_from_env",
]
