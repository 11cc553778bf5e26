"""The CUDA caching allocator's segments, as the Plan says (Plan.cuda_expandable_segments).

The setting is the process's, not a model's: it is applied once, before the models are loaded, and
again only when a plan asks for the other value. None leaves the allocator as it is (a CPU plan, or
PYTORCH_CUDA_ALLOC_CONF set by the user).
"""

from __future__ import annotations

import torch

_applied: bool | None = None  # what this process last set


def apply_allocator(plan) -> None:
    global _applied
    want = getattr(plan, "cuda_expandable_segments", None)
    if want is None or want == _applied or not str(plan.device).startswith("cuda"):
        return
    if not torch.cuda.is_available():
        return
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # torch before 2.9
        setter = torch.cuda.memory._set_allocator_settings
    setter(f"expandable_segments:{want}")
    _applied = want
