"""LoRAs on the GPU: merge time, the runtime branch's cost per DiT forward, and the 4-step job.

    python3 benchmarks/bench_lora.py --out $OUT/lora.json                       # 1.3B and 14B DiT, 1.3B job
    python3 benchmarks/bench_lora.py --models 14B --layers 10 --skip-job        # quicker
    python3 benchmarks/bench_lora.py --models 1.3B --skip-job --ffn-tiles       # + the LoRA FFN kernel's tiles
    python3 benchmarks/bench_lora.py --tiny                                     # CPU, tiny: logic only
    # the 14B job over two calls (each run about 5 min at 50 steps):
    python3 benchmarks/bench_lora.py --models "" --job-model 14B --job-runs wanfit_full,wanfit_4step_lora
    python3 benchmarks/bench_lora.py --models "" --job-model 14B --job-runs diffusers_full,diffusers_4step_lora

Random real-shape weights. The LoRA is shaped like LightX2V's step-distill LoRA (rank 64 on every
block Linear, with bias diffs, norm3 and modulation diffs, and the text/time embeddings and head).
Per model: the merge time (fp32 math, rounded to bf16, on the GPU) and the unload time, with the
base weights' copy kept on the host, on the device, and nowhere (Plan.lora_base_copy); one DiT
forward at the job's token count without a LoRA, merged, and with the runtime low-rank branch; on CUDA
also with the blocks compiled (torch.compile per block, as the placement does), without a LoRA and
with the branch (--skip-compiled: not); on CUDA, each branch forward also with the FFNs' two branches
in the fused kernel (Plan.lora_fused_ffn; --skip-fused-ffn: not). --ffn-tiles first times one block's
FFN at each tile setting of that kernel, and the forwards use the fastest; --plan-settings runs the
forwards with the GELU in place and the eager fused elementwise kernels, as a planned job does.
The job (1.3B, all of DiT, VAE and umT5 on the GPU): the 50-step CFG run (UniPC, guidance 5, no LoRA)
against the 4-step distilled run with the LoRA (guidance 1), wanfit and diffusers; diffusers loads the
same LoRA file through load_lora_weights and runs its FlowMatchLCMScheduler (its own 4-step schedule:
the same number of DiT passes). Prints JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import wanfit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PROMPT = "a red fox running through fresh snow at dawn, cinematic lighting"


JOB_RUNS = ("diffusers_full", "diffusers_4step_lora", "wanfit_full", "wanfit_4step_lora")


def job_runs(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.split(",") if n)
    unknown = [n for n in names if n not in JOB_RUNS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown job runs {unknown}; choose from {', '.join(JOB_RUNS)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1.3B,14B", help="DiT sizes for merge/forward timing")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--layers", type=int, default=None, help="DiT blocks (default: all)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--full-steps",
        type=int,
        default=50,
        help="steps of the CFG baseline job (0: none; e.g. bench_cache's uncached 50-step jobs in the same call)",
    )
    p.add_argument("--skip-job", action="store_true")
    p.add_argument("--job-model", default="1.3B", help="the job's DiT (1.3B or 14B; --tiny: the tiny one)")
    p.add_argument(
        "--job-runs",
        default=",".join(JOB_RUNS),
        type=job_runs,
        help="which of the job's runs to do (a 14B job splits over calls this way)",
    )
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--skip-compiled", action="store_true", help="no forwards with the blocks compiled")
    p.add_argument(
        "--skip-fused-ffn", action="store_true", help="no forwards with the fused LoRA FFN kernel (CUDA)"
    )
    p.add_argument(
        "--plan-settings",
        action="store_true",
        help="the DiT forwards as a planned job runs them: the GELU in place or in ffn.0's GEMM and, "
        "eager, the fused elementwise kernels (Plan.ffn_gelu_in_place, ffn_gelu_epilogue, fused_elementwise)",
    )
    p.add_argument(
        "--profile", action="store_true", help="CUDA: one more forward of each variant under torch.profiler"
    )
    p.add_argument(
        "--ffn-tiles",
        action="store_true",
        help="CUDA: first, one block's FFN at each model's shape, the branch as separate GEMMs against the "
        "fused LoRA FFN kernel at each tile setting (wanfit.runtime.lora_ffn); that model's DiT forwards "
        "then run the kernel at the fastest",
    )
    p.add_argument(
        "--mode-rounds",
        type=int,
        default=0,
        help="then, per model, the forward without a LoRA, with the per-call merge and with the runtime "
        "branch in alternating rounds (each round --runs forwards of each), the blocks in bf16 and stored "
        "in fp8; with --plan-settings as a planned job runs them (0: not)",
    )
    p.add_argument(
        "--skip-sequence", action="store_true", help="only the --mode-rounds comparison (no merge timing)"
    )
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models: checks the script only")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def lightx2v_like_lora(cfg, rank: int, seed: int = 0) -> dict:
    """A ComfyUI-format state dict shaped like LightX2V's rank-64 step-distill LoRA for `cfg`."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.01):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    linears = {
        **{f"{a}.{p}": (cfg.dim, cfg.dim) for a in ("self_attn", "cross_attn") for p in "qkvo"},
        "ffn.0": (cfg.ffn_dim, cfg.dim),
        "ffn.2": (cfg.dim, cfg.ffn_dim),
    }
    state = {}

    def low_rank(module, rows, cols, bias=True, alpha=False):
        state[f"diffusion_model.{module}.lora_down.weight"] = rand(rank, cols)
        state[f"diffusion_model.{module}.lora_up.weight"] = rand(rows, rank)
        if alpha:  # diffusers reads alphas inside the blocks only
            state[f"diffusion_model.{module}.alpha"] = torch.tensor(float(rank))
        if bias:
            state[f"diffusion_model.{module}.diff_b"] = rand(rows)

    for i in range(cfg.num_layers):
        for name, (rows, cols) in linears.items():
            low_rank(f"blocks.{i}.{name}", rows, cols, alpha=True)
        state[f"diffusion_model.blocks.{i}.norm3.diff"] = rand(cfg.dim)
        state[f"diffusion_model.blocks.{i}.norm3.diff_b"] = rand(cfg.dim)
        state[f"diffusion_model.blocks.{i}.modulation.diff"] = rand(1, 6, cfg.dim)
    low_rank("text_embedding.0", cfg.dim, cfg.text_dim)
    low_rank("text_embedding.2", cfg.dim, cfg.dim)
    low_rank("time_embedding.0", cfg.dim, cfg.freq_dim)
    low_rank("time_projection.1", 6 * cfg.dim, cfg.dim)
    low_rank("head.head", cfg.out_dim * 4, cfg.dim)
    return state


def converted(state: dict, cfg):
    from wanfit.runtime.lora import parameter_shapes
    from wanfit.weights.lora_keys import check_fits, convert

    shapes = parameter_shapes(cfg)
    lora = convert(state, shapes)
    check_fits(lora, shapes)
    return lora


def dit_with_lora(name: str, args, device, dtype):
    """(config, DiT with random weights, its LightX2V-shaped LoRA converted, forward inputs), the DiT with
    the planned elementwise settings under --plan-settings."""
    from bench_dit import latent_shape, random_weights_wanfit

    from wanfit.models.configs import DIT_PRESETS

    cfg = DIT_PRESETS[name]
    if args.layers:
        cfg = cfg.with_overrides(num_layers=args.layers)
    dit = random_weights_wanfit(cfg, device, dtype, seed=0)
    lora = converted(lightx2v_like_lora(cfg, args.rank), cfg)
    if args.plan_settings:
        from wanfit.runtime import fused_elementwise, gemm_epilogue

        epilogue = device.type == "cuda" and gemm_epilogue.smoke_test(str(device)) is None
        for block in dit.blocks:
            block.ffn_gelu_in_place = True
            block.ffn_gelu_epilogue = epilogue  # where ffn.0 has no runtime branch
        if device.type == "cuda" and fused_elementwise.runtime_failure(str(device)) is None:
            fused_elementwise.install(dit.blocks)
    frames, height, width = latent_shape(args.size, args.frames)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, frames, height, width, generator=gen).to(device, dtype)
    t = torch.tensor([900.0], device=device)
    context = torch.randn(1, 512, cfg.text_dim, generator=gen).to(device, dtype)
    return cfg, dit, lora, (x, t, context)


def bench_dit(name: str, args, device, dtype) -> dict:
    """Merge and unload time, and one forward: base, merged, runtime branch."""
    from bench_dit import time_forward
    from kernel_profile import kernel_profile

    from wanfit.runtime.lora import DiTLoras

    cfg, dit, lora, (x, t, context) = dit_with_lora(name, args, device, dtype)
    placement = SimpleNamespace(failures={})
    placement.give_up = placement.failures.__setitem__  # what DiTPlacement records
    loras = DiTLoras(dit, placement)

    def forward():
        return dit(x, t, context)

    result = {"config": cfg.to_dict(), "rank": args.rank, "lora_modules": len(lora.low_rank)}
    profiles = result.setdefault("profile", {}) if args.profile else None

    def profiled(name: str, fn) -> None:
        if profiles is not None:
            profiles[name] = kernel_profile(fn)

    result["base"], base_out = time_forward(forward, device, warmup=1, runs=args.runs)
    profiled("base", forward)
    # The merge and unload with the base copy on the host and on the device (Plan.lora_base_copy);
    # without one ("none", the CLI's) at the end, since that unload rounds the base weights once.
    merge_s, unload_s = result["merge_s"], result["unload_s"] = {}, {}
    for where in ("host", "device"):
        merge_s[where], _ = timed(lambda where=where: loras.apply([(lora, 1.0)], "merge", where), device)
        if where == "host":
            result["merged"], _ = time_forward(forward, device, warmup=1, runs=args.runs)
        unload_s[where], _ = timed(lambda: loras.remove(), device)
    result["runtime_apply_s"], _ = timed(
        lambda: loras.apply([(lora, 1.0)], "runtime", fused_ffn=False), device
    )
    result["runtime_branch"], branch_out = time_forward(forward, device, warmup=1, runs=args.runs)
    profiled("runtime_branch", forward)
    costs = {"runtime_branch": "base", "merged": "base"}
    fused_ffn = device.type == "cuda" and not args.skip_fused_ffn
    if fused_ffn:  # the same branches, each FFN's two inside its GELU pass (Plan.lora_fused_ffn)
        loras.set_fused_ffn(True)
        result["runtime_branch_fused_ffn"], fused_out = time_forward(
            forward, device, warmup=1, runs=args.runs
        )
        result["fused_ffn_given_up"] = dict(getattr(loras.placement, "failures", {}))
        result["fused_ffn_calls"] = sum(f.calls for f in loras.fused_ffns.values())
        result["fused_ffn_vs_branch_rel_l2"] = rel_l2(fused_out, branch_out)
        profiled("runtime_branch_fused_ffn", forward)
        costs["runtime_branch_fused_ffn"] = "base"
    loras.remove()
    if device.type == "cuda" and not args.skip_compiled:
        from wanfit.runtime.compile import compile_blocks, forward_with

        torch.compiler.reset()
        blocks = compile_blocks(dit.blocks)  # as the placement compiles them (static shapes)

        def compiled():
            return forward_with(dit, blocks, x, t, context)

        # Two warm-ups: the first compiles (and the branch's hooks recompile once).
        result["compiled_base"], compiled_base_out = time_forward(compiled, device, warmup=2, runs=args.runs)
        profiled("compiled_base", compiled)
        loras.apply([(lora, 1.0)], "runtime", fused_ffn=False)
        result["compiled_runtime_branch"], compiled_out = time_forward(
            compiled, device, warmup=2, runs=args.runs
        )
        profiled("compiled_runtime_branch", compiled)
        if fused_ffn:
            loras.set_fused_ffn(True)
            result["compiled_runtime_branch_fused_ffn"], compiled_fused_out = time_forward(
                compiled, device, warmup=2, runs=args.runs
            )
            profiled("compiled_runtime_branch_fused_ffn", compiled)
            result["compiled_fused_ffn_vs_eager_fused_ffn_rel_l2"] = rel_l2(compiled_fused_out, fused_out)
            costs["compiled_runtime_branch_fused_ffn"] = "compiled_base"
        loras.remove()
        # The branch must have run in the compiled graphs (the void 2026-12-02 figure's lesson):
        # its output is the eager branch's, and far from the compiled base's.
        result["compiled_branch_vs_eager_branch_rel_l2"] = rel_l2(compiled_out, branch_out)
        result["compiled_branch_vs_compiled_base_rel_l2"] = rel_l2(compiled_out, compiled_base_out)
        costs["compiled_runtime_branch"] = "compiled_base"
    result["eager_branch_vs_base_rel_l2"] = rel_l2(branch_out, base_out)
    merge_s["none"], _ = timed(lambda: loras.apply([(lora, 1.0)], "merge", "none"), device)
    unload_s["none"], _ = timed(lambda: loras.remove(), device)
    for key, base in costs.items():
        result[f"{key}_cost_pct"] = 100 * (result[key]["median_ms"] / result[base]["median_ms"] - 1)
    for key in {"base", *costs, *costs.values()}:
        result[key].pop("runs_ms", None)
    return result  # the DiT is freed with this frame


LORA_MODES_TIMED = ("none", "merge_per_call", "runtime")


def bench_mode_rounds(name: str, args, device, dtype) -> dict:
    """One forward without a LoRA, with the per-call merge and with the runtime branch, in alternating
    rounds (so drift in the card's clocks falls on all three), for the blocks in the compute dtype and
    stored in fp8 (upcast per block by the streamer, as Plan.storage_dtype places them; there a merge
    would round the update into fp8); eager, and compiled where the blocks stay resident. Each cost
    is the median over the rounds against the same rounds' forward without a LoRA."""
    from bench_dit import time_forward

    from wanfit.runtime.lora import DiTLoras
    from wanfit.runtime.offload import BlockStreamer

    cfg, dit, lora, (x, t, context) = dit_with_lora(name, args, device, dtype)
    result = {"config": cfg.to_dict(), "rank": args.rank, "rounds": args.mode_rounds, "runs": args.runs}

    def rounds(placement, call, warmup: int) -> dict:
        loras = DiTLoras(dit, placement)
        times = {mode: [] for mode in LORA_MODES_TIMED}
        peaks, outputs = {}, {}
        for _ in range(args.mode_rounds):
            for mode in LORA_MODES_TIMED:
                if mode != "none":
                    loras.apply([(lora, 1.0)], mode, "none")
                timing, out = time_forward(call, device, warmup=warmup, runs=args.runs)
                times[mode].append(timing["median_ms"])
                peaks[mode] = timing.get("peak_over_start_gib")
                outputs[mode] = out.float()
                loras.remove()
            warmup = 1  # compiled: the first round traced each variant
        out = {}
        for mode in LORA_MODES_TIMED:
            median = statistics.median(times[mode])
            out[mode] = {"median_ms": median, "round_ms": times[mode], "peak_over_start_gib": peaks[mode]}
            if mode != "none":
                ratios = [a / b for a, b in zip(times[mode], times["none"])]
                out[mode]["cost_pct"] = 100 * (statistics.median(ratios) - 1)
        out["per_call_vs_branch_rel_l2"] = rel_l2(outputs["merge_per_call"], outputs["runtime"])
        out["branch_vs_base_rel_l2"] = rel_l2(outputs["runtime"], outputs["none"])
        return out

    def eager():
        return dit(x, t, context)

    bare = SimpleNamespace(failures={}, streamer=None)
    bare.give_up = bare.failures.__setitem__
    result["bf16"] = rounds(bare, eager, warmup=1)
    if device.type == "cuda" and not args.skip_compiled:
        from wanfit.runtime.compile import compile_blocks, forward_with

        torch.compiler.reset()
        blocks = compile_blocks(dit.blocks)

        def compiled():
            return forward_with(dit, blocks, x, t, context)

        result["bf16_compiled"] = rounds(bare, compiled, warmup=2)
        torch.compiler.reset()
    streamer = BlockStreamer(dit.blocks, device, resident=len(dit.blocks), fp8=True, dtype=dtype)
    fp8 = SimpleNamespace(failures={}, streamer=streamer)
    fp8.give_up = fp8.failures.__setitem__
    result["fp8_storage"] = rounds(fp8, eager, warmup=1)
    streamer.close()
    from wanfit.attention import get_dispatcher

    result["attention"] = get_dispatcher().report()  # which kernel served the forwards (the base's speed)
    return result  # the DiT is freed with this frame


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def job(args, latents, steps: int, guidance: float) -> dict:
    """The call arguments both pipelines share."""
    width, height = (int(v) for v in args.size.split("x"))
    return dict(negative_prompt="blurry, static", height=height, width=width, num_frames=args.frames,
                num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone())  # fmt: skip


def run_wanfit_job(parts, args, latents, device, *, steps, guidance, sampler, shift, lora=None) -> dict:
    from dataclasses import replace

    from wanfit.pipeline import WanPipeline

    dit, vae, text_encoder = parts
    pipe = WanPipeline(dit, vae, text_encoder)  # everything resident, this machine's dtypes
    pipe.plan = replace(pipe.plan, free_text_encoder=False)  # both jobs use the same text encoder
    if lora is not None and device.type == "cuda":
        # The base kept beside the weights (as the planner keeps it where it fits): an exact, fast unload.
        pipe.plan = replace(pipe.plan, lora_base_copy="device")
    load_s = 0.0
    if lora is not None:
        load_s, _ = timed(lambda: pipe.load_lora(lora, 1.0), device)
    kwargs = job(args, latents, steps, guidance)
    total, _ = timed(lambda: pipe(PROMPT, shift=shift, sampler=sampler, progress=False, **kwargs), device)
    if lora is not None:
        pipe.unload_loras()
    return {"total_s": total, "lora_load_s": load_s, "steps": steps, "dit_calls": pipe.dit_calls,
            "phases_s": dict(pipe.timings)}  # fmt: skip


def run_diffusers_job(parts, args, latents, device, *, steps, guidance, scheduler, lora_state=None) -> dict:
    from diffusers import WanPipeline

    ref_dit, ref_vae, t5, tokenizer = parts
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=t5, transformer=ref_dit, vae=ref_vae, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    load_s = 0.0
    if lora_state is not None:
        load_s, _ = timed(lambda: pipe.load_lora_weights(dict(lora_state), adapter_name="distill"), device)
    kwargs = job(args, latents, steps, guidance)

    def call():
        with torch.no_grad():
            return pipe(PROMPT, output_type="pt", **kwargs)

    total, _ = timed(call, device)
    if lora_state is not None:
        pipe.delete_adapters("distill")
    return {"total_s": total, "lora_load_s": load_s, "steps": steps}


def bench_job(args, device) -> dict:
    from bench_pipeline import build_models, peak_gib
    from diffusers import FlowMatchLCMScheduler, UniPCMultistepScheduler

    from wanfit.pipeline import latent_shape
    from wanfit.sampling.presets import get_preset

    preset = get_preset("lightx2v-4step")
    model_args = SimpleNamespace(
        dry_run=args.tiny, layers=args.layers, text_layers=None, model=args.job_model
    )
    diffusers_parts, wanfit_parts, cfg = build_models(model_args, device)
    lora_state = lightx2v_like_lora(cfg, args.rank)
    lora = converted(lora_state, cfg)
    width, height = (int(v) for v in args.size.split("x"))
    latents = torch.randn(
        latent_shape(1, 16, height, width, args.frames), generator=torch.Generator().manual_seed(3)
    )
    latents = latents.to(device)
    full = dict(steps=args.full_steps, guidance=5.0)
    fast = dict(steps=preset.steps, guidance=preset.guidance)
    result = {
        "preset": preset.to_dict(),
        "model": "tiny" if args.tiny else args.job_model,
        "config": cfg.to_dict(),
    }
    runs = set(args.job_runs) - (set() if args.full_steps else {"diffusers_full", "wanfit_full"})
    runs -= {"diffusers_full", "diffusers_4step_lora"} if args.skip_diffusers else set()

    def measured(name, fn):
        if name in runs:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            result[name] = fn()
            result[name]["peak_gib"] = peak_gib(device)

    # diffusers first: wanfit's DiT shares diffusers' tensors, and a merge writes into them (undone after).
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    measured("diffusers_full", lambda: run_diffusers_job(diffusers_parts, args, latents, device, scheduler=unipc,
                                                         **full))  # fmt: skip
    lcm = FlowMatchLCMScheduler(shift=preset.shift)
    measured("diffusers_4step_lora", lambda: run_diffusers_job(
        diffusers_parts, args, latents, device, scheduler=lcm, lora_state=lora_state, **fast))  # fmt: skip
    measured("wanfit_full", lambda: run_wanfit_job(wanfit_parts, args, latents, device, sampler="unipc",
                                                   shift=8.0, **full))  # fmt: skip
    measured("wanfit_4step_lora", lambda: run_wanfit_job(
        wanfit_parts, args, latents, device, sampler=preset.sampler, shift=preset.shift, lora=lora, **fast))  # fmt: skip
    for tool in ("diffusers", "wanfit"):
        if f"{tool}_full" in result and f"{tool}_4step_lora" in result:
            result[f"{tool}_speedup"] = (
                result[f"{tool}_full"]["total_s"] / result[f"{tool}_4step_lora"]["total_s"]
            )
    return result


# (rows per program, columns per step, warps, stages) tried by --ffn-tiles.
FFN_TILES = [
    (bm, bf, w, st)
    for bm, bf in ((32, 64), (64, 64), (64, 128), (128, 64), (128, 32), (64, 32))
    for w in (4, 8)
    for st in (2, 3)
] + [(128, 128, 8, 2), (128, 128, 8, 3), (256, 32, 8, 2), (256, 64, 8, 2), (64, 32, 4, 4), (64, 64, 4, 4)]


def bench_ffn_tiles(name: str, args, device, dtype) -> dict:
    """One block's FFN at `name`'s shape and the job's token count, no autograd, the GELU in place:
    without a LoRA, with rank-`args.rank` branches on ffn.0 and ffn.2 as separate GEMMs (what the
    runtime branch does without the kernel), and with the fused kernel at each of FFN_TILES; the
    fused outputs' relative L2 against the separate GEMMs'."""
    from bench_dit import latent_shape, time_forward

    from wanfit.models.configs import DIT_PRESETS
    from wanfit.models.dit import WanBlock
    from wanfit.runtime import lora_ffn
    from wanfit.runtime.lora import LowRankBranch, _add_product, _product

    cfg = DIT_PRESETS[name]
    frames, height, width = latent_shape(args.size, args.frames)
    tokens = frames * height * width // 4
    torch.manual_seed(0)
    with torch.device(device):
        block = WanBlock(cfg).to(dtype).eval()
    block.ffn_gelu_in_place = True
    first, _, second = block.ffn
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(1, tokens, cfg.dim, generator=gen).to(device, dtype)

    def factors(rows, cols):
        down = torch.randn(args.rank, cols, generator=gen) / cols**0.5
        up = 0.5 * torch.randn(rows, args.rank, generator=gen) / args.rank**0.5
        return LowRankBranch(down, up)

    b0, b2 = factors(cfg.ffn_dim, cfg.dim), factors(cfg.dim, cfg.ffn_dim)
    for b in (b0, b2):
        b.make_device_copies(device, dtype)
    up0, down0 = b0._up.on(device, dtype), b0._down.on(device, dtype)
    up2, down2 = b2._up.on(device, dtype), b2._down.on(device, dtype)

    def base():
        return block.feed_forward(h)

    def separate():
        first.low_rank, second.low_rank = b0, b2
        try:
            return block.feed_forward(h)
        finally:
            first.low_rank = second.low_rank = None

    def fused(tiles):
        def run():
            h0 = torch.nn.functional.linear(h, down0)
            hidden = first.product(h)
            h2 = lora_ffn.gelu_low_rank_triton(hidden, h0, up0, down2, hidden, tiles)
            out = _product(h2, up2, second.bias)
            _add_product(out, hidden, second.weight)
            return out

        return run

    def cuda_ms(fn) -> float:
        return time_forward(fn, device, warmup=2, runs=20)[0]["median_ms"]

    result = {"tokens": tokens, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "rank": args.rank, "tiles": []}
    with torch.no_grad():
        result["base_ms"] = cuda_ms(base)
        result["separate_ms"] = cuda_ms(separate)
        want = separate().float()
        for tiles in FFN_TILES:
            row = {"tiles": list(tiles)}
            try:
                got = fused(tiles)().float()
                row["rel_l2_vs_separate"] = ((got - want).norm() / want.norm()).item()
                row["ms"] = cuda_ms(fused(tiles))
            except Exception as err:  # noqa: BLE001 - a tile setting the card cannot run is recorded
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            result["tiles"].append(row)
            print(name, row, flush=True)
        timed_rows = [r for r in result["tiles"] if "ms" in r]
        best = min(timed_rows, key=lambda r: r["ms"]) if timed_rows else None
        result["best"] = best
        if best is not None:
            result["branch_separate_ms"] = result["separate_ms"] - result["base_ms"]
            result["branch_fused_ms"] = best["ms"] - result["base_ms"]
        result["lora_effect_rel_l2"] = ((want - base().float()).norm() / want.norm()).item()
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.ffn_tiles and (args.tiny or not torch.cuda.is_available()):
        raise SystemExit("--ffn-tiles times the Triton kernel on a CUDA GPU.")
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.models, args.size, args.frames, args.full_steps, args.rank, args.runs = (
            "tiny" if args.models else "",
            "64x48",
            5,
            3,
            4,
            1,
        )
    else:
        if not torch.cuda.is_available():
            raise SystemExit("No CUDA device: use --tiny to check the script.")
        device, dtype = torch.device("cuda"), torch.bfloat16
    result = {
        "benchmark": "bench_lora",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "frames": args.frames,
        "dit": {},
    }
    from bench_pipeline import finish, stage

    for name in filter(None, args.models.split(",")):
        tiles = None
        if args.ffn_tiles:  # the kernel's tiles for this shape first; the DiT's forwards then use the best
            from wanfit.runtime import lora_ffn

            stage(f"DiT {name}: the fused LoRA FFN kernel's tiles")
            result.setdefault("ffn", {})[name] = sweep = bench_ffn_tiles(name, args, device, dtype)
            torch.cuda.empty_cache()
            tiles, lora_ffn.TILES = lora_ffn.TILES, tuple(sweep["best"]["tiles"])
        if not args.skip_sequence:
            stage(f"DiT {name}: merge, unload and forwards")
            result["dit"][name] = bench_dit(name, args, device, dtype)
        if args.mode_rounds:
            stage(f"DiT {name}: no LoRA, per-call merge and branch in alternating rounds")
            result.setdefault("modes", {})[name] = bench_mode_rounds(name, args, device, dtype)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if tiles is not None and name in result["dit"]:
            result["dit"][name]["fused_ffn_tiles"] = list(lora_ffn.TILES)
            lora_ffn.TILES = tiles
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_job:
        stage("the 4-step and full jobs")
        result["job"] = bench_job(args, device)
    return finish(result, args.out)


if __name__ == "__main__":
    main()
