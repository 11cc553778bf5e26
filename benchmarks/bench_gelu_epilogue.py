"""The FFN's GELU inside ffn.0's GEMM (Plan.ffn_gelu_epilogue) against the GELU as a pass of its own.

    PYTHONPATH=/tmp/site:src python3 benchmarks/bench_gelu_epilogue.py --out $OUT/gelu_epilogue.json
    python3 benchmarks/bench_gelu_epilogue.py --dry-run        # CPU, tiny model: the script's logic only

1. The smoke test on this device (wanfit.runtime.gemm_epilogue).
2. ffn.0 + GELU alone at real shapes (1.3B 1536 -> 8960 at 32,760 and 65,520 rows, 14B 5120 -> 13824 at
   32,760), bf16: the GEMM then the GELU in place (what the blocks ran before) against one GEMM with the
   GELU epilogue; CUDA-event medians, and each one's relative L2 against fp32 math. With --lora-rank,
   the runtime LoRA branch on ffn.0 too: as LowRankBranch runs it (up-projection, base GEMM adding into
   it) then the GELU, against one K-concatenated GEMM [x | x A^T] @ [W | B]^T with the epilogue.
3. Whole 1.3B DiT forwards (random weights, eager, the fused elementwise kernels where they run, the
   process's attention choice) with the epilogue off and on, batch 1 and 2, alternated round by round
   so drift hits both; diffusers' eager forward on the same weights in the same process beside them.
   With --compile, the compiled blocks off and on (batch 1).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import wanfit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_dit import (  # noqa: E402
    TINY,
    cuda_or_exit,
    latent_shape,
    make_diffusers_model,
    time_forward,
    wanfit_from_diffusers,
)

from wanfit.models.configs import WAN_T2V_1_3B  # noqa: E402
from wanfit.models.dit import gelu_linear  # noqa: E402
from wanfit.plan.plan import Plan  # noqa: E402
from wanfit.runtime import fused_elementwise, gemm_epilogue  # noqa: E402
from wanfit.runtime.placement import DiTPlacement  # noqa: E402

FFN_SHAPES = {"1.3B": (32760, 1536, 8960), "1.3B_b2": (65520, 1536, 8960), "14B": (32760, 5120, 13824)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--layers", type=int, default=None, help="DiT blocks (default: all 30)")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds of the forward pair")
    p.add_argument("--runs", type=int, default=3, help="timed forwards per variant and round")
    p.add_argument("--ffn-runs", type=int, default=20)
    p.add_argument("--lora-rank", type=int, default=64, help="0: no LoRA rows in the FFN part")
    p.add_argument("--compile", action="store_true", help="also the compiled blocks, off and on")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script only")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def events_ms(fn, device, runs: int) -> float:
    """Median ms of fn() over `runs` after two untimed calls (CUDA events; wall time on the CPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def ffn_part(device, dtype, shapes: dict, runs: int, rank: int) -> dict:
    out = {}
    for name, (rows, dim, hidden) in shapes.items():
        out[name] = ffn_row(device, dtype, rows, dim, hidden, runs, rank)
        print(f"ffn {name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
    return out


def ffn_row(device, dtype, rows: int, dim: int, hidden: int, runs: int, rank: int) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, dim, generator=gen).to(device, dtype)
    w = (torch.randn(hidden, dim, generator=gen) / dim**0.5).to(device, dtype)
    b = (0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)

    def apart():
        y = F.linear(x, w, b)
        return torch.ops.aten.gelu_(y, approximate="tanh")

    def fused():
        return gelu_linear(x, w, b)

    want = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    row = {
        "apart_ms": events_ms(apart, device, runs),
        "epilogue_ms": events_ms(fused, device, runs),
        "apart_rel_l2": rel_l2(apart(), want),
        "epilogue_rel_l2": rel_l2(fused(), want),
    }
    del want
    if rank:
        down = (torch.randn(rank, dim, generator=gen) / dim**0.5).to(device, dtype)
        up = (0.05 * torch.randn(hidden, rank, generator=gen)).to(device, dtype)
        wide_w = torch.cat([w, up], dim=1)  # [hidden, dim + rank]
        wide_x = torch.empty(rows, dim + rank, device=device, dtype=dtype)

        def branch_apart():  # as wanfit.runtime.lora.LowRankBranch, then the GELU
            h = F.linear(x, down)
            y = torch.addmm(b, h, up.t())
            y.addmm_(x, w.t())
            return torch.ops.aten.gelu_(y, approximate="tanh")

        def branch_concat():  # x copied beside its down-projection, one GEMM with the epilogue
            wide_x[:, :dim].copy_(x)
            torch.mm(x, down.t(), out=wide_x[:, dim:])
            return gelu_linear(wide_x, wide_w, b)

        def branch_concat_written():  # as if x's producer wrote it into the wide buffer
            torch.mm(wide_x[:, :dim], down.t(), out=wide_x[:, dim:])
            return gelu_linear(wide_x, wide_w, b)

        want = F.gelu(
            F.linear(x.float(), w.float(), b.float())
            + F.linear(F.linear(x.float(), down.float()), up.float()),
            approximate="tanh",
        )
        row.update(
            lora_rank=rank,
            lora_apart_ms=events_ms(branch_apart, device, runs),
            lora_concat_ms=events_ms(branch_concat, device, runs),
            lora_concat_written_ms=events_ms(branch_concat_written, device, runs),
            lora_apart_rel_l2=rel_l2(branch_apart(), want),
            lora_concat_rel_l2=rel_l2(branch_concat(), want),
        )
        del want, wide_w, wide_x
    return row


def forward_part(args, device, dtype, result: dict) -> None:
    cfg = (
        TINY
        if args.dry_run
        else WAN_T2V_1_3B.with_overrides(num_layers=args.layers or WAN_T2V_1_3B.num_layers)
    )
    grid = (3, 4, 6) if args.dry_run else latent_shape(args.size, args.frames)
    reference = make_diffusers_model(cfg, device, dtype, 0)
    dit = wanfit_from_diffusers(reference, cfg)
    if args.skip_diffusers:
        del reference
        reference = None
    placement = DiTPlacement(dit)
    kernels = fused_elementwise.runtime_failure(str(device)) is None
    compute = str(dtype).removeprefix("torch.")
    plans = {
        "apart": Plan(device=str(device), compute_dtype=compute, fused_elementwise=kernels),
        "epilogue": Plan(
            device=str(device), compute_dtype=compute, fused_elementwise=kernels, ffn_gelu_epilogue=True
        ),
    }
    result["fused_elementwise"] = kernels
    forwards = result.setdefault("forward", {})
    for batch in (1, 2):
        gen = torch.Generator().manual_seed(11)
        x = torch.randn(batch, cfg.in_dim, *grid, generator=gen).to(dtype).to(device)
        t = torch.full((batch,), 937.5, device=device)
        context = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=gen).to(dtype).to(device)
        rounds, outs, peaks = {k: [] for k in plans}, {}, {}
        for _ in range(args.rounds):
            for name, plan in plans.items():
                placement.place(plan)
                timed, outs[name] = time_forward(
                    lambda x=x, t=t, context=context: placement(x.float(), t, context), device, 1, args.runs
                )
                rounds[name].append(timed["median_ms"])
                peaks[name] = timed.get("peak_gib")
        row = {
            name: {"median_ms": statistics.median(ms), "rounds_ms": ms, "peak_gib": peaks[name]}
            for name, ms in rounds.items()
        }
        row["epilogue_over_apart"] = row["epilogue"]["median_ms"] / row["apart"]["median_ms"]
        row["rel_l2_epilogue_vs_apart"] = rel_l2(outs["epilogue"], outs["apart"])
        row["given_up"] = dict(placement.failures)
        if reference is not None and batch == 1:

            def diffusers_call(x=x, t=t, context=context):
                return reference(
                    hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False
                )[0]

            timed, ref_out = time_forward(diffusers_call, device, 1, args.runs * args.rounds)
            row["diffusers_eager"] = {"median_ms": timed["median_ms"], "peak_gib": timed.get("peak_gib")}
            for name in plans:
                row[f"{name}_over_diffusers_eager"] = row[name]["median_ms"] / timed["median_ms"]
                row[f"rel_l2_{name}_vs_diffusers"] = rel_l2(outs[name], ref_out)
        forwards[f"b{batch}"] = row
        print(f"forward b{batch}: {json.dumps(row)}", file=sys.stderr, flush=True)
        save(args, result)
    if args.compile:
        gen = torch.Generator().manual_seed(11)
        x = torch.randn(1, cfg.in_dim, *grid, generator=gen).to(dtype).to(device)
        t = torch.full((1,), 937.5, device=device)
        context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen).to(dtype).to(device)
        row = {}
        for name, plan in plans.items():
            compiled = DiTPlacement(dit, compile_options={"backend": "eager"} if args.dry_run else None)
            compiled.place(replace(plan, compile_dit=True, fused_elementwise=False))
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled(x.float(), t, context)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - t0
            timed, out = time_forward(
                lambda c=compiled: c(x.float(), t, context), device, 1, args.runs * args.rounds
            )
            row[name] = {
                "median_ms": timed["median_ms"],
                "first_call_s": first,
                "peak_gib": timed.get("peak_gib"),
            }
            row[f"out_{name}"] = out
            torch._dynamo.reset()
        row["epilogue_over_apart"] = row["epilogue"]["median_ms"] / row["apart"]["median_ms"]
        row["rel_l2_epilogue_vs_apart"] = rel_l2(row.pop("out_epilogue"), row.pop("out_apart"))
        forwards["compiled_b1"] = row
        print(f"compiled b1: {json.dumps(row)}", file=sys.stderr, flush=True)


def save(args, result: dict) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = {"tiny": (48, 32, 80)}
        args.rounds, args.runs, args.ffn_runs = 1, 1, 2
    else:
        device, dtype, shapes = cuda_or_exit(), torch.bfloat16, FFN_SHAPES
    result = {
        "benchmark": "bench_gelu_epilogue",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "smoke_test": gemm_epilogue.smoke_test(str(device)),
    }
    try:
        import diffusers

        result["diffusers_version"] = diffusers.__version__
    except ImportError:
        args.skip_diffusers = True
    for part, fn in (
        ("ffn", lambda: result.update(ffn=ffn_part(device, dtype, shapes, args.ffn_runs, args.lora_rank))),
        ("forward", lambda: forward_part(args, device, dtype, result)),
    ):
        try:
            with torch.no_grad():
                fn()
        except Exception as err:  # one broken part must not lose the other's figures
            result.setdefault("errors", {})[part] = (
                f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}"
            )
            print(f"{part} FAILED: {err}", file=sys.stderr, flush=True)
        save(args, result)
    print(json.dumps({k: v for k, v in result.items() if k != "ffn"}, indent=1, default=str)[:6000])
    return result


if __name__ == "__main__":
    main()
