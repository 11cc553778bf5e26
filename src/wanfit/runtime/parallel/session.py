"""The processes of one run on several GPUs: torch.distributed from torchrun's environment, and one end
for all of them.

torchrun (or `wanfit generate --gpus N`, which starts torch.distributed.run) gives every process RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. `session()` turns them into a process group:
NCCL on GPUs (each process on the GPU of its local rank), gloo on the CPU. Without them (or with
WORLD_SIZE=1) it is a one-process session that sets nothing up and costs nothing.

Ending together. A process that fails records it in the run's key-value store (a TCPStore beside the
process group); the first to do so prints its one-line message, the others end silently with
EXIT_PEER_FAILED. A watchdog thread in each process polls the store: when another process has failed,
it gives the main thread GRACE_S to end by itself (its collective fails once the peer is gone, and rank
0 saves its resume file on the way out), then ends the process (stuck in a collective). It also beats a heartbeat: a process whose heartbeat
stops for WANFIT_PEER_TIMEOUT seconds (killed, out of host memory) is reported by the first process to
notice. A collective that waits longer than WANFIT_COLLECTIVE_TIMEOUT seconds fails.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from wanfit.errors import ParallelError

COLLECTIVE_TIMEOUT_ENV = "WANFIT_COLLECTIVE_TIMEOUT"
PEER_TIMEOUT_ENV = "WANFIT_PEER_TIMEOUT"
# Long: the first collective waits for the slowest process to load its models.
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
DEFAULT_PEER_TIMEOUT_S = 60.0
POLL_S = 0.25  # the watchdog's period
# A stopped process's main thread gets this long (at most the peer timeout) to save and exit.
GRACE_S = 5.0
EXIT_PEER_FAILED = 3  # this process stopped because another one failed (and printed why)
EXIT_INTERRUPTED = 130
# NVLink SHARP (multicast, "NVLS") stays off: NCCL's NVLS setup fails or hangs on hosts where the
# fabric manager does not offer multicast, and it buys little at these message sizes.
NCCL_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0"}


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 when absent)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE") or 1))
    except ValueError:
        raise ParallelError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number.") from None


def _seconds(env: str, default: float) -> float:
    text = os.environ.get(env)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ParallelError(f"{env} must be a positive number of seconds, got {text!r}.")
    return value


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:200] if text else type(err).__name__).rstrip(".")


_current: Session | None = None  # this process's session (there is one per process), for transport()


@contextlib.contextmanager
def transport(what: str) -> Iterator[None]:
    """Around a collective: a transport failure (a peer gone, a timeout) becomes one clear ParallelError,
    or KeyboardInterrupt when the peer left because Ctrl-C reached every process."""
    from wanfit.runtime.oom import is_out_of_memory

    try:
        yield
    except RuntimeError as err:
        if is_out_of_memory(err):  # a collective's buffers: the OOM guard's business
            raise
        if _current is not None and _current.interrupted():
            raise KeyboardInterrupt from err
        raise ParallelError(
            f"Lost contact with another process of this run while {what} ({first_line(err)}); it ended "
            "or was killed, so every process stops."
        ) from err


@dataclass(frozen=True)
class Groups:
    """Where this process sits in a run of cfg x ulysses processes (rank = cfg_rank * ulysses + ulysses_rank).

    cfg_rank 0 predicts the conditional noise, 1 the unconditional one; cfg_group is this process's
    pair; ulysses_group the processes that share each DiT forward by token (None: the whole world).
    """

    cfg: int
    ulysses: int
    cfg_rank: int
    ulysses_rank: int
    cfg_group: object | None
    ulysses_group: object | None


class Session:
    """One process's view of the run: rank, device, store and process group (world_size 1: none)."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        device: str | None = None,
        backend: str | None = None,
        store=None,
    ):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device  # the device of this process (None in a one-process session: the plan's)
        self.backend = backend
        self.store = store
        self.stop_code: int | None = None  # set by the watchdog when it stops this process
        self._watchdog: _Watchdog | None = None

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    @property
    def is_output_rank(self) -> bool:
        """Rank 0 writes the video, the sidecar and the resume file; it speaks for the run."""
        return self.rank == 0

    def runs_text_encoder(self, plan) -> bool:
        """Whether this process loads umT5 and encodes the prompts under `plan` (Plan.text_encoder_rank)."""
        return not self.is_parallel or plan.text_encoder_rank in (None, self.rank)

    def share(self, key: str, make: Callable[[], str]) -> str:
        """make() on rank 0, its result on every process (through the store: no collective)."""
        if not self.is_parallel:
            return make()
        key = f"share/{key}"
        if self.rank == 0:
            value = make()
            self.store.set(key, value)
            return value
        self._wait([key])
        return self.store.get(key).decode()

    def agree(self, key: str, error: str | None) -> str | None:
        """The outcome of one step that may fail on some processes (a batch's plan or video), the same
        on every process: each gives its own error (None: it went well), all get the lowest rank's
        error, or None. Through the store, not a collective: waiting here for a peer that is still
        decoding is not a collective's timeout. `key` names the step (one call per process each)."""
        if not self.is_parallel:
            return error
        names = [f"agree/{key}/{rank}" for rank in range(self.world_size)]
        self.store.set(names[self.rank], json.dumps(error))
        self._wait(names)
        errors = [json.loads(self.store.get(name)) for name in names]
        return next((e for e in errors if e is not None), None)

    def _wait(self, keys: list[str]) -> None:
        """Until the store holds `keys`; not a blocking get: stop when another process failed."""
        while not self.store.check(keys):
            if self.stop_code is not None:
                raise SystemExit(self.stop_code)
            time.sleep(0.05)

    def common_plan(self, planned, key: str = "plan"):
        """Rank 0's plan, on this process's GPU, for every process (their collectives must match):
        `planned` is this process's own Plan or planner result (PlanResult), returned with that plan;
        `key` names the plan (a batch has one per size)."""
        if not self.is_parallel:
            return planned
        from wanfit.plan.plan import Plan

        own = getattr(planned, "plan", planned)
        plan = self.local_plan(Plan.from_dict(json.loads(self.share(key, own.to_json))))
        return plan if planned is own else replace(planned, plan=plan)

    def local_plan(self, plan):
        """Rank 0's plan for this process: the same, on this process's GPU."""
        if not self.is_parallel or not str(self.device).startswith("cuda"):
            return plan
        on_gpu = [
            name for name in ("device", "text_encoder_device") if getattr(plan, name).startswith("cuda")
        ]
        return replace(plan, **dict.fromkeys(on_gpu, self.device))

    def groups(self, cfg: int, ulysses: int) -> Groups:
        """The process groups of a cfg x ulysses run; every process must call this, in the same order."""
        if cfg * ulysses != self.world_size:
            raise ParallelError(
                f"The plan runs CFG {cfg} x Ulysses {ulysses} = {cfg * ulysses} processes, but this run has "
                f"{self.world_size}."
            )
        cfg_rank, ulysses_rank = divmod(self.rank, ulysses)
        cfg_group = ulysses_group = None
        if self.is_parallel:
            # new_group is collective over the world: every process creates every group, in one order.
            for g in range(cfg):
                group = self._new_group([g * ulysses + u for u in range(ulysses)])
                ulysses_group = group if g == cfg_rank else ulysses_group
            if cfg == 2:
                for u in range(ulysses):
                    group = self._new_group([u, ulysses + u])
                    cfg_group = group if u == ulysses_rank else cfg_group
        return Groups(cfg, ulysses, cfg_rank, ulysses_rank, cfg_group, ulysses_group)

    def _new_group(self, ranks: list[int]):
        return None if len(ranks) == self.world_size else dist.new_group(ranks)

    def interrupted(self) -> bool:
        """Whether a process of this run was interrupted (Ctrl-C, or torchrun passing on a SIGINT)."""
        try:
            return self.is_parallel and self.store.check(["interrupted"])
        except Exception:
            return False

    def report_failure(self) -> bool:
        """Record that this process failed; True if it is the run's first failure (it prints why)."""
        if self._watchdog is not None:
            self._watchdog.stop()
        try:
            return self.store.add("failures", 1) == 1
        except Exception:  # the store's host is gone: nobody else can say it
            return True

    def close(self) -> None:
        """A normal end: stop the watchdog, say this process is done, leave the process group."""
        if not self.is_parallel:
            return
        if self._watchdog is not None:
            self._watchdog.stop()
        with contextlib.suppress(Exception):  # the store's host may already have ended
            self.store.set(f"done/{self.rank}", "1")
            if self.rank == 0:  # it may host the store: the last to leave, so no peer loses it
                others = [f"done/{rank}" for rank in range(1, self.world_size)]
                deadline = time.monotonic() + GRACE_S
                while not self.store.check(others) and time.monotonic() < deadline:
                    time.sleep(0.05)
        if dist.is_initialized():
            dist.destroy_process_group()


class _Watchdog(threading.Thread):
    """Heartbeat, and the end of this process when another one failed or stopped beating."""

    def __init__(self, session: Session, peer_timeout: float):
        super().__init__(name="wanfit-watchdog", daemon=True)
        self.session = session
        self.peer_timeout = peer_timeout
        self._stopped = threading.Event()
        now = time.monotonic()
        self._beats = {r: (-1, now) for r in range(session.world_size) if r != session.rank}

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        store = self.session.store
        while not self._stopped.wait(POLL_S):
            try:
                store.add(f"beat/{self.session.rank}", 1)
                if store.add("failures", 0) > 0:
                    return self._end(EXIT_PEER_FAILED, None)
                silent = self._silent_peer(store)
                if silent is not None:
                    first = store.add("failures", 1) == 1
                    message = (
                        f"The process of rank {silent} stopped responding for {self.peer_timeout:.0f} s "
                        "(killed, or out of host memory?), so every process of this run stops."
                    )
                    return self._end(2 if first else EXIT_PEER_FAILED, message if first else None)
            except Exception as err:
                if self._stopped.is_set():
                    return
                return self._end(
                    2,
                    f"Lost contact with this run's coordinator ({first_line(err)}); rank 0 or torchrun "
                    "ended, so this process stops.",
                )

    def _silent_peer(self, store) -> int | None:
        now = time.monotonic()
        for rank, (count, since) in self._beats.items():
            beat = store.add(f"beat/{rank}", 0)
            if beat != count:
                self._beats[rank] = (beat, now)
            elif now - since > self.peer_timeout and not store.check([f"done/{rank}"]):
                return rank
        return None

    def _end(self, code: int, message: str | None) -> None:
        if self._stopped.is_set():
            return
        if message is not None:
            print(f"wanfit: error: {message}", file=sys.stderr, flush=True)
        self.session.stop_code = code
        # The main thread usually ends by itself: its collective fails once the peer is gone, and it
        # saves the resume file on the way out. If it is stuck (NCCL waits), end the process.
        if self._stopped.wait(min(GRACE_S, self.peer_timeout)):
            return
        sys.stderr.flush()
        os._exit(code)


def _store(rank: int, world_size: int, timeout: datetime.timedelta):
    """The run's TCPStore: torchrun's agent hosts it (TORCHELASTIC_USE_AGENT_STORE), else rank 0 does."""
    try:
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise ParallelError(
            "WORLD_SIZE is set but MASTER_PORT is not: start several processes with torchrun or "
            "`wanfit generate --gpus N`."
        ) from None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host, port, world_size, is_master=rank == 0 and not agent, timeout=timeout, wait_for_workers=False
    )
    return dist.PrefixStore(f"wanfit/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def open_session(device: str | None = None) -> Session:
    """This process's session; device: 'cpu' for gloo on the CPU, else CUDA when there is one."""
    world_size = world_size_from_env()
    if world_size == 1:
        return Session(device=device)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_rank >= count:
            raise ParallelError(
                f"The process of local rank {local_rank} needs a GPU of its own, but this machine has {count}."
            )
        for name, value in NCCL_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    elif kind == "cpu":
        device, backend = "cpu", "gloo"
    else:
        raise ParallelError(f"A run on several processes needs CUDA GPUs or the CPU, not {kind}.")
    timeout = datetime.timedelta(seconds=_seconds(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S))
    peer_timeout = _seconds(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT_S)
    store = _store(rank, world_size, timeout)
    try:
        dist.init_process_group(
            backend,
            store=dist.PrefixStore("pg", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    except RuntimeError as err:
        raise ParallelError(f"Could not connect the {world_size} processes ({first_line(err)}).") from err
    session = Session(rank, world_size, local_rank, device, backend, store)
    session._watchdog = _Watchdog(session, peer_timeout)
    session._watchdog.start()
    return session


@contextlib.contextmanager
def session(device: str | None = None) -> Iterator[Session]:
    """Run the body as one process of the run; see the module docstring for how failures end it.

    Only one process prints: the first to fail (rank 0 for Ctrl-C, which reaches every process);
    the others end with EXIT_PEER_FAILED (or EXIT_INTERRUPTED) and say nothing.
    """
    global _current
    current = _current = open_session(device)
    try:
        yield current
    except BaseException as err:
        if not current.is_parallel:
            raise
        if current.stop_code is not None:  # the watchdog stopped us: another process spoke
            raise SystemExit(current.stop_code) from None
        if isinstance(err, KeyboardInterrupt):
            if current._watchdog is not None:
                current._watchdog.stop()
            with contextlib.suppress(Exception):  # so that a peer that loses contact knows why
                current.store.set("interrupted", "1")
            if not current.is_output_rank:
                raise SystemExit(EXIT_INTERRUPTED) from None
            raise
        if isinstance(err, SystemExit) and not err.code:
            current.close()
            raise
        if not current.report_failure():
            raise SystemExit(EXIT_PEER_FAILED) from None
        raise
    else:
        current.close()
    finally:
        _current = None
