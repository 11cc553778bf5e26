"""The whole text-to-video job: wanfit's WanPipeline vs diffusers' WanPipeline on the same GPU.

    PYTHONPATH=/tmp/site:src python3 benchmarks/bench_pipeline.py --out $OUT/pipeline.json
    python3 benchmarks/bench_pipeline.py --steps 4 --size 480x320 --frames 17      # shorter
    python3 benchmarks/bench_pipeline.py --dry-run                                  # CPU, tiny: logic only

Real Wan2.1 T2V-1.3B configs (DiT, VAE, umT5-XXL) with random weights shared by both pipelines
(random weights cost the same time and memory as the real ones). No real tokenizer is available
offline, so both use wanfit's built-in character tokenizer; the encoder still sees 512 tokens.
Both get the same initial latents, prompt, negative prompt, steps and guidance; diffusers runs
its default (cond and uncond one after the other, SDPA attention, everything on the GPU), wanfit
runs the plan its planner picks for this card (printed). Reported: seconds per phase, seconds per
denoising step, peak memory, and the agreement of the two videos.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import wanfit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# Both pipelines sample with this scheduler, so the videos can be compared.
SCHEDULER = dict(
    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0, num_train_timesteps=1000
)
PROMPT = "a red fox running through fresh snow at dawn, cinematic lighting"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--layers", type=int, default=None, help="DiT blocks (default: all)")
    p.add_argument("--text-layers", type=int, default=None, help="umT5 blocks (default: all 24)")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="force a plan setting",
    )
    p.add_argument(
        "--plan-args", default="", help="extra `wanfit plan` options for wanfit's plan, e.g. '--vram 4GiB'"
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models: checks the script only")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def build_models(args, device):
    """diffusers' transformer/VAE/umT5 with random weights, and wanfit's views of the same tensors."""
    from bench_dit import make_diffusers_model, wanfit_from_diffusers
    from bench_vae import make_models as make_vaes
    from transformers import UMT5Config, UMT5EncoderModel

    from wanfit.demo import tiny_tokenizer
    from wanfit.models.configs import DIT_PRESETS, WAN_TINY
    from wanfit.models.text_encoder import WanTextEncoder
    from wanfit.models.vae import WAN21_VAE, WAN_VAE_TINY

    dtype = torch.float32 if args.dry_run else torch.bfloat16
    # args.model: a DIT_PRESETS name (bench_lora's --job-model); the 1.3B without one.
    dit_cfg = WAN_TINY if args.dry_run else DIT_PRESETS[getattr(args, "model", None) or "1.3B"]
    if args.layers:
        dit_cfg = dit_cfg.with_overrides(num_layers=args.layers)
    ref_dit = make_diffusers_model(dit_cfg, device, dtype, seed=0)
    dit = wanfit_from_diffusers(ref_dit, dit_cfg)

    vae_cfg = WAN_VAE_TINY if args.dry_run else WAN21_VAE
    ref_vae, vae = make_vaes(vae_cfg, dtype, seed=1, with_diffusers=True)
    ref_vae, vae = ref_vae.to(device), vae.to(device)

    tokenizer = tiny_tokenizer()
    if args.dry_run:
        t5_cfg = UMT5Config(
            vocab_size=len(tokenizer), d_model=dit_cfg.text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4
        )
    else:
        t5_cfg = UMT5Config(
            vocab_size=256384,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=args.text_layers or 24,
            num_heads=64,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_encoder_decoder=False,
            tie_word_embeddings=False,
        )
    torch.manual_seed(2)
    with torch.device(device):
        t5 = UMT5EncoderModel(t5_cfg).to(dtype).eval().requires_grad_(False)
    text_encoder = WanTextEncoder(t5, tokenizer, cache=None)
    return (ref_dit, ref_vae, t5, tokenizer), (dit, vae, text_encoder), dit_cfg


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_diffusers(parts, args, latents, device):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    ref_dit, ref_vae, t5, tokenizer = parts
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=t5, transformer=ref_dit, vae=ref_vae, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    width, height = (int(v) for v in args.size.split("x"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        video = pipe(
            PROMPT,
            negative_prompt="blurry, static",
            height=height,
            width=width,
            num_frames=args.frames,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            latents=latents.clone(),
            output_type="pt",
        ).frames[0]
    sync(device)
    total = time.perf_counter() - start
    frames = (video.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().clip(0, 255).astype("uint8")
    return {"total_s": total, "peak_gib": peak_gib(device)}, frames


def run_wanfit(parts, args, latents, device, plan):
    from wanfit.pipeline import SamplingDefaults, WanPipeline

    dit, vae, text_encoder = parts
    import tempfile

    from diffusers import UniPCMultistepScheduler

    config_path = Path(tempfile.mkdtemp()) / "scheduler_config.json"
    UniPCMultistepScheduler(**SCHEDULER).save_config(str(config_path.parent))
    pipe = WanPipeline(
        dit, vae, text_encoder, plan=plan, defaults=SamplingDefaults(shift=8.0), scheduler_config=config_path
    )
    width, height = (int(v) for v in args.size.split("x"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    step_times = []

    def on_step(state):
        sync(device)
        step_times.append(time.perf_counter())

    frames = pipe(
        PROMPT,
        negative_prompt="blurry, static",
        height=height,
        width=width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        latents=latents.clone(),
        progress=False,
        on_step=on_step,
    )
    sync(device)
    total = time.perf_counter() - start
    per_step = [b - a for a, b in zip(step_times, step_times[1:])]
    # The pipeline resets the peak counter per phase: the run's peak is the largest phase peak.
    phase_peaks = [v for k, v in pipe.timings.items() if k.endswith("_peak_gib")]
    result = {"total_s": total, "peak_gib": max(phase_peaks, default=None), "phases_s": dict(pipe.timings)}
    if pipe.step_cache_report is not None:
        result["step_cache"] = pipe.step_cache_report
    if per_step:
        result["first_step_end_s"] = step_times[0] - start
        result["median_step_s"] = sorted(per_step)[len(per_step) // 2]
    return result, frames


def wanfit_plan(args, device, dit_cfg, parts=None):
    """The plan wanfit's planner picks for this job on this card, as `wanfit generate` would.

    parts: wanfit's (dit, vae, text encoder), whose real shapes the request carries (a tiny dry run
    plans tiny); None: the released text encoder and VAE."""
    from wanfit.plan.planning import Constraints, plan_for

    constraints = Constraints.from_options(device=str(device), settings=args.overrides)
    return plan_for(job_request(args, dit_cfg, parts), constraints)


def job_request(args, dit_cfg, parts=None, steps: int | None = None):
    """The planner's Request for the benchmarked job, with the built parts' real shapes (see wanfit_plan)."""
    from wanfit.models.configs import TextEncoderConfig
    from wanfit.plan.estimates import Request

    width, height = (int(v) for v in args.size.split("x"))
    shapes = {}
    if parts is not None:
        _, vae, text_encoder = parts
        shapes = {
            "vae": vae.config,
            "text_encoder": TextEncoderConfig.from_umt5(text_encoder.model.config.to_dict()),
        }
    return Request(
        dit_cfg,
        height=height,
        width=width,
        num_frames=args.frames,
        guidance=args.guidance != 1.0,
        steps=steps,
        **shapes,
    )


_STARTED = time.perf_counter()


def stage(message: str) -> None:
    """A progress line on stderr at once, so a run cut off at its time limit shows how far it got."""
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def finish(result: dict, out: str | None) -> dict:
    """Print the result as JSON and write it to `out` too."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return result


def job_header(benchmark: str, args, device) -> dict:
    """The first keys of a job benchmark's JSON: what ran where."""
    return {
        "benchmark": benchmark,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "frames": args.frames,
        "steps": args.steps,
        "guidance": args.guidance,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        args.size, args.frames, args.steps = "64x48", 5, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("No CUDA device: use --dry-run to check the script.")
        device = torch.device("cuda")
    stage("building random models")
    diffusers_parts, wanfit_parts, dit_cfg = build_models(args, device)
    stage("models built")
    width, height = (int(v) for v in args.size.split("x"))
    from wanfit.pipeline import latent_shape

    latents = torch.randn(
        latent_shape(1, 16, height, width, args.frames), generator=torch.Generator().manual_seed(3)
    )
    latents = latents.to(device)
    plan = wanfit_plan(args, device, dit_cfg, wanfit_parts)
    result = {**job_header("bench_pipeline", args, device), "plan": plan.plan.to_dict()}
    result["wanfit"], ours = run_wanfit(wanfit_parts, args, latents, device, plan)
    result["wanfit"]["s_per_step"] = result["wanfit"]["phases_s"]["denoise_s"] / args.steps
    if not args.skip_diffusers:
        result["diffusers"], theirs = run_diffusers(diffusers_parts, args, latents, device)
        result["speedup_total"] = result["diffusers"]["total_s"] / result["wanfit"]["total_s"]
        diff = abs(ours.astype("float64") - theirs.astype("float64"))
        result["mean_abs_diff_uint8"] = float(diff.mean())
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return result


def table(r: dict) -> str:
    lines = [
        f"bench_pipeline on {r['device']}, torch {r['torch']}: {r['size']} x {r['frames']} frames, "
        f"{r['steps']} steps, guidance {r['guidance']}",
        f"wanfit plan: {json.dumps(r['plan'])}",
        f"{'pipeline':<10} {'total s':>9} {'peak GiB':>9}  phases",
    ]
    for name in ("wanfit", "diffusers"):
        if name in r:
            x = r[name]
            peak = f"{x['peak_gib']:.2f}" if x.get("peak_gib") is not None else "-"
            phases = ", ".join(f"{k} {v:.2f}" for k, v in x.get("phases_s", {}).items())
            if "median_step_s" in x:
                phases += f"; median step {x['median_step_s']:.3f} s, first step done at {x['first_step_end_s']:.1f} s"
            lines.append(f"{name:<10} {x['total_s']:>9.2f} {peak:>9}  {phases}")
    if "speedup_total" in r:
        lines.append(
            f"diffusers/wanfit total time {r['speedup_total']:.3f}; mean |frame diff| {r['mean_abs_diff_uint8']:.2f}/255"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
