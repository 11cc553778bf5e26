"""The parallel degrees of a run: how many processes (one per GPU) and how they share the work.

CFG-parallel (degree 2, with guidance only) costs one exchange of a latent-sized prediction per step;
Ulysses costs two all-to-alls per block (q, k and v together before the self-attention, its output after)
and divides each process's activations by its degree, which must divide the head count. With G GPUs
the planner uses as many as it can, CFG-parallel first: the largest cfg x ulysses <= G, cfg 2 on a
tie. The rest of the plan (placement, chunking, tiling) is per GPU: the planner plans one process,
the estimates count that process's share of the tokens (wanfit.plan.estimates.rank_tokens).
"""

from __future__ import annotations

import re
from math import prod

from wanfit.errors import ConfigError
from wanfit.plan.estimates import Request, rank_tokens
from wanfit.plan.plan import Plan

PARALLEL_FIELDS = ("cfg_parallel", "ulysses")
_SPEC = re.compile(r"(cfg|ulysses)(\d+)")


def parse_parallel(text: str) -> tuple[int, int]:
    """'cfg2,ulysses4' (also 'cfg2xulysses4', 'ulysses4', 'cfg2', 'none') -> (cfg, ulysses)."""
    low = text.strip().lower().replace(" ", "")
    degrees = {"cfg": 1, "ulysses": 1}
    parts = [p for p in re.split(r"[,x]", low) if p] if low not in ("none", "1") else []
    seen = set()
    for part in parts:
        match = _SPEC.fullmatch(part)
        if match is None or match.group(1) in seen or int(match.group(2)) < 1:
            raise ConfigError(
                f"--parallel takes degrees like cfg2,ulysses4 (cfg 1 or 2, ulysses a divisor of the head "
                f"count), got {text!r}."
            )
        seen.add(match.group(1))
        degrees[match.group(1)] = int(match.group(2))
    if degrees["cfg"] > 2:
        raise ConfigError(f"CFG-parallel has degree 1 or 2 (cond and uncond), got cfg{degrees['cfg']}.")
    return degrees["cfg"], degrees["ulysses"]


def format_parallel(cfg: int, ulysses: int) -> str:
    """(2, 4) -> 'cfg2,ulysses4', the form --parallel takes."""
    return f"cfg{cfg},ulysses{ulysses}"


def ulysses_degrees(heads: int) -> list[int]:
    """The Ulysses degrees a model allows: the divisors of its head count."""
    return [u for u in range(1, heads + 1) if heads % u == 0]


def _model(request: Request) -> str:
    return f"Wan2.1 {request.model_name}"


def check_degrees(request: Request, cfg: int, ulysses: int) -> None:
    """One clear sentence for degrees this model and request cannot run."""
    heads = request.config.num_heads
    if cfg == 2 and not request.guidance:
        raise ConfigError(
            "CFG-parallel (cfg2) runs cond and uncond on two groups of GPUs, but guidance is off "
            "(--guidance 1); use ulysses alone."
        )
    if heads % ulysses:
        allowed = ", ".join(map(str, ulysses_degrees(heads)))
        raise ConfigError(
            f"Ulysses {ulysses} does not divide the {heads} attention heads of {_model(request)}; "
            f"its Ulysses degrees are {allowed}."
        )
    if ulysses > request.tokens:
        raise ConfigError(
            f"Ulysses {ulysses} is more processes than the {request.tokens} tokens of this video."
        )


def choose_degrees(request: Request, gpus: int) -> tuple[int, int]:
    """The degrees for `gpus` GPUs: the most GPUs used, CFG-parallel first (see the module docstring)."""
    best = (1, 1)
    for cfg in (2, 1) if request.guidance else (1,):
        for ulysses in ulysses_degrees(request.config.num_heads):
            if ulysses <= request.tokens and best[0] * best[1] < cfg * ulysses <= gpus:
                best = (cfg, ulysses)
    return best


def parallel_degrees(
    request: Request, *, gpus: int | None = None, spec: str | None = None, world_size: int | None = None
) -> tuple[int, int]:
    """(cfg, ulysses) for a run: `spec` (--parallel) if given, else chosen for `gpus` (--gpus).

    world_size: the processes already started (torchrun); the degrees must use exactly that many.
    """
    _check_gpus(gpus)
    if world_size is not None and gpus is not None and gpus < world_size:
        raise ConfigError(f"--gpus {gpus} was given, but this run was started with {world_size} processes.")
    if spec is not None:
        cfg, ulysses = parse_parallel(spec)
        check_degrees(request, cfg, ulysses)
        limit = world_size or gpus
        if world_size is not None and cfg * ulysses != world_size:
            raise ConfigError(
                f"--parallel {spec} runs {cfg * ulysses} processes, but this run was started with {world_size}."
            )
        _check_spec_limit(spec, cfg * ulysses, limit)
        return cfg, ulysses
    cfg, ulysses = choose_degrees(request, world_size or gpus or 1)
    if world_size is not None and cfg * ulysses != world_size:
        fewer = [n for n in range(world_size - 1, 1, -1) if n == prod(choose_degrees(request, n))]
        counts = [str(n) for n in fewer[:3]]
        counts = ", ".join(counts[:-1]) + " or " + counts[-1] if len(counts) > 1 else "".join(counts)
        instead = f"start {counts} processes" if fewer else "run it in one process"
        raise ConfigError(
            f"{world_size} processes cannot share a run of {_model(request)} ({request.config.num_heads} "
            f"heads, guidance {'on' if request.guidance else 'off'}): the Ulysses degree must divide the head "
            f"count and CFG-parallel needs guidance; {instead}."
        )
    return cfg, ulysses


def batch_world_size(requests: list[Request], *, gpus: int | None = None, spec: str | None = None) -> int:
    """The processes of a batch: every video runs on all of them, each with its own degrees
    (parallel_degrees with this world_size). --parallel: its processes; --gpus: the most GPUs, up to
    `gpus`, whose count every video's degrees use exactly (1 always)."""
    _check_gpus(gpus)
    if spec is not None:
        cfg, ulysses = parse_parallel(spec)
        _check_spec_limit(spec, cfg * ulysses, gpus)
        return cfg * ulysses
    for count in range(gpus or 1, 1, -1):
        if all(prod(choose_degrees(request, count)) == count for request in requests):
            return count
    return 1


def _check_gpus(gpus: int | None) -> None:
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}.")


def _check_spec_limit(spec: str, processes: int, limit: int | None) -> None:
    if limit is not None and processes > limit:
        raise ConfigError(f"--parallel {spec} needs {processes} GPUs, more than --gpus {limit}.")


def parallel_overrides(cfg: int, ulysses: int) -> dict:
    """The Plan fields of the degrees (cond and uncond are never batched under CFG-parallel)."""
    overrides = {"cfg_parallel": cfg, "ulysses": ulysses}
    if cfg == 2:
        overrides["cfg_batch"] = False
    return overrides


def reject_parallel_overrides(overrides: dict) -> None:
    """--set cannot change the degrees: they decide the processes started, so --parallel does."""
    given = [name for name in PARALLEL_FIELDS if name in overrides]
    if given:
        raise ConfigError(
            f"Set {', '.join(given)} with --parallel (e.g. --parallel cfg2,ulysses4), not --set."
        )


def parallel_notes(plan: Plan, request: Request, gpus: int | None) -> list[str]:
    """What the degrees mean for this run, in a sentence or two (for `wanfit plan` and warnings)."""
    if plan.world_size == 1 and not gpus:
        return []
    notes = []
    if gpus is not None and plan.world_size < gpus:
        notes.append(
            f"uses {plan.world_size} of the {gpus} GPUs: the Ulysses degree must divide the "
            f"{request.config.num_heads} heads (and CFG-parallel needs guidance)."
        )
    parts = []
    if plan.cfg_parallel == 2:
        parts.append(f"cond and uncond on two groups of {plan.ulysses} GPU(s) (CFG-parallel)")
    if plan.ulysses > 1:
        parts.append(
            f"each DiT forward shared by {plan.ulysses} GPUs (Ulysses): {rank_tokens(request, plan):,} of the "
            f"{request.tokens:,} tokens and {request.config.num_heads // plan.ulysses} of the "
            f"{request.config.num_heads} heads in self-attention per GPU"
        )
    if parts:
        notes.append(
            f"{plan.world_size} processes, one per GPU, {format_parallel(plan.cfg_parallel, plan.ulysses)}: "
            + "; ".join(parts)
            + f". {_dit_where(plan)}; the estimates are per GPU; {_text_encoder_where(plan)}, rank 0 "
            "decodes the video."
        )
    return notes


def _dit_where(plan: Plan) -> str:
    if plan.dit_sharding == "fsdp":
        return (
            f"Each GPU keeps 1/{plan.world_size} of the DiT's blocks (FSDP2) and gathers each block to run it"
        )
    return "Every GPU holds the whole DiT"


def _text_encoder_where(plan: Plan) -> str:
    if plan.text_encoder_rank is None:
        return "every GPU runs umT5"
    return f"rank {plan.text_encoder_rank} alone runs umT5 and sends the embeddings to the others"


def with_parallel_notes(result, gpus: int | None = None):
    """A planner result (wanfit.plan.planner.PlanResult) with the degrees' notes added."""
    from dataclasses import replace

    notes = parallel_notes(result.plan, result.request, gpus)
    return replace(result, notes=(*result.notes, *notes)) if notes else result
