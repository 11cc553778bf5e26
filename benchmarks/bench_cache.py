"""Step caches on the GPU: the cost of a computed step, the whole job with MagCache, diffusers' hook.

    PYTHONPATH=/tmp/site:src python3 benchmarks/bench_cache.py --out $OUT/bench_cache.json
    python3 benchmarks/bench_cache.py --steps 20 --skip-diffusers      # shorter
    python3 benchmarks/bench_cache.py --tiny                           # CPU, tiny models: logic only

Real Wan2.1 T2V-1.3B shapes (DiT, VAE, umT5-XXL; 832x480x81 is 32,760 tokens), random bf16 weights
shared by wanfit and diffusers (bench_pipeline.build_models), 50 steps, guidance 5. Random weights
make a threshold-driven policy's skip count meaningless, so this measures what does not depend on
them:
  (a) step_cost: one computed step (cond and uncond, as the plan batches them) with each policy at
      threshold 0 (it does all its bookkeeping, keeps its residuals and never skips) against no
      cache: the overhead, goal under 1%;
  (b) job: the whole job (text encoding, 50 steps, VAE decode) with MagCache on its published 1.3B
      ratios at the README's settings (threshold 0.12, K 4, retention 0.2), a schedule that does not
      depend on the weights, against no cache: goal at least 2x; plus PSNR/SSIM of the cached frames
      against the uncached ones (of random weights: a smoke check, not a quality figure);
  (c) diffusers: its WanPipeline on the same weights and latents, without a cache and with its own
      MagCache hook (MagCacheConfig) at the same settings and the same (cond) ratios.
Prints the results as JSON (and writes them to --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import wanfit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_pipeline import (  # noqa: E402
    build_models,
    finish,
    job_header,
    run_diffusers,
    run_wanfit,
    stage,
    wanfit_plan,
)

# Each policy at threshold 0, with the published tables named (they also serve a --layers model).
BOOKKEEPING = {
    "teacache": "teacache:0,coefficients=1.3B",
    "magcache": "magcache:0,ratios=1.3B",
    "easycache": "easycache:0",
    "firstblock": "firstblock:0",
}
MAGCACHE = "magcache,ratios=1.3B"  # the README's E012K4R02 for T2V-1.3B (wanfit's default for it)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--layers", type=int, default=None, help="DiT blocks (default: all 30)")
    p.add_argument("--text-layers", type=int, default=None, help="umT5 blocks (default: all 24)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before (a)'s timed ones")
    p.add_argument("--runs", type=int, default=5, help="timed steps per policy in (a)")
    p.add_argument("--skip-job", action="store_true", help="only (a)")
    p.add_argument("--skip-diffusers", action="store_true", help="no (c)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="force a plan setting for wanfit")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models, 12 steps: checks the script")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.dry_run = args.tiny  # bench_pipeline's name for the tiny CPU models
    if args.tiny:
        args.size, args.frames, args.steps, args.warmup, args.runs = "64x48", 5, 12, 1, 2
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_cost(pipe, args, device, specs: dict) -> dict:
    """(a): median seconds of one computed step per policy (threshold 0) and without a cache."""
    from dataclasses import replace

    from wanfit.pipeline import latent_shape
    from wanfit.plan.estimates import Request, step_cache_bytes
    from wanfit.sampling.step_cache import build

    width, height = (int(v) for v in args.size.split("x"))
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(latent_shape(1, 16, height, width, args.frames), generator=gen).to(device)
    cfg = pipe.dit.config
    dtype = pipe.plan.torch_compute_dtype
    cond, uncond = (torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen).to(device, dtype) for _ in "cu")
    t = torch.tensor(900.0, device=device)
    # Steps from 10 on: past every policy's always-computed first steps, so each one decides.
    first = 10
    out = {}
    with torch.no_grad():  # warm the kernels up before the first (uncached) timing
        for _ in range(args.warmup):
            pipe.predict_noise(latents, t, cond, uncond, args.guidance)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for name, spec in {"none": None, **specs}.items():
        cache = None if spec is None else build(spec, cfg, args.steps)
        times = []
        with torch.no_grad():
            for i in range(args.warmup + args.runs):
                sync(device)
                start = time.perf_counter()
                pipe.predict_noise(
                    latents, t, cond, uncond, args.guidance, cache, first + i % (args.steps - first - 1)
                )
                sync(device)
                times.append(time.perf_counter() - start)
        timed = times[args.warmup :]
        out[name] = {"median_s": statistics.median(timed), "min_s": min(timed), "runs_s": timed}
        if device.type == "cuda":  # the step's peak, with the cache's residuals held
            out[name]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        if spec is not None:  # what the planner counts for them
            request = Request(
                cfg, height=height, width=width, num_frames=args.frames, guidance=args.guidance != 1.0
            )
            out[name]["held_gib_estimated"] = (
                step_cache_bytes(request, replace(pipe.plan, cache=spec)) / 2**30
            )
        if cache is not None:
            assert not any(cache.skipped().values()), "threshold 0 must compute every step"
    base = out["none"]["median_s"]
    for name in specs:
        out[name]["overhead_pct"] = 100 * (out[name]["median_s"] / base - 1)
    return out


def save_partial(result: dict, out: str | None) -> None:
    """What is measured so far, so a run cut off at its limit keeps it."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({**result, "partial": True}, indent=2, default=str))


def replace_overrides(args: argparse.Namespace, *more: str) -> argparse.Namespace:
    """args with more --set items."""
    return argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, *more]})


def diffusers_job(parts, args, latents, device, cache_config=None) -> dict:
    """(c): diffusers' whole job, with its cache hook if given; DiT forwards counted on block 0."""
    ref_dit = parts[0]
    calls = []
    hook = ref_dit.blocks[0].attn1.register_forward_pre_hook(lambda *a: calls.append(1))
    if cache_config is not None:
        ref_dit.enable_cache(cache_config)
    try:
        result, frames = run_diffusers(parts, args, latents, device)
    finally:
        hook.remove()
        if cache_config is not None:
            ref_dit.disable_cache()
    streams = 2 if args.guidance != 1.0 else 1
    result["blocks_run"] = len(calls)
    result["skipped_forwards"] = streams * args.steps - len(calls)
    return result, frames


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this benchmark needs a GPU (use --tiny to check the script).")
    else:
        device = torch.device("cuda")
    from wanfit.metrics import compare_videos
    from wanfit.pipeline import WanPipeline, latent_shape
    from wanfit.sampling.step_cache.tables import PUBLISHED_MAG_RATIOS

    stage("building random models")
    diffusers_parts, wanfit_parts, dit_cfg = build_models(args, device)
    stage("models built")
    # Several jobs share one text encoder: keep it (the same for every run, so they compare).
    args.overrides = [*args.overrides, "free_text_encoder=false"]
    plan = wanfit_plan(args, device, dit_cfg, wanfit_parts)
    cached_plan = wanfit_plan(replace_overrides(args, f"cache={MAGCACHE}"), device, dit_cfg, wanfit_parts)
    result = {
        **job_header("bench_cache", args, device),
        "layers": dit_cfg.num_layers,
        "plan": plan.plan.to_dict(),
        "random_weights": True,
    }
    pipe = WanPipeline(*wanfit_parts, plan=plan)
    stage("(a) one computed step, cache on and off")
    result["step_cost"] = step_cost(pipe, args, device, BOOKKEEPING)
    save_partial(result, args.out)
    if args.skip_job:
        return finish(result, args.out)

    width, height = (int(v) for v in args.size.split("x"))
    latents = torch.randn(
        latent_shape(1, 16, height, width, args.frames), generator=torch.Generator().manual_seed(3)
    )
    latents = latents.to(device)
    job = {}
    stage(f"(b) wanfit, {args.steps} steps, no cache")
    job["none"], plain = run_wanfit(wanfit_parts, args, latents, device, plan)
    stage(f"(b) wanfit, {args.steps} steps, {MAGCACHE}")
    job["magcache"], cached = run_wanfit(wanfit_parts, args, latents, device, cached_plan)
    job["magcache"]["speedup_total"] = job["none"]["total_s"] / job["magcache"]["total_s"]
    job["magcache"]["speedup_denoise"] = (
        job["none"]["phases_s"]["denoise_s"] / job["magcache"]["phases_s"]["denoise_s"]
    )
    job["magcache"]["frames_vs_uncached"] = compare_videos(cached, plain)
    result["job"] = job
    save_partial(result, args.out)

    if not args.skip_diffusers:
        stage("(c) diffusers, no cache and its MagCache hook")
        from diffusers.hooks import MagCacheConfig

        settings = job["magcache"]["step_cache"]["settings"]
        config = MagCacheConfig(
            threshold=settings["threshold"],
            max_skip_steps=settings["K"],
            retention_ratio=settings["retention"],
            num_inference_steps=args.steps,
            mag_ratios=list(PUBLISHED_MAG_RATIOS["1.3B"].cond),  # one list for both contexts
        )
        theirs = {}
        theirs["none"], plain_d = diffusers_job(diffusers_parts, args, latents, device)
        theirs["magcache"], cached_d = diffusers_job(diffusers_parts, args, latents, device, config)
        theirs["magcache"]["speedup_total"] = theirs["none"]["total_s"] / theirs["magcache"]["total_s"]
        theirs["magcache"]["frames_vs_uncached"] = compare_videos(cached_d, plain_d)
        theirs["wanfit_over_diffusers_cached_time"] = (
            job["magcache"]["total_s"] / theirs["magcache"]["total_s"]
        )
        result["diffusers"] = theirs
    return finish(result, args.out)


if __name__ == "__main__":
    main()
