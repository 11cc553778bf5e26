"""`wanfit bench attention`: time every usable attention backend on this device.

Prints ms, TFLOP/s (4*B*H*Lq*Lk*D / t) and peak memory per backend, and stores the measured
ranking in the cache (wanfit.attention.ranking) so the dispatcher ranks by it on this card; the
backend marked selected is the one it picks with these times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from wanfit.attention.dispatch import Dispatcher
from wanfit.attention.ranking import device_key, save_measured
from wanfit.commands import common
from wanfit.commands.common import add_hardware_options
from wanfit.errors import AttentionUnavailableError, ConfigError
from wanfit.hardware.profiles import GIB
from wanfit.precision import dtype_name

MIB = 1024**2
CPU_DEFAULT_SEQ = 1024  # small enough to time math on a laptop CPU in seconds


@dataclass(frozen=True)
class DefaultJob:
    """The attention call of the default job (Wan2.1 1.3B at 832x480x81), from the planner's request."""

    tokens: int
    heads: int
    head_dim: int


def _default_job() -> DefaultJob:
    from wanfit.plan.planning import model_request

    job = model_request("1.3B")
    return DefaultJob(job.tokens, job.config.num_heads, job.config.head_dim)


DEFAULT_JOB = _default_job()


@dataclass(frozen=True)
class HardwareSetup:
    """The probe, the precision policy and a dispatcher configured from the options."""

    probe: object
    precision: object
    dispatcher: object


def hardware_setup(args: argparse.Namespace) -> HardwareSetup:
    from wanfit.attention import configure
    from wanfit.hardware.probe import apply_emulation_limits
    from wanfit.precision import precision_policy

    hw = common.hardware_from_args(args)
    constraints = common.constraints_from_args(args)
    dispatcher = configure(hw, forced=constraints.attention, allow_lossy=constraints.allow_lossy_attention)
    apply_emulation_limits(hw)
    return HardwareSetup(hw, precision_policy(hw, compute=constraints.dtype), dispatcher)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time components on this device")
    what = p.add_subparsers(dest="bench_target", metavar="TARGET")
    a = what.add_parser("attention", help="time every usable attention backend")
    add_hardware_options(a)
    a.add_argument(
        "--seq",
        type=int,
        default=None,
        help=f"query tokens (default {DEFAULT_JOB.tokens} on a GPU, {CPU_DEFAULT_SEQ} on a CPU)",
    )
    a.add_argument("--kv-seq", type=int, default=None, help="key/value tokens (default: --seq)")
    a.add_argument("--heads", type=int, default=DEFAULT_JOB.heads)
    a.add_argument("--head-dim", type=int, default=DEFAULT_JOB.head_dim)
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--backends", default=None, help="comma-separated names (default: all usable)")
    a.add_argument("--warmup", type=int, default=None, help="untimed runs per backend (default 2 GPU, 1 CPU)")
    a.add_argument(
        "--runs",
        type=int,
        default=None,
        help="timed runs per backend, median reported (default 7 GPU, 3 CPU)",
    )
    a.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a.add_argument("--out", type=common.user_path, default=None, help="also write the JSON here")
    a.add_argument("--no-save", action="store_true", help="do not store the ranking in the cache")
    p.set_defaults(func=lambda args: _run_target(args, p))


def _run_target(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.bench_target == "attention":
        return run_attention(args)
    parser.print_help()
    return 0


def run_attention(args: argparse.Namespace) -> int:
    setup = hardware_setup(args)
    result = bench_attention(setup, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


def bench_attention(setup: HardwareSetup, args: argparse.Namespace) -> dict:
    """Time the backends; returns the JSON-ready result (and saves the ranking unless told not to)."""
    for flag, value in (
        ("--seq", args.seq),
        ("--kv-seq", args.kv_seq),
        ("--heads", args.heads),
        ("--head-dim", args.head_dim),
        ("--batch", args.batch),
        ("--runs", args.runs),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive integer, not {value}.")
    if args.warmup is not None and args.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or a positive integer, not {args.warmup}.")
    hw, d = setup.probe, setup.dispatcher
    device = d.probe_device()
    if device is None:
        raise ConfigError(
            f"Cannot time an emulated {hw.device_name} on a machine without that device; "
            "drop --emulate to time this machine."
        )
    on_gpu = device.type == "cuda"
    seq = args.seq if args.seq is not None else (DEFAULT_JOB.tokens if on_gpu else CPU_DEFAULT_SEQ)
    kv_seq = args.kv_seq if args.kv_seq is not None else seq
    warmup = args.warmup if args.warmup is not None else (2 if on_gpu else 1)
    runs = args.runs if args.runs is not None else (7 if on_gpu else 3)
    dtype = setup.precision.compute
    call = d.call_on_probe(dtype, seq, kv_seq, heads=args.heads, head_dim=args.head_dim, batch=args.batch)

    asked = [n.strip() for n in args.backends.split(",") if n.strip()] if args.backends else []
    unknown = [n for n in asked if n not in d.registry]
    if unknown:
        raise ConfigError(
            f"Unknown attention backend {unknown[0]!r}; choose from: {', '.join(d.registry.names())}."
        )
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(args.batch, seq, args.heads, args.head_dim, generator=gen).to(device, dtype)
    k = torch.randn(args.batch, kv_seq, args.heads, args.head_dim, generator=gen).to(device, dtype)
    v = torch.randn(args.batch, kv_seq, args.heads, args.head_dim, generator=gen).to(device, dtype)
    input_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))

    rows, reference = [], None
    for name in asked or d.order:
        # Lossy kernels and names asked for are timed too; only the math budget guards the default list.
        auto = name not in asked and d.registry[name].exact
        selection, cand = d.selection_for(name, call, device, auto=auto)
        row = {
            "name": name,
            "selected": False,
            "kernel_dtype": None,
            "inner": None,
            "ms": None,
            "tflops": None,
            "peak_bytes": None,
            "peak_mib": None,
            "max_abs_diff": None,
            "status": "skipped",
            "reason": cand.reason,
        }
        if selection is None:
            rows.append(row)
            continue
        row.update(kernel_dtype=dtype_name(selection.kernel_dtype), inner=selection.inner)
        try:
            with torch.no_grad():
                out = d.run_selection(selection, q, k, v)
                for _ in range(warmup):
                    d.run_selection(selection, q, k, v)
                ms = _time_ms(lambda s=selection: d.run_selection(s, q, k, v), runs, on_gpu)
                peak = (
                    _peak_bytes(lambda s=selection: d.run_selection(s, q, k, v), input_bytes)
                    if on_gpu
                    else None
                )
        except torch.OutOfMemoryError:
            row.update(status="out of memory", reason="ran out of memory at this shape.")
            _free(on_gpu)
            rows.append(row)
            continue
        except Exception as err:
            row.update(status="failed", reason=f"raised {type(err).__name__}: {str(err).strip()[:200]}")
            rows.append(row)
            continue
        if reference is None:
            reference = out
            row["max_abs_diff"] = 0.0
        else:
            row["max_abs_diff"] = (out.float() - reference.float()).abs().max().item()
        del out
        row.update(
            status="ok",
            ms=ms,
            tflops=call.flops / (ms * 1e-3) / 1e12,
            peak_bytes=peak,
            peak_mib=None if peak is None else peak / MIB,
        )
        rows.append(row)

    result = {
        "device": hw.device_name,
        "device_key": device_key(hw),
        "sm": hw.sm,
        "emulated": hw.emulated,
        "physical_device": hw.physical_device_name,
        "memory_cap_gib": hw.total_memory / GIB if hw.emulated and on_gpu else None,
        "torch": hw.torch_version,
        "torch_cuda": hw.torch_cuda_version,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "shape": {
            "batch": args.batch,
            "q_len": seq,
            "kv_len": kv_seq,
            "heads": args.heads,
            "head_dim": args.head_dim,
        },
        "dtype": dtype_name(dtype),
        "flops": call.flops,
        "warmup": warmup,
        "runs": runs,
        "timing": "CUDA events, median" if on_gpu else "perf_counter, median",
        "selected": None,
        "ranking": d.ranking_source,
        "results": rows,
        "saved_to": None,
        "notes": [],
    }
    measured = {r["name"]: r["ms"] for r in rows if r["status"] == "ok"}
    chooser = d
    if measured and not hw.emulated and not args.no_save:
        meta = {"date": result["date"], "dtype": result["dtype"], "shape": result["shape"]}
        result["saved_to"] = str(save_measured(hw, measured, meta))
        # From now on the dispatcher ranks by these times: mark what it selects with them.
        chooser = Dispatcher(hw, forced=d.forced, allow_lossy=d.allow_lossy, registry=d.registry,
                             math_budget_bytes=d.math_budget_bytes, chunk_budget_bytes=d.chunk_budget_bytes,
                             measured_ms=measured, smoke_tests=d.smoke_tests)  # fmt: skip
        result["ranking"] = "measured just now"
    try:
        result["selected"] = chooser.select(call, device).backend
    except AttentionUnavailableError:
        pass
    for row in rows:
        row["selected"] = row["name"] == result["selected"]
    fallbacks = [b.name for b in d.registry if b.role == "fallback"]
    result["notes"] = _ranking_notes(result["selected"], measured, fallbacks)
    return result


def _ranking_notes(selected: str | None, measured: dict[str, float], fallbacks: list[str]) -> list[str]:
    """Why a fallback that measured faster than the selected fused kernel is still not selected."""
    if selected is None or selected in fallbacks or selected not in measured:
        return []
    faster = [n for n in fallbacks if n in measured and measured[n] < measured[selected]]
    return [
        f"{name} measured faster than {selected} at this shape ({measured[name]:.2f} vs "
        f"{measured[selected]:.2f} ms), but the fallbacks rank after every fused kernel: their cost "
        "grows faster with the sequence length, and one shape does not tell a whole job's."
        for name in faster
    ]


def _time_ms(fn, runs: int, on_gpu: bool) -> float:
    times = []
    for _ in range(runs):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_bytes(fn, input_bytes: int) -> int:
    """What one call needs at its peak: its inputs plus everything it allocates."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before + input_bytes
    del out
    return peak


def _free(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.empty_cache()


def format_table(result: dict) -> str:
    s = result["shape"]
    where = result["device"] + (f" (emulated on {result['physical_device']})" if result["emulated"] else "")
    cap = f", memory capped at {result['memory_cap_gib']:.1f} GiB" if result["memory_cap_gib"] else ""
    lines = [
        f"attention on {where}{cap}, torch {result['torch']}, {result['date']}",
        f"B={s['batch']} Lq={s['q_len']} Lk={s['kv_len']} H={s['heads']} D={s['head_dim']}, {result['dtype']}, "
        f"{result['timing']} of {result['runs']}",
        "",
        f"  {'backend':<24}{'dtype':<10}{'ms':>10}{'TFLOP/s':>10}{'peak MiB':>11}{'max|diff|':>11}  status",
    ]
    for r in result["results"]:
        name = r["name"] + (f"[{r['inner']}]" if r["inner"] else "") + (" *" if r["selected"] else "")
        if r["status"] == "ok":
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
            lines.append(
                f"  {name:<24}{r['kernel_dtype']:<10}{r['ms']:>10.2f}{r['tflops']:>10.2f}{peak:>11}"
                f"{r['max_abs_diff']:>11.2g}  ok"
            )
        else:
            lines.append(
                f"  {name:<24}{'':<10}{'':>10}{'':>10}{'':>11}{'':>11}  {r['status']}: {r['reason']}"
            )
    lines.append("")
    lines.append(
        f"  * selected for this call (ranking: {result['ranking']}).  max|diff| is against the first "
        "backend that ran."
    )
    lines += [f"  {note}" for note in result["notes"]]
    if result["emulated"]:
        lines.append("  Speed is not emulated: times are this card's; the ranking was not saved.")
    elif result["saved_to"]:
        lines.append(f"  Ranking saved to {result['saved_to']}.")
    return "\n".join(lines)
