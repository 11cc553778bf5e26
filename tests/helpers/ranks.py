"""Run a function on N processes the way torchrun starts them (RANK, WORLD_SIZE, MASTER_PORT ...),
forked so they inherit the caller's models, on gloo; collect each process's result and exit code."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from dataclasses import dataclass


@dataclass
class RankResult:
    rank: int
    exitcode: int | None  # None: still running at the deadline (it was killed: a hang)
    value: object = None  # what fn returned (exit code 0 only)
    error: str | None = None  # an exception that escaped the session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _portable(value, to_numpy: bool):
    """Tensors as numpy arrays for the pipe (torch would share them by file descriptor, which dies with
    the process), and back."""
    import numpy as np
    import torch

    if to_numpy and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if not to_numpy and isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_portable(v, to_numpy) for v in value)
    if isinstance(value, dict):
        return {k: _portable(v, to_numpy) for k, v in value.items()}
    return value


def _child(rank, world_size, port, fn, args, env, conn, in_session):
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            **env,
        }
    )
    from wanfit.runtime.parallel import session

    code = 0
    try:
        if in_session:
            with session("cpu") as current:
                conn.send(("value", _portable(fn(current, *args), True)))
        else:
            conn.send(("value", _portable(fn(rank, *args), True)))
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
        code = 1
    conn.close()
    os._exit(code)


def run_ranks(
    fn,
    world_size: int,
    *args,
    timeout: float = 30.0,
    env: dict | None = None,
    in_session: bool = True,
    hung: frozenset[int] = frozenset(),
) -> list[RankResult]:
    """fn(session, *args) on `world_size` forked processes (in_session=False: fn(rank, *args), which
    opens the session itself, as `wanfit generate` does); every process is ended by `timeout`, and
    the ranks in `hung` (expected never to end) as soon as the others have."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    pipes, procs = [], []
    for rank in range(world_size):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child, args=(rank, world_size, port, fn, args, env or {}, child, in_session)
        )
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    results = [RankResult(rank, None) for rank in range(world_size)]
    deadline = time.monotonic() + timeout
    for result, pipe in zip(results, pipes):
        if result.rank in hung:
            continue
        # Read before joining: a large result would block its sender on a full pipe.
        while time.monotonic() < deadline:
            try:
                if pipe.poll(0.05):
                    kind, payload = pipe.recv()
                    setattr(result, kind, _portable(payload, False))
                    break
            except EOFError:  # the process ended without sending
                break
    for rank in sorted(range(world_size), key=lambda r: r in hung):  # the hung ones last
        proc = procs[rank]
        proc.join(0 if rank in hung else max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
        else:
            results[rank].exitcode = proc.exitcode
    return results
