"""VAE decode: wanfit's WanVAE vs diffusers' AutoencoderKLWan with the same random weights.

    PYTHONPATH=/tmp/site python3 benchmarks/bench_vae.py --out $OUT/bench_vae.json
    python3 benchmarks/bench_vae.py --dtypes bf16,fp32 --out $OUT/bench_vae.json   # both dtypes
    python3 benchmarks/bench_vae.py --frames 21 --size 416x240                       # shorter
    python3 benchmarks/bench_vae.py --dry-run                                        # CPU, tiny: logic only

Real Wan2.1 VAE config, random weights (diffusers' initialisation, converted to official names
with wanfit's converter), a random latent [1, 16, 1 + (F-1)/4, H/8, W/8]. Rows: diffusers untiled
and with enable_tiling() (its defaults), wanfit untiled and tiled (--tiles, cores in latent pixels),
in each --layouts memory layout. Only the model being timed is on the card. Times are CUDA-event
medians after warm-up; peak is torch.cuda.max_memory_allocated over one decode, weights (0.24 GiB
in bf16, 0.47 GiB in fp32, encoder included) and output included. Errors are relative L2 against
diffusers' untiled output of the same dtype. The official code decodes in fp32 (its VAE wrapper
runs under autocast(float32)); diffusers' examples load the VAE in fp32 too.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch

try:
    import wanfit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wanfit.models.vae import WAN21_VAE, WAN_VAE_TINY, VAEConfig, WanVAE  # noqa: E402
from wanfit.precision import dtype_name as canonical_name  # noqa: E402
from wanfit.precision import parse_dtype  # noqa: E402
from wanfit.weights.vae_keys import diffusers_to_official  # noqa: E402

GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="832x480", help="video WIDTHxHEIGHT (multiples of 8)")
    p.add_argument("--frames", type=int, default=81, help="video frames (4k+1)")
    p.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp16, fp32")
    p.add_argument(
        "--tiles", default="60x52,60x35,30x52", help="wanfit tile cores, ROWSxCOLS in latent pixels"
    )
    p.add_argument("--layouts", default="contiguous,channels_last", help="wanfit memory layouts to time")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune (both models)")
    p.add_argument(
        "--no-fp32-reference", action="store_true", help="skip the fp32 decode errors are measured against"
    )
    p.add_argument("--skip-diffusers", action="store_true", help="time wanfit only (random weights)")
    p.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny model and latent: checks the script only"
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def latent_shape(size: str, frames: int, cfg: VAEConfig) -> tuple[int, ...]:
    width, height = (int(v) for v in size.lower().split("x"))
    s = cfg.spatial_stride
    if width % s or height % s or (frames - 1) % cfg.temporal_stride:
        raise SystemExit(f"--size must be multiples of {s} and --frames 4k+1 (got {size}, {frames}).")
    return (1, cfg.z_dim, cfg.latent_frames(frames), height // s, width // s)


def make_models(cfg: VAEConfig, dtype: torch.dtype, seed: int, with_diffusers: bool):
    """(diffusers model or None, wanfit model) on the CPU, sharing the same random weights."""
    torch.manual_seed(seed)
    ref = None
    if with_diffusers:
        from diffusers import AutoencoderKLWan

        ref = AutoencoderKLWan(
            base_dim=cfg.base_dim,
            z_dim=cfg.z_dim,
            dim_mult=list(cfg.dim_mult),
            num_res_blocks=cfg.num_res_blocks,
            temperal_downsample=list(cfg.temperal_downsample),
            latents_mean=list(cfg.latents_mean),
            latents_std=list(cfg.latents_std),
        ).eval()
        ref.requires_grad_(False)
        ours = WanVAE(cfg).eval()
        state = {diffusers_to_official(k, cfg.num_res_blocks): v for k, v in ref.state_dict().items()}
        ours.load_state_dict(state, strict=True)
        ref.to(dtype)
    else:
        ours = WanVAE(cfg).eval()
    ours.requires_grad_(False)
    return ref, ours.to(dtype)


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def measure(self, fn, warmup: int, runs: int) -> tuple[float, float | None, list[float], torch.Tensor]:
        """(median seconds, peak bytes or None, all times, last output)."""
        for _ in range(warmup):
            out = fn()
            del out
        times, peak = [], None
        for _ in range(runs):
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                stop.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(stop) / 1000)
                peak = max(peak or 0, torch.cuda.max_memory_allocated())
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
            if len(times) < runs:
                del out
        return statistics.median(times), peak, times, out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


class Rows:
    """Times one decode function after another and records a row for each."""

    def __init__(self, args, timer: Timer, results: dict):
        self.args, self.timer, self.results = args, timer, results
        self.baseline: torch.Tensor | None = None  # first output of the dtype
        self.truth: torch.Tensor | None = None  # fp32 output, for the accuracy of lower precisions

    def add(self, impl: str, dtype: str, mode: str, layout: str, fn, extra: dict | None = None) -> None:
        row = {"impl": impl, "dtype": dtype, "mode": mode, "layout": layout, **(extra or {})}
        try:
            median, peak, times, out = self.timer.measure(fn, self.args.warmup, self.args.runs)
            out = out.float().cpu()
            row.update(seconds=median, times=times, peak_gib=peak / GIB if peak is not None else None)
            if self.baseline is None:
                self.baseline = out
                row["saturated"] = out.abs().ge(0.999).float().mean().item()
            row["rel_err"] = rel_l2(out, self.baseline)
            row["max_abs_err"] = (out - self.baseline).abs().max().item()
            if self.truth is not None:
                row["rel_err_vs_fp32"] = rel_l2(out, self.truth)
        except Exception as err:  # keep going: one failing row must not lose the others
            row["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        self.results["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)


def run(args) -> dict:
    cfg = WAN_VAE_TINY if args.dry_run else WAN21_VAE
    if args.dry_run:
        args.size, args.frames, args.runs, args.warmup, args.tiles = "16x24", 5, 1, 0, "2x2"
        torch.set_num_threads(1)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    shape = latent_shape(args.size, args.frames, cfg)
    with_diffusers = not args.skip_diffusers
    if with_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers is not importable: timing wanfit only", file=sys.stderr)
            with_diffusers = False

    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cudnn_benchmark": args.cudnn_benchmark,
        "latent_shape": list(shape),
        "video": f"{args.size} x {args.frames} frames",
        "runs": args.runs,
        "rows": [],
    }
    if with_diffusers:
        import diffusers

        results["diffusers"] = diffusers.__version__
    rows = Rows(args, Timer(device), results)
    torch.manual_seed(args.seed + 1)
    latent = torch.randn(shape)

    dtypes = args.dtypes.split(",")
    if dtypes != ["fp32"] and not args.no_fp32_reference:
        # One untiled fp32 decode (diffusers' if present) as the accuracy reference of every row.
        ref, ours = make_models(cfg, torch.float32, args.seed, with_diffusers)
        model = (ref or ours).to(device)
        with torch.no_grad():
            out = (
                ref.decode(latent.to(device), return_dict=False)[0] if ref else ours.decode(latent.to(device))
            )
        rows.truth = out.float().cpu()
        del model, out, ref, ours
        _free(device)

    for dtype_name in dtypes:
        dtype = parse_dtype(dtype_name)
        ref, ours = make_models(cfg, dtype, args.seed, with_diffusers)
        z = latent.to(device, dtype)
        rows.baseline = None
        if ref is not None:
            ref.to(device)
            ref.disable_tiling()
            rows.add("diffusers", dtype_name, "untiled", "contiguous", partial(_diffusers_decode, ref, z))
            ref.enable_tiling()
            rows.add(
                "diffusers", dtype_name, "enable_tiling()", "contiguous", partial(_diffusers_decode, ref, z)
            )
            ref.to("cpu")
            _free(device)
        ours.to(device)
        for layout in args.layouts.split(","):
            ours.use_channels_last(layout == "channels_last")
            modes = [None] + [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",") if t]
            for tile in modes:
                tiles = len(ours.plan_tiles(shape[-2:], tile))
                mode = "untiled" if tile is None else f"tile {tile[0]}x{tile[1]} ({tiles} tiles)"
                extra = {"estimate_gib": planner_estimate(cfg, shape, tile, dtype_name) / GIB}
                rows.add("wanfit", dtype_name, mode, layout, partial(ours.decode, z, tile=tile), extra)
        ours.to("cpu")
        del ref, ours, z
        _free(device)
    return results


def _diffusers_decode(model, z: torch.Tensor) -> torch.Tensor:
    return model.decode(z, return_dict=False)[0]


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def planner_estimate(cfg: VAEConfig, shape: tuple[int, ...], tile, dtype_name: str) -> int:
    """The memory planner's predicted peak of this decode, the VAE's weights included."""
    from wanfit.models.configs import WAN_T2V_1_3B
    from wanfit.plan.estimates import Request, estimate_vae_decode
    from wanfit.plan.plan import Plan

    _, _, frames, h, w = shape
    s = cfg.spatial_stride
    request = Request(WAN_T2V_1_3B, height=h * s, width=w * s, num_frames=cfg.video_frames(frames), vae=cfg)
    plan = Plan(compute_dtype=canonical_name(parse_dtype(dtype_name)), vae_tile=tile)
    return estimate_vae_decode(request, plan, "sdpa_flash", others=False).peak


def table(results: dict) -> str:
    rows = results["rows"]
    reference = {
        r["dtype"]: r["seconds"]
        for r in rows
        if r["impl"] == "diffusers" and r["mode"] == "untiled" and "seconds" in r
    }
    lines = [
        f"VAE decode, {results['video']}, latent {results['latent_shape']}, {results['device']}",
        f"{'impl':9} {'dtype':5} {'layout':13} {'mode':26} {'time s':>7} {'x diff':>6} {'peak GiB':>8} "
        f"{'est GiB':>7} {'rel err':>8} {'vs fp32':>8}",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"{r['impl']:9} {r['dtype']:5} {r['layout']:13} {r['mode']:26} FAILED {r['error'][:60]}"
            )
            continue
        ratio = r["seconds"] / reference[r["dtype"]] if r["dtype"] in reference else float("nan")
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        est = f"{r['estimate_gib']:.2f}" if "estimate_gib" in r else "-"
        truth = f"{r['rel_err_vs_fp32']:8.1e}" if "rel_err_vs_fp32" in r else f"{'-':>8}"
        lines.append(
            f"{r['impl']:9} {r['dtype']:5} {r['layout']:13} {r['mode']:26} {r['seconds']:7.3f} {ratio:6.2f} "
            f"{peak:>8} {est:>7} {r['rel_err']:8.1e} {truth}"
        )
    lines.append(
        "x diff: time / diffusers untiled (same dtype); est GiB: the memory planner's prediction (weights "
        "included); rel err: vs the first row of the dtype; vs fp32: vs an untiled fp32 decode."
    )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
