"""`wanfit generate --gpus N`: start the run's processes through torch.distributed.run, as torchrun would.

The launching process has already checked the settings and chosen the degrees; each worker runs
`python -m wanfit <argv>` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set by
torch.distributed.run (single host, `--standalone`). When one worker fails, torch.distributed.run ends
the others; the worker that failed has printed the run's one message (wanfit.runtime.parallel.session),
so this process only adds a line when none did (a worker killed by a signal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

from wanfit.runtime.parallel.session import EXIT_INTERRUPTED, NCCL_ENV_DEFAULTS

# Exit codes of a worker that printed why it ended (wanfit.cli: 2 for an error, 1 for a traceback).
_SPOKE = (2, EXIT_INTERRUPTED, 1)


@contextlib.contextmanager
def _quiet_launcher_logs():
    """torch.distributed.run logs each worker's start, failure and termination (each logger at its own
    level); the workers speak for the run. This process does nothing else meanwhile."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def launch(argv: list[str], nproc: int, *, on_cpu: bool = False) -> int:
    """Run `python -m wanfit *argv` in `nproc` processes of this machine; the run's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    env = dict(NCCL_ENV_DEFAULTS)
    # torchrun would set 1 and warn; CPU workers share the cores instead.
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc) if on_cpu else 1)
    for name, value in env.items():
        os.environ.setdefault(name, value)
    config = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "wanfit", *argv]
    )
    try:
        with _quiet_launcher_logs():
            run(config)
    except ChildFailedError as err:
        return _exit_code(err.failures, nproc)
    except SignalException:  # Ctrl-C: torch.distributed.run passed it on; rank 0 said where it stopped
        return EXIT_INTERRUPTED
    return 0


def _exit_code(failures: dict, nproc: int) -> int:
    """The run's exit code from its failed workers; prints one line if none of them printed one."""
    codes = {rank: failure.exitcode for rank, failure in failures.items()}
    for code in _SPOKE:
        if code in codes.values():
            return code
    signalled = {rank: -code for rank, code in codes.items() if code is not None and code < 0}
    if signalled:
        rank = min(signalled)
        try:
            how = f"signal {signal.Signals(signalled[rank]).name}"
        except ValueError:
            how = f"signal {signalled[rank]}"
        if signalled[rank] == signal.SIGKILL:
            how += ": out of host memory?"
    else:
        rank = min(codes)
        how = f"exit code {codes[rank]}"
    print(
        f"wanfit: error: the process of rank {rank} of {nproc} ended unexpectedly ({how}); every process "
        "of this run stopped.",
        file=sys.stderr,
    )
    return 1
