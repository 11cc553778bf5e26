"""One DiT prediction and a 10-step denoising job on several GPUs: every parallel plan of the world
size against one GPU, with random weights (issue 18 measures it; this is the script).

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 8 benchmarks/bench_parallel.py --model 14B
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_parallel.py --model 1.3B --layers 4
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_parallel.py --dry-run   # CPU, gloo, tiny

Default videos: 1.3B at 832x480x81 (32,760 tokens), 14B at 1280x720x81 (75,600 tokens). Every
process builds the same random bf16 DiT (same seed) on the GPU of its local rank. One GPU (rank 0
alone, the others waiting) gives the baseline: a guided prediction (cond and uncond batched) and the
10-step loop; then each plan cfg x ulysses = world size runs the same. Reported (JSON on rank 0's
stdout, --out too): ms per guided prediction and per denoising step, speedups over one GPU, the peak
memory of every GPU (torch.cuda.max_memory_allocated) next to the planner's per-GPU estimate of the
DiT forward, and each plan's error against the one-GPU prediction. NCCL_NVLS_ENABLE=0 is required on
the lent H200 hosts (wanfit sets it when absent).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

try:
    import wanfit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wanfit.models.configs import DIT_PRESETS, latent_shape  # noqa: E402
from wanfit.models.dit import WanDiT  # noqa: E402
from wanfit.pipeline import DenoiseState, WanPipeline  # noqa: E402
from wanfit.plan.estimates import Request, estimate_denoise  # noqa: E402
from wanfit.plan.parallel import format_parallel, parallel_overrides, ulysses_degrees  # noqa: E402
from wanfit.plan.plan import Plan  # noqa: E402
from wanfit.runtime.parallel import DiTParallel, session  # noqa: E402
from wanfit.sampling import schedulers  # noqa: E402

SIZES = {"1.3B": "832x480", "14B": "1280x720"}
GUIDANCE = 5.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("1.3B", "14B"), default="1.3B")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 832x480 for 1.3B, 1280x720 for 14B)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--layers", type=int, default=None, help="DiT blocks to keep (default: all)")
    p.add_argument("--steps", type=int, default=10, help="steps of the denoising job")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=3, help="timed guided predictions per plan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="CPU processes on gloo, tiny model: the logic only")
    p.add_argument("--out", default=None, help="also write the JSON here (rank 0)")
    return p.parse_args(argv)


def parallel_plans(world_size: int, heads: int) -> list[tuple[int, int]]:
    """Every (cfg, ulysses) that uses exactly `world_size` processes for a model of `heads` heads."""
    return [
        (c, world_size // c)
        for c in (2, 1)
        if world_size % c == 0 and world_size // c in ulysses_degrees(heads)
    ]


def build_dit(config, device: torch.device, dtype: torch.dtype, seed: int) -> WanDiT:
    """Random weights made directly in `dtype` on `device` (a 14B DiT in fp32 would not fit first)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            dit = WanDiT(config)
    finally:
        torch.set_default_dtype(default)
    return dit.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, runs: int, together: bool) -> tuple[list[float], object]:
    """ms of each timed call (together: a barrier before each, so that every process starts at once)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(runs):
        if together:
            dist.barrier()
        sync(device)
        started = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - started) * 1000)
    return times, out


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure(pipe: WanPipeline, inputs: dict, args, device: torch.device) -> dict:
    """A guided prediction and the denoising job under the pipeline's plan and parallel setting."""
    latents, t, cond, uncond = inputs["latents"], inputs["t"], inputs["cond"], inputs["uncond"]
    together = pipe.parallel is not None
    pipe.make_scheduler(8.0)  # its one-off imports stay out of the job's time
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        times, noise = timed(
            lambda: pipe.predict_noise(latents, t, cond, uncond, GUIDANCE),
            device,
            args.warmup,
            args.runs,
            together,
        )

        def job():
            scheduler = pipe.make_scheduler(8.0)
            timesteps = schedulers.set_timesteps(scheduler, args.steps, official=True, device=device)
            state = DenoiseState(latents.clone(), 0)
            return pipe.denoise(state, scheduler, timesteps, cond, uncond, GUIDANCE, progress=False)

        job_times, _ = timed(job, device, 0, 1, together)
    return {
        "prediction_ms": statistics.median(times),
        "prediction_runs_ms": times,
        "step_ms": job_times[0] / args.steps,
        "job_s": job_times[0] / 1000,
        "peak_gib": peak_gib(device),
        "noise": noise,
    }


def gather_peaks(value: float | None, world_size: int) -> list:
    if world_size == 1:
        return [value]
    peaks = [None] * world_size
    dist.all_gather_object(peaks, value)
    return peaks


def run(args: argparse.Namespace, current) -> dict | None:
    if args.dry_run:
        config = DIT_PRESETS["tiny"]
        device, dtype = torch.device("cpu"), torch.float32
        width, height, frames = 64, 48, 9
        args.warmup, args.runs, args.steps = 0, 1, 2
    else:
        if not str(current.device or "").startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(
                "No CUDA device: this benchmark needs GPUs (--dry-run checks the script on the CPU)."
            )
        config = DIT_PRESETS[args.model]
        if args.layers:
            config = config.with_overrides(num_layers=args.layers)
        device, dtype = torch.device(current.device or "cuda"), torch.bfloat16
        width, height = (int(v) for v in (args.size or SIZES[args.model]).split("x"))
        frames = args.frames
    world = current.world_size
    dit = build_dit(config, device, dtype, args.seed)
    gen = torch.Generator("cpu").manual_seed(args.seed + 1)
    shape = latent_shape(1, config.in_dim, height, width, frames)
    latents = torch.randn(shape, generator=gen).to(device)
    context = torch.randn(2, config.text_len, config.text_dim, generator=gen).to(device, dtype)
    inputs = {
        "latents": latents,
        "t": torch.tensor(937.5, device=device),
        "cond": context[:1],
        "uncond": context[1:],
    }
    request = Request(config, height=height, width=width, num_frames=frames, model_name=args.model)
    base_plan = Plan(device=str(device), compute_dtype=str(dtype).removeprefix("torch."))
    backend = "sdpa_flash" if device.type == "cpu" else "sdpa_cudnn"

    # One GPU: rank 0 alone; the others wait at the barrier.
    baseline = None
    if current.rank == 0:
        baseline = measure(WanPipeline(dit, None, None, plan=base_plan), inputs, args, device)
        baseline["estimate_gib"] = estimate_denoise(request, base_plan, backend, others=False).peak / 2**30
    if current.is_parallel:
        dist.barrier()

    results = []
    for cfg, ulysses in parallel_plans(world, config.num_heads) if world > 1 else []:
        plan = replace(base_plan, **parallel_overrides(cfg, ulysses))
        pipe = WanPipeline(dit, None, None, plan=plan)
        pipe.parallel = DiTParallel(current.groups(cfg, ulysses), current.rank)
        measured = measure(pipe, inputs, args, device)
        pipe.parallel.detach(dit)
        peaks = gather_peaks(measured["peak_gib"], world)
        if current.rank == 0:
            noise = measured.pop("noise")
            expected = baseline["noise"]
            results.append(
                {
                    "parallel": format_parallel(cfg, ulysses),
                    **measured,
                    "speedup_prediction": baseline["prediction_ms"] / measured["prediction_ms"],
                    "speedup_step": baseline["step_ms"] / measured["step_ms"],
                    "peak_gib_per_gpu": peaks,
                    "estimate_gib_per_gpu": estimate_denoise(request, plan, backend, others=False).peak
                    / 2**30,
                    "rel_error_vs_one_gpu": ((noise - expected).abs().max() / expected.abs().max()).item(),
                }
            )
    if current.rank != 0:
        return None
    baseline.pop("noise")
    return {
        "benchmark": "bench_parallel",
        "world_size": world,
        "backend": current.backend,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": "tiny" if args.dry_run else args.model,
        "config": config.to_dict(),
        "video": [width, height, frames],
        "tokens": request.tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "guidance": GUIDANCE,
        "one_gpu": baseline,
        "plans": results,
    }


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    with session("cpu" if args.dry_run else None) as current:
        result = run(args, current)
    if result is not None:
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
