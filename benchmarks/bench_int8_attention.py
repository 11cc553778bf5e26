"""int8_triton (lossy: int8 Q·K^T, fp8 P·V) beside bf16 cuDNN and flash SDPA, SageAttention, FlashAttention-4
and FlashAttention-3 (bf16, and its fp8 forward as flash_attn3_fp8), on this GPU.

    python3 benchmarks/bench_int8_attention.py --out $OUT/int8_attention.json   # H200: under 60 s
    python3 benchmarks/bench_int8_attention.py --dry-run --out /tmp/int8.json   # CPU: logic only

Two shapes, batch 1, bf16, self-attention as the DiT runs it: 1.3B at 480p (32,760 tokens, 12 heads
of 128) and 14B at 720p (75,600 tokens, 40 heads of 128). Per shape: the median ms (CUDA events,
after warm-ups) of int8_triton, its quantisation passes alone, sdpa_cudnn, sdpa_flash, sage and flash_attn4 (when
sageattention, flash-attn-4, flash_attn_3 import). At the 1.3B shape, the error of int8_triton against cuDNN's bf16 output
(relative L2 and max abs; sage's and flash_attn4's relative L2 too) on three inputs: random normal q/k/v, K with a per-channel offset (what
smoothing K is for), and q/k with outlier channels; on the first 1,024 query rows, int8_triton's and
cuDNN's error against fp32 attention, and int8_triton against the plain-torch reference of its own
quantised math (wanfit.attention.int8_attention.int8_attention_reference: the kernel's correctness
check). At the 14B shape the random error only. Stages that would end past --budget-s are skipped
and listed; the JSON is rewritten after every stage, so a run cut short keeps what it measured.
--dry-run: on the CPU, tiny shapes, the torch reference in place of the kernel and SDPA's math path
in place of the GPU kernels.
"""

from __future__ import annotations

import argparse
import json
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

from wanfit.attention.backends import default_registry, import_reason  # noqa: E402
from wanfit.attention.chunked import reference_attention  # noqa: E402
from wanfit.attention.fp8_attention import quantize_per_head, quantize_qkv  # noqa: E402
from wanfit.attention.fp8_attention import reference as fp8_reference  # noqa: E402
from wanfit.attention.int8_attention import int8_attention_reference, quantise  # noqa: E402

SHAPES = {"1.3B_480p": (1, 32760, 12, 128), "14B_720p": (1, 75600, 40, 128)}  # B, L, H, D
DRY_SHAPES = {"1.3B_480p": (1, 300, 2, 128), "14B_720p": (1, 520, 2, 64)}
GPU_BACKENDS = ("int8_triton", "sdpa_cudnn", "sdpa_flash", "sage", "flash_attn4", "flash_attn3", "flash_attn3_fp8")
CHECK_ROWS = 1024  # query rows checked against fp32 and the reference (a multiple of the q tile)
INPUTS = ("random", "k_offset", "outliers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    p.add_argument("--budget-s", type=float, default=55.0, help="skip stages that would end past this")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5, help="timed calls at the 1.3B shape (3 at the 14B one)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script only")
    return p.parse_args(argv)


def make_inputs(kind: str, shape, device, dtype, seed: int = 0):
    """q, k, v [B, L, H, D]: random normal, K with a per-channel offset, or q/k with outlier channels."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, n, h, d = shape
    q, k, v = (torch.randn(b, n, h, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    if kind == "k_offset":
        k = k + (4.0 * torch.randn(d, generator=g)).to(device=device, dtype=dtype)
    elif kind == "outliers":
        for t in (q, k):
            t[..., :4] *= 10.0
    return q, k, v


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


class Run:
    """The result, written after every stage; the time budget."""

    def __init__(self, args):
        self.args = args
        self.start = time.perf_counter()
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.dtype = torch.bfloat16
        registry = default_registry()
        if args.dry_run:
            self.backends = {"int8_triton": int8_attention_reference, "sdpa_math": registry["sdpa_math"].run}
        else:
            self.backends = {}
            for name in GPU_BACKENDS:
                package = registry[name].package  # sage and flash_attn4 only where they import
                reason = import_reason(package, registry[name].pip_name or package) if package else None
                if reason is None:
                    self.backends[name] = registry[name].run
        self.result = {
            "device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "sageattention": _version("sageattention"),
            "flash_attn_4": _version("flash-attn-4"),
            "flash_attn_3": _version("flash_attn_3"),
            "python": platform.python_version(),
            "dry_run": args.dry_run,
            "dtype": "bfloat16",
            "backends": list(self.backends),
            "shapes": {},
            "skipped": [],
            "failures": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.result["elapsed_s"] = round(self.elapsed(), 2)
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.result, indent=2, sort_keys=True))

    def fits(self, what: str, predicted_s: float) -> bool:
        if self.args.dry_run or self.elapsed() + predicted_s <= self.args.budget_s:
            return True
        self.result["skipped"].append(f"{what} (predicted {predicted_s:.1f} s, {self.elapsed():.1f} s spent)")
        return False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn, warmup: int, runs: int) -> float:
        """Median ms of fn() over `runs` after `warmup` (CUDA events; wall clock on the CPU)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def guarded(self, key: str, fn):
        """fn(), with a failure recorded under `key` instead of ending the run."""
        try:
            return fn()
        except torch.OutOfMemoryError as err:
            self.result["failures"][key] = f"out of memory: {str(err).splitlines()[0][:200]}"
        except Exception as err:
            self.result["failures"][key] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            traceback.print_exc()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def time_shape(run: Run, name: str, shape, warmup: int, runs: int, scale_from: dict | None) -> dict:
    """Median ms per backend (and of int8_triton's quantisation) at `shape`, random inputs."""
    entry = run.result["shapes"].setdefault(name, {"shape": list(shape), "ms": {}})
    q, k, v = make_inputs("random", shape, run.device, run.dtype)
    ratio = _work(shape) / _work(SHAPES["1.3B_480p"] if not run.args.dry_run else DRY_SHAPES["1.3B_480p"])
    with torch.no_grad():
        for backend, fn in run.backends.items():
            predicted = (scale_from or {}).get(backend)
            if predicted is not None and not run.fits(
                f"{name} {backend}", predicted * ratio * (warmup + runs) / 1e3
            ):
                continue
            ms = run.guarded(
                f"{name} {backend}", lambda fn=fn: run.time_ms(lambda: fn(q, k, v), warmup, runs)
            )
            entry["ms"][backend] = ms
            run.save()
        if "int8_triton" in run.backends and not run.args.dry_run:
            entry["ms"]["int8_quantisation_only"] = run.guarded(
                f"{name} quantisation", lambda: run.time_ms(lambda: quantise(q, k, v), warmup, runs)
            )
        if "flash_attn3_fp8" in run.backends:
            entry["ms"]["fp8_quantisation_only"] = run.guarded(
                f"{name} fp8 quantisation", lambda: run.time_ms(lambda: quantize_qkv(q, k, v), warmup, runs)
            )
        fastest_exact = min((entry["ms"].get(b) or float("inf")) for b in ("sdpa_cudnn", "sdpa_flash"))
        if entry["ms"].get("int8_triton") and fastest_exact < float("inf"):
            entry["int8_speedup_over_fastest_exact"] = fastest_exact / entry["ms"]["int8_triton"]
    run.save()
    return entry


def _work(shape) -> float:
    b, n, h, d = shape
    return b * n * n * h * d


def errors(run: Run, name: str, shape, inputs: tuple[str, ...]) -> None:
    """int8_triton's error against the bf16 exact kernel (all rows) and fp32 (the first rows), and
    against the reference of its own quantised math (the kernel's correctness check)."""
    entry = run.result["shapes"][name].setdefault("errors", {})
    exact_name = "sdpa_math" if run.args.dry_run else "sdpa_cudnn"
    int8, exact = run.backends.get("int8_triton"), run.backends.get(exact_name)
    if int8 is None or exact is None:
        run.result["skipped"].append(f"{name} errors (int8_triton or {exact_name} unavailable)")
        return
    for kind in inputs:
        if not run.fits(f"{name} errors {kind}", 3.0 if name == "1.3B_480p" else 15.0):
            continue

        def measure(kind=kind):
            q, k, v = make_inputs(kind, shape, run.device, run.dtype, seed=1)
            with torch.no_grad():
                out, ref_bf16 = int8(q, k, v), exact(q, k, v)
                rows = min(CHECK_ROWS, shape[1])
                qs = q[:, :rows]
                fp32 = reference_attention(qs.float(), k.float(), v.float())
                same_math = int8_attention_reference(qs, k, v)
                others = {  # the other kernels against cuDNN's bf16 output, all rows
                    f"{b}_rel_l2_vs_bf16_exact": rel_l2(run.backends[b](q, k, v), ref_bf16)
                    for b in ("flash_attn4", "flash_attn3", "sage", "flash_attn3_fp8")
                    if b in run.backends and not run.args.dry_run
                }
                if "flash_attn3_fp8" in run.backends:  # FA3's fp8 kernel against its own quantised math
                    fp8_out = run.backends["flash_attn3_fp8"](q, k, v)[:, :rows]
                    fp8_same = fp8_reference(q, k, v, rows=rows)
                    others[f"flash_attn3_fp8_vs_reference_rel_l2_first_{rows}_rows"] = rel_l2(fp8_out, fp8_same)
                    others[f"flash_attn3_fp8_rel_l2_vs_fp32_first_{rows}_rows"] = rel_l2(fp8_out, fp32)
                    # Its Triton quantisation against the plain-torch path, on this GPU.
                    for t, smooth in ((q, False), (k, True)):
                        a, b = (quantize_per_head(t, smooth=smooth, kernels=kn)[0].float() for kn in (True, False))
                        others[f"fp8_quantize_kernel_vs_torch_mismatched_{'k' if smooth else 'q'}"] = (
                            (a != b).float().mean().item()
                        )
            run.sync()
            return {
                **others,
                "rel_l2_vs_bf16_exact": rel_l2(out, ref_bf16),
                "max_abs_vs_bf16_exact": max_abs(out, ref_bf16),
                f"rel_l2_vs_fp32_first_{rows}_rows": rel_l2(out[:, :rows], fp32),
                f"bf16_exact_rel_l2_vs_fp32_first_{rows}_rows": rel_l2(ref_bf16[:, :rows], fp32),
                f"kernel_vs_reference_rel_l2_first_{rows}_rows": rel_l2(out[:, :rows], same_math),
                f"kernel_vs_reference_max_abs_first_{rows}_rows": max_abs(out[:, :rows], same_math),
            }

        entry[kind] = run.guarded(f"{name} errors {kind}", measure)
        run.save()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this benchmark needs a GPU (use --dry-run to check the script).")
    run = Run(args)
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    run.save()
    small = time_shape(run, "1.3B_480p", shapes["1.3B_480p"], args.warmup, args.runs, None)
    errors(run, "1.3B_480p", shapes["1.3B_480p"], INPUTS)
    time_shape(run, "14B_720p", shapes["14B_720p"], 1, 3, {b: ms for b, ms in small["ms"].items() if ms})
    errors(run, "14B_720p", shapes["14B_720p"], ("random",))
    run.save()
    for name, entry in run.result["shapes"].items():
        times = ", ".join(f"{b} {ms:.2f} ms" for b, ms in entry["ms"].items() if ms is not None)
        print(f"{name} {entry['shape']}: {times}")
        for kind, e in (entry.get("errors") or {}).items():
            if e:
                print(
                    f"  {kind}: rel L2 {e['rel_l2_vs_bf16_exact']:.2e}, max abs {e['max_abs_vs_bf16_exact']:.2e} vs bf16 exact"
                )
    if run.result["skipped"] or run.result["failures"]:
        print(f"skipped: {run.result['skipped']}; failures: {run.result['failures']}")
    print(f"wrote {args.out} ({run.elapsed():.1f} s)")
    return run.result


if __name__ == "__main__":
    main()
