"""One DiT forward: wanfit's WanDiT vs diffusers' WanTransformer3DModel with the same random weights.

    PYTHONPATH=/tmp/site python3 benchmarks/bench_dit.py --out $OUT/bench_dit.json
    python3 benchmarks/bench_dit.py --layers 4 --size 480x320 --frames 33   # shorter
    python3 benchmarks/bench_dit.py --dry-run                               # CPU, tiny model, logic only
    python3 benchmarks/bench_dit.py --fused-elementwise --skip-diffusers    # + eager with the fused kernels

Real 1.3B config (optionally fewer layers), random bf16 weights, latent 16 x F x H/8 x W/8, context
512 x 4096. diffusers' random model is converted to official names with wanfit's converter and
loaded into wanfit (load_state_dict(assign=True), sharing the tensors). Times are CUDA-event medians
after warm-up; peak memory is torch.cuda.max_memory_allocated over one forward (weights included).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

try:
    import wanfit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wanfit.models.configs import WAN_T2V_1_3B, DiTConfig  # noqa: E402
from wanfit.models.dit import WanDiT  # noqa: E402
from wanfit.weights.dit_keys import diffusers_to_official  # noqa: E402

TINY = DiTConfig(dim=64, ffn_dim=96, freq_dim=32, num_heads=2, num_layers=2, text_dim=32, text_len=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="832x480", help="video WIDTHxHEIGHT (multiples of 16)")
    p.add_argument("--frames", type=int, default=81, help="video frames (4k+1)")
    p.add_argument("--layers", type=int, default=None, help="DiT blocks to keep (default: all 30)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile", action="store_true",
        help="also time wanfit with compiled blocks, and diffusers with compile_repeated_blocks(fullgraph=True)",
    )  # fmt: skip
    p.add_argument(
        "--profile", action="store_true", help="CUDA: one more call of each variant under torch.profiler"
    )
    p.add_argument(
        "--ffn-gelu-in-place", action="store_true",
        help="also time wanfit eager with Plan.ffn_gelu_in_place (the GELU over ffn.0's output)",
    )  # fmt: skip
    p.add_argument(
        "--fused-elementwise", action="store_true",
        help="also time wanfit eager with Plan.fused_elementwise (Triton: LayerNorm+modulate, RMSNorm+RoPE)",
    )  # fmt: skip
    p.add_argument("--skip-diffusers", action="store_true", help="time wanfit only")
    p.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny model and latent: checks the script only"
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def latent_shape(size: str, frames: int) -> tuple[int, int, int]:
    width, height = (int(v) for v in size.lower().split("x"))
    if width % 16 or height % 16 or (frames - 1) % 4:
        raise SystemExit(f"--size must be multiples of 16 and --frames 4k+1 (got {size}, {frames}).")
    return (frames - 1) // 4 + 1, height // 8, width // 8


def make_diffusers_model(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size,
            num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim,
            out_channels=cfg.out_dim,
            text_dim=cfg.text_dim,
            freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers,
            cross_attn_norm=cfg.cross_attn_norm,
            eps=cfg.eps,
        )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # ones/zeros at init: make them matter
                param.add_(0.1 * torch.randn_like(param))
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # its .to() warning: handled just below
    model = model.to(dtype)
    # As from_pretrained(torch_dtype=...) leaves them: diffusers keeps these modules in fp32.
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        if any(part in keep for part in name.split(".")):
            param.data = param.data.float()
    return model.eval()


def wanfit_from_diffusers(reference, cfg: DiTConfig) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(cfg)
    model.load_state_dict(diffusers_to_official(reference.state_dict()), strict=True, assign=True)
    return model.eval()


def random_weights_wanfit(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int) -> WanDiT:
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanDiT(cfg)
    return model.to(dtype).eval()


def cuda_or_exit() -> torch.device:
    """The GPU a benchmark measures on; without one, one line on how to check the script instead."""
    if not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this benchmark needs a GPU (use --dry-run to check the script).")
    return torch.device("cuda")


def time_forward(fn, device: torch.device, warmup: int, runs: int) -> dict:
    """Median ms over `runs` after `warmup`; peak memory of one forward on CUDA."""
    with torch.no_grad():
        for _ in range(warmup):
            out = fn()
        times = []
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        for _ in range(runs):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - t0) * 1000)
    result = {"median_ms": statistics.median(times), "min_ms": min(times), "runs_ms": times}
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_over_start_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return result, out


def time_fused(model: WanDiT, call, device: torch.device, args: argparse.Namespace) -> dict:
    """wanfit eager with the fused elementwise kernels in the blocks' slots, timed as `wanfit` is; the
    slots are cleared after. Off CUDA the kernels run only under TRITON_INTERPRET=1 (else skipped)."""
    import os

    from wanfit.runtime import fused_elementwise

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return {"skipped": "no CUDA device (set TRITON_INTERPRET=1 to run the kernels interpreted)"}
    if device.type == "cuda":
        failure = fused_elementwise.runtime_failure(str(device))
    else:
        failure = None if fused_elementwise.available() else "Triton is not installed"
    if failure is not None:
        return {"skipped": failure}
    fused_elementwise.install(model.blocks)
    try:
        timed, out = time_forward(call, device, args.warmup, args.runs)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=3)}
    finally:
        fused_elementwise.install(model.blocks, None)

    def fused_call():  # for the profiler: the slots set only while it runs
        fused_elementwise.install(model.blocks)
        try:
            return call()
        finally:
            fused_elementwise.install(model.blocks, None)

    return {**timed, "call": fused_call, "out": out}


def run(args: argparse.Namespace) -> dict:
    if args.profile:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from kernel_profile import kernel_profile
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        cfg, grid = TINY, (3, 4, 6)
        args.warmup, args.runs = 1, 2
    else:
        device = cuda_or_exit()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        cfg = WAN_T2V_1_3B.with_overrides(num_layers=args.layers or WAN_T2V_1_3B.num_layers)
        grid = latent_shape(args.size, args.frames)

    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    x = torch.randn(args.batch, cfg.in_dim, *grid, generator=gen).to(dtype).to(device)
    timestep = torch.full((args.batch,), 937.5, device=device)
    context = torch.randn(args.batch, cfg.text_len, cfg.text_dim, generator=gen).to(dtype).to(device)

    result = {
        "benchmark": "bench_dit",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "config": cfg.to_dict(),
        "latent": [args.batch, cfg.in_dim, *grid],
        "tokens": (grid[0] // cfg.patch_size[0])
        * (grid[1] // cfg.patch_size[1])
        * (grid[2] // cfg.patch_size[2]),
        "context": [args.batch, cfg.text_len, cfg.text_dim],
    }

    reference = None
    if not args.skip_diffusers:
        try:
            reference = make_diffusers_model(cfg, device, dtype, args.seed)
            import diffusers

            result["diffusers_version"] = diffusers.__version__
        except Exception as err:  # a missing or broken diffusers must not stop the wanfit timing
            result["diffusers_error"] = f"{type(err).__name__}: {err}"
    model = (
        wanfit_from_diffusers(reference, cfg)
        if reference is not None
        else random_weights_wanfit(cfg, device, dtype, args.seed)
    )
    result["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30

    outputs, calls = {}, {}
    x32 = x.float()  # wanfit keeps latents in fp32; the values are the same bf16-rounded ones
    try:
        calls["wanfit"] = lambda: model(x32, timestep, context)
        result["wanfit"], outputs["wanfit"] = time_forward(calls["wanfit"], device, args.warmup, args.runs)
    except Exception as err:
        result["wanfit"] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=3)}
    if args.fused_elementwise and "wanfit" in outputs:
        result["wanfit_fused"] = time_fused(model, lambda: model(x32, timestep, context), device, args)
        if "median_ms" in result["wanfit_fused"]:
            calls["wanfit_fused"] = result["wanfit_fused"].pop("call")
            outputs["wanfit_fused"] = result["wanfit_fused"].pop("out")
            a, b = outputs["wanfit_fused"].float(), outputs["wanfit"].float()
            result["rel_l2_fused_vs_wanfit"] = ((a - b).norm() / b.norm()).item()
    if args.ffn_gelu_in_place and "wanfit" in outputs:
        from wanfit.runtime.chunking import apply_chunking

        apply_chunking(model.blocks, attention_chunk=None, ffn_chunk=None, ffn_gelu_in_place=True)
        calls["wanfit_gelu_in_place"] = lambda: model(x32, timestep, context)
        result["wanfit_gelu_in_place"], outputs["wanfit_gelu_in_place"] = time_forward(
            calls["wanfit_gelu_in_place"], device, args.warmup, args.runs
        )
        result["gelu_in_place_equal_to_eager"] = bool(
            torch.equal(outputs["wanfit_gelu_in_place"], outputs["wanfit"])
        )
        apply_chunking(model.blocks, attention_chunk=None, ffn_chunk=None, ffn_gelu_in_place=False)
    if args.compile and "wanfit" in outputs:
        from wanfit.runtime.compile import compile_blocks, forward_with

        try:
            compiled = compile_blocks(model.blocks)
            t0 = time.perf_counter()
            with torch.no_grad():
                forward_with(model, compiled, x32, timestep, context)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result["compile_first_call_s"] = time.perf_counter() - t0
            calls["wanfit_compiled"] = lambda: forward_with(model, compiled, x32, timestep, context)
            result["wanfit_compiled"], outputs["wanfit_compiled"] = time_forward(
                calls["wanfit_compiled"], device, args.warmup, args.runs
            )
        except Exception as err:
            result["wanfit_compiled"] = {
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc(limit=3),
            }
    if reference is not None:

        def diffusers_call():
            return reference(
                hidden_states=x, timestep=timestep, encoder_hidden_states=context, return_dict=False
            )[0]

        variants = ["diffusers"] + (["diffusers_compiled"] if args.compile and device.type == "cuda" else [])
        for name in variants:
            try:
                if name == "diffusers_compiled":  # changes the model in place: after its eager runs
                    reference.compile_repeated_blocks(fullgraph=True)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        diffusers_call()
                    torch.cuda.synchronize(device)
                    result["diffusers_compile_first_call_s"] = time.perf_counter() - t0
                result[name], outputs[name] = time_forward(diffusers_call, device, args.warmup, args.runs)
                if args.profile:
                    result.setdefault("profile", {})[name] = kernel_profile(diffusers_call)
            except Exception as err:
                result[name] = {
                    "error": f"{type(err).__name__}: {err}",
                    "trace": traceback.format_exc(limit=3),
                }
    if args.profile:  # wanfit's variants (diffusers' were profiled as they ran: its compile is in place)
        for name in ("wanfit", "wanfit_fused", "wanfit_gelu_in_place", "wanfit_compiled"):
            if name in calls:
                result.setdefault("profile", {})[name] = kernel_profile(calls[name])

    if "wanfit" in outputs and "diffusers" in outputs:
        a, b = outputs["wanfit"].float(), outputs["diffusers"].float()
        result["rel_l2_wanfit_vs_diffusers"] = ((a - b).norm() / b.norm()).item()
        result["speedup_diffusers_over_wanfit"] = (
            result["diffusers"]["median_ms"] / result["wanfit"]["median_ms"]
        )
        if "peak_gib" in result["wanfit"]:
            result["peak_ratio_wanfit_over_diffusers"] = (
                result["wanfit"]["peak_gib"] / result["diffusers"]["peak_gib"]
            )
    return result


def table(result: dict) -> str:
    lines = [
        f"bench_dit on {result['device']} ({result['dtype']}), latent {result['latent']}, "
        f"{result['tokens']} tokens, {result['config']['num_layers']} layers",
        f"{'model':<20} {'median ms':>10} {'min ms':>10} {'peak GiB':>9}",
    ]
    names = ("wanfit", "wanfit_fused", "wanfit_gelu_in_place", "wanfit_compiled", "diffusers", "diffusers_compiled")
    for name in names:
        if name != "wanfit" and name != "diffusers" and name not in result:
            continue
        r = result.get(name)
        if r is None:
            lines.append(f"{name:<20} {'skipped: ' + result.get('diffusers_error', 'not run'):>10}")
        elif "error" in r:
            lines.append(f"{name:<20} error: {r['error'][:100]}")
        elif "skipped" in r:
            lines.append(f"{name:<20} skipped: {r['skipped']}")
        else:
            peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
            lines.append(f"{name:<20} {r['median_ms']:>10.1f} {r['min_ms']:>10.1f} {peak:>9}")
    if "speedup_diffusers_over_wanfit" in result:
        lines.append(
            f"diffusers/wanfit time ratio {result['speedup_diffusers_over_wanfit']:.3f}; "
            f"rel L2 wanfit vs diffusers {result['rel_l2_wanfit_vs_diffusers']:.2e}"
        )
    if "rel_l2_fused_vs_wanfit" in result:
        lines.append(
            f"wanfit/wanfit_fused time ratio "
            f"{result['wanfit']['median_ms'] / result['wanfit_fused']['median_ms']:.3f}; "
            f"rel L2 wanfit_fused vs wanfit {result['rel_l2_fused_vs_wanfit']:.2e}"
        )
    if "wanfit_compiled" in result and "median_ms" in result["wanfit_compiled"] and "diffusers" in result:
        lines.append(
            f"diffusers/wanfit_compiled time ratio "
            f"{result['diffusers']['median_ms'] / result['wanfit_compiled']['median_ms']:.3f}; "
            f"first compiled call {result['compile_first_call_s']:.1f} s"
        )
    for name, prof in (result.get("profile") or {}).items():
        if prof:  # device ms per kernel kind, one profiled call
            kinds = ", ".join(f"{kind} {ms:.1f}" for kind, ms in prof["by_kind_ms"].items())
            lines.append(f"profile {name}: {prof['device_ms']:.1f} ms on the device: {kinds}")
            if prof.get("gaps"):  # the device's idle time inside the call, in long and in all gaps
                lines.append(f"  device timeline {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in prof["gaps"].items()))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
