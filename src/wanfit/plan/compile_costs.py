"""When compiling the DiT's blocks pays: steps x the per-step saving against the one-off compile.

Compiling (wanfit.runtime.compile) fuses each block's norms, modulation, RoPE and gated residuals,
so every step gets faster, but the first compiled step carries the compile. The planner turns it on
when `steps x saving per step > compile cost`. Both numbers come from what pipeline runs measured on
this card and torch build, per job shape, kept in the user cache dir (compile_costs.json beside the
attention bench's file); until a card has them, from the H100 numbers below, scaled to the job.
Inductor keeps compiled kernels on disk, so a second run's compile is much cheaper than the first:
the latest measured compile of a shape is what the planner expects next.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from wanfit.attention.ranking import cache_dir, device_key, write_json

COSTS_FILE = "compile_costs.json"
# H100, 1.3B at 832x480x81, guidance batched (docs/benchmarks.md, 2026-11-26): compiled steps took
# 1.07 s against 1.22 s eager, and the first compiled step about 17 s longer (cold Inductor cache).
H100_SAVING_S = 0.14
H100_COMPILE_S = 17.0
# H200, the same job, its eager blocks' elementwise work in the fused kernels (Plan.fused_elementwise;
# docs/benchmarks.md, 2026-12-02 fifth run, flash_attn4): eager steps took 0.949 s against 0.935 s
# compiled (two calls, on two machines of that card). What compiling saves once those kernels run.
FUSED_EAGER_SAVING_S = 0.014
# The fused elementwise work grows with tokens x dim x blocks x batch; that job's:
H100_WORK = 32760 * 1536 * 30 * 2
MIN_STEPS_TO_MEASURE = 3  # the first step, and at least two to take a steady step time from
KEPT_COMPILES = 5


@dataclass(frozen=True)
class CompileCosts:
    """What compiling costs once and saves per step for one job on one card, and where that is from."""

    compile_s: float
    saving_per_step_s: float
    source: str

    def pays(self, steps: int) -> bool:
        return steps * self.saving_per_step_s > self.compile_s

    def describe(self, steps: int) -> str:
        saved = steps * self.saving_per_step_s
        sign = ">" if self.pays(steps) else "<="
        return (
            f"{steps} steps x {self.saving_per_step_s:.3g} s saved per step = {saved:.3g} s {sign} "
            f"{self.compile_s:.3g} s to compile ({self.source})"
        )


def costs_path() -> Path:
    return cache_dir() / COSTS_FILE


def job(config, tokens: int, *, guidance: bool, cfg_batch: bool, dtype: str, fp8_gemm: bool = False):
    """(key, work) of one job shape: the DiT's size, the sequence, DiT calls per step and their
    batch, dtype and GEMM tier; work, tokens x dim x blocks x samples per step, is what the fused
    elementwise passes grow with."""
    batch = 2 if guidance and cfg_batch else 1
    calls = 2 if guidance and not cfg_batch else 1
    tier = "fp8" if fp8_gemm else "exact"
    key = (
        f"dim{config.dim}-ffn{config.ffn_dim}-layers{config.num_layers}|tokens{tokens}|"
        f"{calls}x batch {batch}|{dtype}|{tier}"
    )
    return key, tokens * config.dim * config.num_layers * batch * calls


def _read(path: Path) -> dict:
    if not path.is_file():
        return {"devices": {}}
    try:
        data = json.loads(path.read_text())
        data.setdefault("devices", {})
        return data
    except (OSError, ValueError, AttributeError) as err:
        warnings.warn(f"Ignoring the unreadable compile cost cache {path}: {err}", stacklevel=3)
        return {"devices": {}}


def load_measured(hw, path: Path | None = None) -> dict[str, dict]:
    """This card's measurements, job key -> entry ({} when none were kept)."""
    entry = _read(path or costs_path())["devices"].get(device_key(hw), {})
    return dict(entry) if isinstance(entry, dict) else {}


def costs_for(
    measured: Mapping[str, dict] | None, key: str, work: int, *, fused_eager: bool = False
) -> CompileCosts:
    """The costs the planner expects for job `key` (of `work`, see job) on a card with `measured`.

    The saving: measured for this job (eager and compiled steps), else the H100's scaled by the work,
    or, when the eager blocks would run the fused elementwise kernels (`fused_eager`), the H200's
    against those.
    The compile: the latest measured for this job (the Inductor cache is warm after the first), else
    the largest first compile measured on this card for any job, else the H100's.
    """
    measured = measured or {}
    entry = measured.get(key, {})
    if "eager_step_s" in entry and "compiled_step_s" in entry:
        saving = float(entry["eager_step_s"]) - float(entry["compiled_step_s"])
        saving_source = "saving measured on this card"
    elif fused_eager:
        saving = FUSED_EAGER_SAVING_S * work / H100_WORK
        saving_source = "saving: the H200's against the fused eager blocks, scaled to this job"
    else:
        saving = H100_SAVING_S * work / H100_WORK
        saving_source = "saving: H100 numbers scaled to this job"
    if entry.get("compile_s"):
        compile_s = float(entry["compile_s"][-1])
        compile_source = "compile measured on this card"
    else:
        firsts = [float(e["compile_s"][0]) for e in measured.values() if e.get("compile_s")]
        if firsts:
            compile_s, compile_source = max(firsts), "compile measured on this card for another job"
        else:
            compile_s, compile_source = H100_COMPILE_S, "compile: the H100's"
    return CompileCosts(compile_s, saving, f"{saving_source}; {compile_source}")


def steady_and_first_extra(step_s: Sequence[float]) -> tuple[float, float]:
    """(median step after the first, how much longer the first took)."""
    steady = statistics.median(step_s[1:])
    return steady, max(0.0, step_s[0] - steady)


def record_run(hw, key: str, *, compiled: bool, step_s: Sequence[float], path: Path | None = None) -> bool:
    """Keep what one run's steps measured for job `key` on this card; False when too few steps.

    eager: the steady step, and the first step's extra time (what any run pays once: kernel
    selection, allocations); compiled: the steady step, and the compile (the first step's extra
    time less the eager one's).
    """
    if len(step_s) < MIN_STEPS_TO_MEASURE:
        return False
    path = path or costs_path()
    data = _read(path)
    card = data["devices"].setdefault(device_key(hw), {})
    entry = card.setdefault(key, {})
    steady, extra = steady_and_first_extra(step_s)
    if compiled:
        entry["compiled_step_s"] = steady
        compile_s = max(0.0, extra - float(entry.get("eager_first_extra_s", 0.0)))
        entry["compile_s"] = [*entry.get("compile_s", []), compile_s][-KEPT_COMPILES:]
    else:
        entry["eager_step_s"] = steady
        entry["eager_first_extra_s"] = extra
    write_json(path, data)
    return True


class StepClock:
    """Wall time of each denoising step (the device synchronised at each step's end), for the record.

    `wrap(on_step)` is the callback to give the denoising loop; `step_s` the times in step order."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.marks: list[float] = []

    def start(self) -> None:
        self.marks = [time.perf_counter()]

    def wrap(self, on_step=None):
        def tick(state):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.marks.append(time.perf_counter())
            if on_step is not None:
                on_step(state)

        return tick

    @property
    def step_s(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]
