"""Speed tiers beside diffusers, in one process: DiT forwards and whole jobs, exact and fast.

    PYTHONPATH=/tmp/site:src python3 benchmarks/bench_speed.py --out $OUT/speed.json   # H200: under 6 min
    python3 benchmarks/bench_speed.py --dry-run                                       # CPU, tiny: logic only

Real Wan2.1 T2V-1.3B configs (DiT, VAE, umT5-XXL) with random weights, shared by both libraries
(wanfit's DiT is loaded from diffusers' random one). Five variants:

  diffusers_eager      WanTransformer3DModel / WanPipeline as shipped
  diffusers_compiled   the same after transformer.compile_repeated_blocks(fullgraph=True)
  wanfit_eager         the exact tier, blocks eager (--set compile_dit=false)
  wanfit_compiled      the exact tier, blocks compiled (--set compile_dit=true)
  wanfit_fast          the fast tier (--fast: fp8 GEMMs, compiled blocks)
  wanfit_fast@NAME     the fast tier with the DiT's self-attention set to backend NAME
                       (--fast-attention NAME[,NAME]; `--set self_attention=NAME` as a user sets it)

Measured: one DiT forward at 832x480x81 (32,760 tokens), batch 1 for all and batch 2 (guidance
batched, what wanfit's pipeline runs) for the eager ones: CUDA-event median ms, the first call's
ms (one-offs at a new shape), and the DiT's peak GiB (its weights, fp8 copies included, plus the
forward's peak over what was allocated before; all models of both libraries stay resident). Whole
jobs: 10 steps for every variant (a cold compile included where it compiles, as a user pays it),
50 steps for as many as the time budget allows, in priority order; seconds, first-step extra,
median step, peak GiB. The fast tier's error: relative L2 of its DiT output against the exact eager
output, and the mean |frame difference| of its jobs against the exact eager job on the same latents.
The planner's own choice for a 50-step job is what `wanfit_planned` runs: by then the 10-step jobs
have put this card's compile costs in the cache (WANFIT_CACHE_DIR, a fresh folder unless set).

Order, so that no one is charged another's one-offs: a warm-up that loads the libraries (cuBLAS,
cuDNN, flash) on shapes nobody uses; caches emptied before each job; diffusers compiled last (its
compile changes the model in place; it is undone for diffusers' 50-step eager job). The JSON is
rewritten after every stage, so a run cut short keeps what it measured. --forwards-only: the
batch-1 forwards alone (diffusers eager and compiled, wanfit eager, fast and fast@NAME), no jobs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import wanfit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_dit import cuda_or_exit, time_forward  # noqa: E402
from bench_pipeline import PROMPT, SCHEDULER, build_models, job_request  # noqa: E402

NEGATIVE = "blurry, static"
VARIANTS = ("diffusers_eager", "diffusers_compiled", "wanfit_eager", "wanfit_compiled", "wanfit_fast")
# 50-step jobs, most wanted first: wanfit as planned, then the fast tier (its 50-step error against
# the planned exact job), then diffusers' default (its 10-step job extrapolates well), then the rest.
LONG_PRIORITY = ("wanfit_planned", "wanfit_fast", "diffusers_eager", "diffusers_compiled", "wanfit_eager")
COMPILE_GUESS_S = 30.0  # a cold compile of a job's block graphs, until one was measured here
TEXT_AND_DECODE_GUESS_S = 5.0
LONG_JOB_MARGIN_S = 2.0  # a long job's prediction rests on its short job's measured parts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=10, help="the short job's steps (every variant)")
    p.add_argument("--long-steps", type=int, default=50, help="the long job's steps (as the budget allows)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument(
        "--budget-s", type=float, default=345.0, help="start no stage predicted to end past this (s)"
    )
    p.add_argument("--warmup", type=int, default=0, help="untimed calls after the (timed) first one")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="DiT blocks (default: all 30)")
    p.add_argument("--text-layers", type=int, default=None, help="umT5 blocks (default: all 24)")
    p.add_argument(
        "--jobs-only", action="store_true",
        help="only the short and long jobs of wanfit as planned and diffusers eager (no forwards, no compiles)",
    )  # fmt: skip
    p.add_argument(
        "--forwards-only", action="store_true",
        help="only the batch-1 forwards of diffusers eager and compiled and wanfit eager and fast (no jobs)",
    )  # fmt: skip
    p.add_argument(
        "--fast-attention", default="",
        help="comma-separated attention backends: a fast-tier forward with each as the DiT's self-attention",
    )  # fmt: skip
    p.add_argument(
        "--inductor-options", default="",
        help='JSON for torch.compile(options=...) of wanfit\'s blocks, e.g. \'{"coordinate_descent_tuning": true}\'',
    )  # fmt: skip
    p.add_argument(
        "--profile", action="store_true",
        help="CUDA: one more call of each forward under torch.profiler (device ms by kernel kind)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models: checks the script only")
    p.add_argument("--out", default=None, help="write the results as JSON here (after every stage)")
    args = p.parse_args(argv)
    args.fast_attention = [n.strip() for n in args.fast_attention.split(",") if n.strip()]
    return args


def fast_variants(args) -> list[str]:
    """The fast tier as planned, then with each asked-for self-attention backend."""
    return ["wanfit_fast"] + [f"wanfit_fast@{name}" for name in args.fast_attention]


class Run:
    """The results so far, the time budget, and the stages skipped for it."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.started = time.perf_counter()
        self.result: dict = {
            "benchmark": "bench_speed",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "forward": {"b1": {}, "b2": {}},
            "jobs": {},
            "errors": {},
            "skipped": [],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fits(self, what: str, predicted_s: float, reserve_s: float = 0.0) -> bool:
        """Whether a stage predicted to take `predicted_s` still fits, keeping `reserve_s` for later ones."""
        if self.args.dry_run or self.elapsed() + predicted_s + reserve_s <= self.args.budget_s:
            return True
        self.result["skipped"].append(
            {
                "what": what,
                "why": f"predicted {predicted_s:.0f} s at {self.elapsed():.0f} s of {self.args.budget_s:.0f}",
            }
        )
        self.log(f"skipped {what} (predicted {predicted_s:.0f} s)")
        return False

    def attempt(self, what: str, fn):
        """fn()'s value, or None with the error kept: one broken variant must not stop the rest."""
        self.log(f"{what} ...")
        try:
            return fn()
        except Exception as err:
            self.result["errors"][what] = (
                f"{type(err).__name__}: {err}"[:2000] + "\n" + traceback.format_exc(limit=4)
            )
            self.log(f"{what} FAILED: {type(err).__name__}: {str(err)[:300]}")
            return None
        finally:
            self.save()

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", file=sys.stderr, flush=True)

    def save(self) -> None:
        self.result["elapsed_s"] = self.elapsed()
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps(self.result, indent=2, default=str))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_memory(device) -> None:
    """Each job pays its own allocations: the cache is emptied and the peak counter reset."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def warm_up(device, dtype) -> None:
    """Load cuBLAS, cuDNN (attention and convolutions) and the flash kernels on shapes no variant uses."""
    if device.type != "cuda":
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    a = torch.randn(320, 192, device=device, dtype=dtype)
    (a @ a.t()).sum().item()
    q = torch.randn(1, 2, 136, 128, device=device, dtype=dtype)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
        except RuntimeError:
            pass
    x = torch.randn(1, 8, 3, 12, 12, device=device, dtype=dtype)
    torch.nn.functional.conv3d(x, torch.randn(8, 8, 3, 3, 3, device=device, dtype=dtype))
    sync(device)


def first_calls(device, dtype, cfg, tokens: int) -> dict:
    """What a new shape costs once, on shapes no variant uses (batch 3): the first call of cuDNN
    attention (its graph is built per shape), of the cross-attention and of the FFN's GEMM, against
    the second call. The one-offs each variant's first step pays at its own shapes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, head_dim = cfg.num_heads, cfg.head_dim
    q = torch.randn(3, heads, tokens, head_dim, device=device, dtype=dtype)
    ctx = torch.randn(3, heads, cfg.text_len, head_dim, device=device, dtype=dtype)
    h = torch.randn(3 * tokens, cfg.dim, device=device, dtype=dtype)
    w = torch.randn(cfg.ffn_dim, cfg.dim, device=device, dtype=dtype)

    def sdpa(k):  # cuDNN, as wanfit's plan picks on Hopper; PyTorch's own choice where it cannot
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, k)
        except RuntimeError:
            return torch.nn.functional.scaled_dot_product_attention(q, k, k)

    out = {}
    for name, fn in (
        ("self_attention", lambda: sdpa(q)),
        ("cross_attention", lambda: sdpa(ctx)),
        ("ffn_gemm", lambda: torch.nn.functional.linear(h, w)),
    ):
        times = []
        for _ in range(2):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = {"first_ms": times[0], "second_ms": times[1]}
    return out


# --- the variants ------------------------------------------------------------------------------------


class Models:
    """Both libraries' models on the same random weights, and the job's inputs."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        (self.ref_dit, self.ref_vae, self.t5, self.tokenizer), self.parts, self.cfg = build_models(
            args, device
        )
        self.dit, self.vae = self.parts[0], self.parts[1]
        self.dtype = torch.float32 if args.dry_run else torch.bfloat16
        self.width, self.height = (int(v) for v in args.size.split("x"))
        from wanfit.pipeline import latent_shape

        shape = latent_shape(1, self.cfg.in_dim, self.height, self.width, args.frames)
        self.latents = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device)
        self.grid = shape[2:]
        self.scheduler_dir = Path(tempfile.mkdtemp())
        from diffusers import UniPCMultistepScheduler

        UniPCMultistepScheduler(**SCHEDULER).save_config(str(self.scheduler_dir))
        self.compile_backend = "eager" if args.dry_run else None  # CPU: the script's logic, not Inductor's
        # bench_fresh drives this class with its own arguments, which have neither of these options.
        self.inductor_options = json.loads(getattr(args, "inductor_options", "") or "{}")
        self.profile = getattr(args, "profile", False)

    @property
    def tokens(self) -> int:
        f, h, w = self.grid
        pt, ph, pw = self.cfg.patch_size
        return (f // pt) * (h // ph) * (w // pw)

    def forward_inputs(self, batch: int):
        gen = torch.Generator().manual_seed(11)
        x = torch.randn(batch, self.cfg.in_dim, *self.grid, generator=gen).to(self.dtype).to(self.device)
        t = torch.full((batch,), 937.5, device=self.device)
        context = torch.randn(batch, self.cfg.text_len, self.cfg.text_dim, generator=gen)
        return x, t, context.to(self.dtype).to(self.device)

    # -- wanfit --

    def plan(self, variant: str, steps: int | None):
        """The PlanResult (or, for the fast tier in a dry run on the CPU, a bare Plan) of a variant."""
        from wanfit.plan.planning import Constraints, plan_for

        request = job_request(self.args, self.cfg, self.parts, steps=steps)
        settings = {"wanfit_eager": ["compile_dit=false"], "wanfit_compiled": ["compile_dit=true"]}.get(
            variant, []
        )
        is_fast = variant.startswith("wanfit_fast")
        if "@" in variant:
            settings = [f"self_attention={variant.split('@', 1)[1]}"]
        fast = is_fast and not self.args.dry_run
        planned = plan_for(
            request, Constraints.from_options(device=str(self.device), settings=settings, fast=fast)
        )
        if is_fast and self.args.dry_run:  # the CPU has no fast tier: obey a bare Plan
            return replace(planned.plan, fp8_gemm=True, compile_dit=True)
        return planned

    def pipeline(self, plan):
        from wanfit.models.text_encoder import WanTextEncoder
        from wanfit.pipeline import SamplingDefaults, WanPipeline

        pipe = WanPipeline(
            self.dit,
            self.vae,
            WanTextEncoder(self.t5, self.tokenizer, cache=None),
            plan=plan,
            defaults=SamplingDefaults(shift=8.0),
            scheduler_config=self.scheduler_dir / "scheduler_config.json",
        )
        if self.compile_backend:
            pipe.placement.dit.compile_options["backend"] = self.compile_backend
        if self.inductor_options:  # an experiment: Inductor settings for wanfit's block compiles
            pipe.placement.dit.compile_options["options"] = self.inductor_options
        return pipe

    @staticmethod
    def leave(pipe) -> None:
        """Back to the exact, eager DiT: every pipeline shares the one model, whose fp8 GEMMs are a
        model-level setting."""
        pipe.placement.dit.place(replace(pipe.plan, fp8_gemm=False, compile_dit=False))

    def wanfit_forward(self, variant: str, batch: int):
        planned = self.plan(variant, steps=None)
        pipe = self.pipeline(planned)
        plan = pipe.plan
        x, t, context = self.forward_inputs(batch)
        placement = pipe.placement.dit
        placement.place(plan)
        x32 = x.float()  # wanfit keeps latents in fp32; the values are the same rounded ones
        try:
            result, out = timed_forward(lambda: placement(x32, t, context), self)
            result["dit_gib"] = weights_gib(self.dit) + (placement.fp8_gemm_bytes or 0) / 2**30
            result["peak_gib"] = result["dit_gib"] + result.get("peak_over_start_gib", 0.0)
            result["tier"], result["compiled"] = placement.tier, placement.compiled_blocks is not None
            result["self_attention"] = plan.self_attention
            result["given_up"] = dict(placement.failures)
            return result, out.float().cpu()
        finally:
            self.leave(pipe)

    def job_settings(self, steps: int) -> dict:
        """What both libraries' pipelines are given: the same job from the same latents."""
        return dict(
            negative_prompt=NEGATIVE,
            height=self.height,
            width=self.width,
            num_frames=self.args.frames,
            num_inference_steps=steps,
            guidance_scale=self.args.guidance,
            latents=self.latents.clone(),
        )

    def wanfit_job(self, variant: str, steps: int):
        """The job as `wanfit generate` runs it once the models are loaded: planning included."""
        fresh_memory(self.device)
        start = time.perf_counter()
        plan = self.plan(variant, steps)
        pipe = self.pipeline(plan)
        planned_s = time.perf_counter() - start
        try:
            frames = pipe(PROMPT, **self.job_settings(steps), progress=False)
            sync(self.device)
            total = time.perf_counter() - start
            record = pipe.run_record()
        finally:
            self.leave(pipe)
        timings = dict(pipe.timings)
        peaks = [v for k, v in timings.items() if k.endswith("_peak_gib")]
        return {
            "total_s": total,
            "median_step_s": timings.get("denoise_step_s"),
            "first_step_extra_s": timings.get("denoise_first_step_extra_s"),
            "phases_s": {
                "plan_s": planned_s,
                **{k: v for k, v in timings.items() if k.endswith("_s") and "step" not in k},
            },
            "peak_gib": max(peaks, default=None),
            "tier": record["tier"],
            "compile_dit": pipe.plan.compile_dit,
            "given_up": record["given_up"],
            "plan_notes": list(getattr(plan, "notes", ())),
        }, frames

    # -- diffusers --

    def diffusers_forward(self, batch: int):
        x, t, context = self.forward_inputs(batch)
        model = self.ref_dit

        def run():
            return model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]

        result, out = timed_forward(run, self)
        result["dit_gib"] = weights_gib(model)
        result["peak_gib"] = result["dit_gib"] + result.get("peak_over_start_gib", 0.0)
        return result, out.float().cpu()

    def diffusers_job(self, steps: int):
        from diffusers import UniPCMultistepScheduler, WanPipeline

        pipe = WanPipeline(
            tokenizer=self.tokenizer,
            text_encoder=self.t5,
            transformer=self.ref_dit,
            vae=self.ref_vae,
            scheduler=UniPCMultistepScheduler(**SCHEDULER),
        )
        pipe.set_progress_bar_config(disable=True)
        marks, first_forward = [], []

        def on_step_end(pipe, i, t, kwargs):
            sync(self.device)
            marks.append(time.perf_counter())
            return {}

        def before_forward(module, args):
            if not first_forward:  # the denoising starts: the prompts are encoded
                sync(self.device)
                first_forward.append(time.perf_counter())

        hook = self.ref_dit.register_forward_pre_hook(before_forward)
        fresh_memory(self.device)
        start = time.perf_counter()
        try:
            video = self._run_diffusers(pipe, steps, on_step_end)
        finally:
            hook.remove()
        sync(self.device)
        total = time.perf_counter() - start
        step_s = [b - a for a, b in zip([first_forward[0], *marks], marks)]
        steady = statistics.median(step_s[1:]) if len(step_s) > 1 else None
        frames = (np.asarray(video, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)
        return {
            "total_s": total,
            "median_step_s": steady,
            "first_step_extra_s": None if steady is None else max(0.0, step_s[0] - steady),
            "phases_s": {
                "text_encoder_s": first_forward[0] - start,
                "denoise_s": marks[-1] - first_forward[0],
            },
            "peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30
            if self.device.type == "cuda"
            else None,
        }, frames

    def _run_diffusers(self, pipe, steps: int, on_step_end):
        with torch.no_grad():
            output = pipe(PROMPT, **self.job_settings(steps), callback_on_step_end=on_step_end)
        return output.frames[0]  # the default output: float frames in [0, 1] on the host

    def compile_diffusers(self) -> None:
        options = {"backend": self.compile_backend} if self.compile_backend else {}
        self.ref_dit.compile_repeated_blocks(fullgraph=True, **options)

    def uncompile_diffusers(self) -> None:
        """Undo compile_repeated_blocks (each block's nn.Module.compile): eager diffusers again."""
        for module in self.ref_dit.modules():
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None


def weights_gib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def timed_forward(fn, models: Models):
    """bench_dit.time_forward with the first call timed on its own (a new shape's one-offs)."""
    device = models.device
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    sync(device)
    first_ms = (time.perf_counter() - t0) * 1000
    result, out = time_forward(fn, device, models.args.warmup, models.args.runs)
    result["first_call_ms"] = first_ms
    if models.profile and device.type == "cuda":  # one more call, its kernels by kind
        from kernel_profile import kernel_profile

        result["profile"] = kernel_profile(fn)
    return result, out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# --- the stages -----------------------------------------------------------------------------------------


def run(args) -> dict:
    if args.dry_run:
        device = torch.device("cpu")
        args.size, args.frames, args.steps, args.long_steps = "64x48", 5, 2, 3
        args.warmup, args.runs = 1, 2
    else:
        device = cuda_or_exit()
    os.environ.setdefault("WANFIT_CACHE_DIR", tempfile.mkdtemp(prefix="wanfit-cache-"))
    r = Run(args, device)
    r.log("building the models")
    m = Models(args, device)
    import diffusers

    r.result.update(
        diffusers_version=diffusers.__version__,
        config=m.cfg.to_dict(),
        video=f"{args.size}x{args.frames}",
        tokens=m.tokens,
        steps={"short": args.steps, "long": args.long_steps},
        budget_s=args.budget_s,
        cache_dir=os.environ["WANFIT_CACHE_DIR"],
    )
    warm_up(device, m.dtype)
    if device.type == "cuda":
        r.result["first_calls"] = r.attempt(
            "first calls", lambda: first_calls(device, m.dtype, m.cfg, m.tokens)
        )
    forward, jobs, outputs, frames = r.result["forward"], r.result["jobs"], {}, {}

    def do_forward(variant: str, batch: int, fn) -> None:
        got = r.attempt(f"forward {variant} batch {batch}", fn)
        if got is not None:
            forward[f"b{batch}"][variant], outputs[(variant, batch)] = got

    def do_job(variant: str, steps: int, fn) -> None:
        got = r.attempt(f"{steps}-step job {variant}", fn)
        if got is not None:
            jobs.setdefault(str(steps), {})[variant], frames[(variant, steps)] = got

    short, long = args.steps, args.long_steps

    def b1_s() -> float:  # one batch-1 forward, as far as measured (a guess until then)
        measured = forward["b1"].get("diffusers_eager") or forward["b1"].get("wanfit_eager")
        return measured["median_ms"] / 1000 if measured else 0.6

    def forward_guess(batch: int, compiles: bool) -> float:
        return (1 + args.warmup + args.runs) * batch * b1_s() + (COMPILE_GUESS_S if compiles else 0.0)

    def job_guess(steps: int, compiles: bool) -> float:
        return steps * 2 * b1_s() + TEXT_AND_DECODE_GUESS_S + (COMPILE_GUESS_S if compiles else 0.0)

    # Until diffusers' compiled forward is measured (stage 4), keep time for it.
    reserve = 0.0 if args.jobs_only else forward_guess(1, compiles=True)
    if args.jobs_only:
        return jobs_only(args, r, m, do_job, job_guess)
    if args.forwards_only:
        return forwards_only(args, r, m, outputs, do_forward, forward_guess)

    # 1. Eager forwards (diffusers eager before its compile changes the model).
    for batch in (1, 2):
        for variant, fn in (
            ("diffusers_eager", lambda b=batch: m.diffusers_forward(b)),
            ("wanfit_eager", lambda b=batch: m.wanfit_forward("wanfit_eager", b)),
        ):
            if r.fits(f"forward {variant} batch {batch}", forward_guess(batch, False), reserve):
                do_forward(variant, batch, fn)

    # 2. Short jobs: every variant but diffusers compiled (stage 4), each compile cold as a user pays it.
    if r.fits(f"{short}-step job diffusers_eager", job_guess(short, False), reserve):
        do_job("diffusers_eager", short, lambda: m.diffusers_job(short))
    for variant in ("wanfit_eager", "wanfit_compiled", "wanfit_fast"):
        if r.fits(f"{short}-step job {variant}", job_guess(short, variant != "wanfit_eager"), reserve):
            do_job(variant, short, lambda v=variant: m.wanfit_job(v, short))

    # 3. Compiled forwards. Batch 2 first, after torch._dynamo.reset(): dynamo traces again and
    # Inductor finds the job's graphs in its caches, as a second run's compile does. Then batch 1.
    torch._dynamo.reset()
    if r.fits("forward wanfit_compiled batch 2", forward_guess(2, True), reserve):
        do_forward("wanfit_compiled", 2, lambda: m.wanfit_forward("wanfit_compiled", 2))
    for variant in ("wanfit_compiled", *fast_variants(args)):
        if r.fits(f"forward {variant} batch 1", forward_guess(1, True), reserve):
            do_forward(variant, 1, lambda v=variant: m.wanfit_forward(v, 1))
    r.result["compile"] = compile_summary(r.result, long)

    # 4. diffusers compiled: its short job (the compile included), then its forward.
    r.log("compiling diffusers' blocks (compile_repeated_blocks, fullgraph)")
    r.attempt("compile diffusers", m.compile_diffusers)
    if r.fits(f"{short}-step job diffusers_compiled", job_guess(short, True), forward_guess(1, False)):
        do_job("diffusers_compiled", short, lambda: m.diffusers_job(short))
    do_forward("diffusers_compiled", 1, lambda: m.diffusers_forward(1))

    # 5. Long jobs, most wanted first, as long as the budget lasts; each predicted from its short job
    # (its text encoding and decode, and the long job's steps at its median step).
    r.result["jobs_extrapolated"] = extrapolated(jobs.get(str(short), {}), short, long)
    for variant in LONG_PRIORITY:
        base = variant
        if variant == "wanfit_planned":  # predicted from the short job of what the planner will choose
            planned = r.attempt("plan wanfit_planned", lambda: m.plan("wanfit_planned", long))
            base = "wanfit_compiled" if planned is None or planned.plan.compile_dit else "wanfit_eager"
        done = jobs.get(str(short), {}).get(base)
        if done is None or done.get("median_step_s") is None:
            continue
        outside = done["total_s"] - (done.get("first_step_extra_s") or 0.0) - short * done["median_step_s"]
        predicted = max(0.0, outside) + long * done["median_step_s"] + LONG_JOB_MARGIN_S
        if not r.fits(f"{long}-step job {variant}", predicted):
            continue
        if variant == "diffusers_eager":
            m.uncompile_diffusers()
            do_job(variant, long, lambda: m.diffusers_job(long))
            m.compile_diffusers()
        elif variant == "diffusers_compiled":
            do_job(variant, long, lambda: m.diffusers_job(long))
        else:  # wanfit_planned: the planner's choice, with this card's measured compile costs
            do_job(variant, long, lambda v=variant: m.wanfit_job(v, long))

    r.result["errors_vs_exact"] = accuracy(outputs, frames, short, long)
    r.result["ratios"] = ratios(r.result)
    r.save()
    return r.result


def forwards_only(args, r: Run, m: Models, outputs: dict, do_forward, forward_guess) -> dict:
    """--forwards-only: batch-1 forwards, diffusers eager before its compile changes the model."""
    for variant, fn, compiles in (
        ("diffusers_eager", lambda: m.diffusers_forward(1), False),
        ("wanfit_eager", lambda: m.wanfit_forward("wanfit_eager", 1), False),
        *((v, lambda v=v: m.wanfit_forward(v, 1), True) for v in fast_variants(args)),
    ):
        if r.fits(f"forward {variant} batch 1", forward_guess(1, compiles), forward_guess(1, True)):
            do_forward(variant, 1, fn)
    r.log("compiling diffusers' blocks (compile_repeated_blocks, fullgraph)")
    r.attempt("compile diffusers", m.compile_diffusers)
    do_forward("diffusers_compiled", 1, lambda: m.diffusers_forward(1))
    r.result["errors_vs_exact"] = accuracy(outputs, {}, args.steps, args.long_steps)
    r.result["ratios"] = ratios(r.result)
    r.save()
    return r.result


def jobs_only(args, r: Run, m: Models, do_job, job_guess) -> dict:
    """--jobs-only: the short job of wanfit eager (the planner's first-run choice for a long job is
    checked) and of diffusers eager, then the long jobs of wanfit as planned and diffusers eager."""
    short, long = args.steps, args.long_steps
    for variant, fn in (
        ("diffusers_eager", lambda: m.diffusers_job(short)),
        ("wanfit_eager", lambda: m.wanfit_job("wanfit_eager", short)),
    ):
        if r.fits(f"{short}-step job {variant}", job_guess(short, False)):
            do_job(variant, short, fn)
    for variant, fn in (
        ("wanfit_planned", lambda: m.wanfit_job("wanfit_planned", long)),
        ("diffusers_eager", lambda: m.diffusers_job(long)),
    ):
        if r.fits(f"{long}-step job {variant}", job_guess(long, False)):
            do_job(variant, long, fn)
    r.result["ratios"] = ratios(r.result)
    r.save()
    return r.result


def extrapolated(short_jobs: dict, short: int, long: int) -> dict:
    """The long job of every variant from its short one: its total plus the extra steps at its median
    step (an estimate, for the variants the budget left unmeasured)."""
    return {
        variant: j["total_s"] + (long - short) * j["median_step_s"]
        for variant, j in short_jobs.items()
        if j.get("median_step_s") is not None
    }


def compile_summary(result: dict, long: int) -> dict | None:
    """wanfit's compile, cold (the short compiled job's first-step extra less the eager one's) and warm
    (the batch-2 forward's first call after a dynamo reset, Inductor's caches kept), the saving per
    step, and what the planner's rule decides for the long job on a first and on a second run."""
    from wanfit.plan.compile_costs import CompileCosts

    jobs = result["jobs"].get(str(result["steps"]["short"]), {})
    eager, compiled = jobs.get("wanfit_eager"), jobs.get("wanfit_compiled")
    forward = result["forward"]["b2"].get("wanfit_compiled")
    if not (eager and compiled and forward) or None in (eager["median_step_s"], compiled["median_step_s"]):
        return None
    cold = max(0.0, compiled["first_step_extra_s"] - eager["first_step_extra_s"])
    warm = max(0.0, (forward["first_call_ms"] - forward["median_ms"]) / 1000)
    saving = eager["median_step_s"] - compiled["median_step_s"]
    first, second = (CompileCosts(c, saving, "measured here") for c in (cold, warm))
    return {
        "cold_s": cold,
        "warm_s": warm,
        "saving_per_step_s": saving,
        f"planner_{long}_steps_first_run": {"compiles": first.pays(long), "why": first.describe(long)},
        f"planner_{long}_steps_second_run": {"compiles": second.pays(long), "why": second.describe(long)},
    }


def accuracy(outputs: dict, frames: dict, short: int, long: int) -> dict:
    """The fast tier's error against the exact eager tier, and the libraries' agreement."""
    out = {}
    for batch in (1, 2):
        exact = outputs.get(("wanfit_eager", batch))
        fast = sorted({v for v, b in outputs if v.startswith("wanfit_fast")})
        for variant in (*fast, "wanfit_compiled", "diffusers_eager", "diffusers_compiled"):
            other = outputs.get((variant, batch))
            if exact is not None and other is not None:
                out[f"forward_b{batch}_rel_l2_{variant}_vs_wanfit_eager"] = rel_l2(other, exact)
    for steps in (short, long):
        exact = frames.get(("wanfit_eager", steps))
        if exact is None:  # the long jobs: the planner's exact run stands in for the eager one
            exact = frames.get(("wanfit_planned", steps))
        for variant in (
            "wanfit_fast",
            "wanfit_compiled",
            "wanfit_planned",
            "diffusers_eager",
            "diffusers_compiled",
        ):
            other = frames.get((variant, steps))
            if exact is not None and other is not None and other is not exact:
                out[f"job{steps}_mean_abs_uint8_{variant}_vs_exact"] = mean_abs(other, exact)
    return out


def ratios(result: dict) -> dict:
    """Each variant's time over diffusers compiled (forwards) and over diffusers eager (jobs)."""
    out = {}
    b1 = result["forward"]["b1"]
    peer = b1.get("diffusers_compiled", {}).get("median_ms")
    for variant, r in b1.items():
        if peer and "median_ms" in r:
            out[f"forward_b1_{variant}_over_diffusers_compiled"] = r["median_ms"] / peer
    for steps, jobs in result["jobs"].items():
        peer = jobs.get("diffusers_eager", {}).get("total_s")
        for variant, r in jobs.items():
            if peer:
                out[f"job{steps}_{variant}_over_diffusers_eager"] = r["total_s"] / peer
    return out


def table(result: dict) -> str:
    """Markdown: forwards, then jobs, then the errors."""

    def cell(value, fmt="{:.1f}"):
        return "-" if value is None else fmt.format(value)

    lines = [
        f"bench_speed on {result['device']}, torch {result['torch']}, diffusers {result.get('diffusers_version')}: "
        f"{result.get('video')} ({result.get('tokens')} tokens), {result.get('elapsed_s', 0):.0f} s",
        "",
        "| variant | ran as | forward b1 ms | first call ms | x diffusers compiled | b1 peak GiB | forward b2 ms | b2 peak GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    b1, b2 = result["forward"]["b1"], result["forward"]["b2"]
    for v in (*VARIANTS, *sorted(k for k in b1 if k not in VARIANTS)):
        one, two = b1.get(v, {}), b2.get(v, {})
        ratio = result["ratios"].get(f"forward_b1_{v}_over_diffusers_compiled")
        lines.append(
            f"| {v} | {ran_as(one or two)} | {cell(one.get('median_ms'))} | {cell(one.get('first_call_ms'))} | "
            f"{cell(ratio, '{:.3f}')} | {cell(one.get('peak_gib'), '{:.2f}')} | {cell(two.get('median_ms'))} | "
            f"{cell(two.get('peak_gib'), '{:.2f}')} |"
        )
    lines += [
        "",
        "| job | variant | ran as | total s | x diffusers eager | median step s | first-step extra s | peak GiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for steps, jobs in result["jobs"].items():
        for v, j in jobs.items():
            ratio = result["ratios"].get(f"job{steps}_{v}_over_diffusers_eager")
            extra = j.get("first_step_extra_s")
            lines.append(
                f"| {steps} steps | {v} | {ran_as(j)} | {j['total_s']:.2f} | {cell(ratio, '{:.3f}')} | "
                f"{cell(j.get('median_step_s'), '{:.3f}')} | {cell(extra, '{:.2f}')} | {cell(j.get('peak_gib'), '{:.2f}')} |"
            )
    compile_ = result.get("compile")
    if compile_:
        lines += [
            "",
            f"wanfit's compile: cold {compile_['cold_s']:.1f} s, warm {compile_['warm_s']:.1f} s, "
            f"saving {compile_['saving_per_step_s']:.3f} s per step",
        ]
        lines += [f"- {k}: {v['why']}" for k, v in compile_.items() if k.startswith("planner_")]
    lines += ["", "errors against wanfit's exact eager tier (same weights, same latents):"]
    lines += [f"- {k}: {v:.3g}" for k, v in result.get("errors_vs_exact", {}).items()]
    for item in result["skipped"]:
        lines.append(f"- skipped {item['what']}: {item['why']}")
    for what, err in result["errors"].items():
        lines.append(f"- FAILED {what}: {err.splitlines()[0][:200]}")
    return "\n".join(lines)


def ran_as(r: dict) -> str:
    """wanfit's tier and compile as they really ran (a refused fast tier or failed compile shows here)."""
    if "tier" not in r:
        return "-"
    compiled = r.get("compiled", r.get("compile_dit"))
    given_up = f", gave up {', '.join(r['given_up'])}" if r.get("given_up") else ""
    attention = f", {r['self_attention']}" if r.get("self_attention") else ""
    return f"{r['tier']}, {'compiled' if compiled else 'eager'}{attention}{given_up}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
