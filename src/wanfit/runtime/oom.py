"""The out-of-memory guard: step the plan down one notch and retry the same step with the same inputs.

    guard = OOMGuard(get_plan, step_down, apply_plan)
    noise = guard.run("denoise", lambda: predict(latents, t), what="step 3")

On torch.OutOfMemoryError (or the 'out of memory' RuntimeErrors of CUDA, cuBLAS, MPS and the CPU
allocator) it frees what it can, asks `step_down(plan, phase)` for the next notch, applies it with
`apply_plan(new_plan)` and calls the step again. The step must not have changed its inputs before
it failed (a DiT prediction, a VAE decode), so the retried result is the one a run planned that
way from the start would give. With no notch left it raises PlanError.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from wanfit.errors import PlanError
from wanfit.plan.plan import Plan

T = TypeVar("T")

_OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cuda error: out of memory",
)
_OOM_TYPE = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, _OOM_TYPE):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _OOM_MESSAGES)


def memory_held() -> str:
    """What the caching allocator held when a step failed: allocated vs reserved tells a plan that
    was too big from one that fragmented (reserved far above allocated)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return ""
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    return f" ({allocated / 2**30:.2f} GiB allocated, {reserved / 2**30:.2f} GiB reserved)"


def free_memory() -> None:
    """Collect garbage (the failed step's tensors) and return cached blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def plan_changes(old: Plan, new: Plan) -> str:
    a, b = old.to_dict(), new.to_dict()
    return ", ".join(f"{k} {a[k]} -> {b[k]}" for k in a if a[k] != b[k]) or "no change"


class OOMGuard:
    """Runs steps; on out-of-memory steps the plan down via `step_down` and retries.

    history: (phase, what, changes) for each step-down, in order.
    """

    def __init__(
        self,
        get_plan: Callable[[], Plan],
        step_down: Callable[[Plan, str], Plan | None],
        apply_plan: Callable[[Plan], None],
        *,
        log: Callable[[str], None] | None = None,
    ):
        self.get_plan = get_plan
        self.step_down = step_down
        self.apply_plan = apply_plan
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.history: list[tuple[str, str, str]] = []

    def run(self, phase: str, step: Callable[[], T], *, what: str = "") -> T:
        where = f"{phase} {what}".strip()
        while True:
            try:
                return step()
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
                held = memory_held()
            # Out of the except block: the traceback, and the failed step's tensors, are gone.
            free_memory()
            plan = self.get_plan()
            new = self.step_down(plan, phase)
            if new is None:
                raise PlanError(
                    f"Out of memory during {where} with no lighter plan left ({reason}); free memory "
                    "used by other programs, or ask for fewer frames or a smaller size."
                )
            changes = plan_changes(plan, new)
            self.log(
                f"wanfit: out of memory during {where}{held}; stepping the plan down ({changes}) and retrying."
            )
            self.history.append((phase, what, changes))
            self.apply_plan(new)
