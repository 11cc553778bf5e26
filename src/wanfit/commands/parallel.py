"""--gpus and --parallel, shared by `wanfit plan` and `wanfit generate` (see docs/multi_gpu.md)."""

from __future__ import annotations

import argparse


def add_parallel_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several GPUs")
    group.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="use up to N GPUs of this machine, one process each (generate starts them through "
        "torch.distributed.run; under torchrun: the processes started)",
    )
    group.add_argument(
        "--parallel",
        default=None,
        metavar="DEGREES",
        help="how the GPUs share the work, e.g. cfg2,ulysses4 (default: the planner's choice for --gpus)",
    )


def parallel_constraints(args: argparse.Namespace, request, constraints, *, world_size: int | None = None):
    """The planner's Constraints with the degrees of --gpus / --parallel (or of the processes torchrun
    started, world_size) added as Plan settings; --set may not set them."""
    from dataclasses import replace

    from wanfit.plan.parallel import parallel_degrees, parallel_overrides, reject_parallel_overrides

    reject_parallel_overrides(constraints.overrides)
    gpus, spec = getattr(args, "gpus", None), getattr(args, "parallel", None)
    if gpus is None and spec is None and world_size in (None, 1):
        return constraints
    cfg, ulysses = parallel_degrees(request, gpus=gpus, spec=spec, world_size=world_size)
    return replace(constraints, overrides={**constraints.overrides, **parallel_overrides(cfg, ulysses)})
