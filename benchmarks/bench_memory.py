"""Predicted vs measured peak memory of each phase under several plans, and DiT step time resident vs
streamed, side by side with diffusers' block group offload on the same random weights.

    python3 benchmarks/bench_memory.py --out $OUT/bench_memory.json [--model-size 1.3B|14B]
        [--layers N] [--size 832x480] [--frames 81] [--repeats 5] [--te-layers 24]
        [--skip-diffusers] [--skip-text-encoder] [--skip-vae] [--dry-run]

Peaks are torch.cuda.max_memory_allocated after reset_peak_memory_stats, with the model placed as the
plan says (so resident weights count); predictions are the planner's estimates of the same thing
(estimates.estimate_* with others=False: only the model being measured is on the card). Times are
CUDA-event medians after a warm-up. Weights and inputs are random (never zero). --dry-run prints the
predictions only (no GPU needed); --layers shortens the DiT (the estimates follow).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_dit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

GIB = 1024**3


def dit_plans() -> list[tuple[str, dict, int]]:
    """(name, Plan fields, batch) of the DiT forwards to measure."""
    return [
        ("resident, CFG batched", {}, 2),
        ("resident", {"cfg_batch": False}, 1),
        # The fast tier: its fp8 copies, and its GEMMs' buffers with the quantisation fused or not.
        ("fast tier compiled, CFG batched", {"fp8_gemm": True, "compile_dit": True}, 2),
        ("fast tier eager", {"cfg_batch": False, "fp8_gemm": True}, 1),
        ("streamed k=6", {"cfg_batch": False, "dit_blocks_resident": 6}, 1),
        ("streamed k=2", {"cfg_batch": False, "dit_blocks_resident": 2}, 1),
        ("streamed k=0", {"cfg_batch": False, "dit_blocks_resident": 0}, 1),
        (
            "fp8 streamed k=2",
            {"cfg_batch": False, "dit_blocks_resident": 2, "storage_dtype": "float8_e4m3fn"},
            1,
        ),
        (
            "chunked FFN 4096, attention 4096",
            {"cfg_batch": False, "ffn_chunk": 4096, "attention_chunk": 4096},
            1,
        ),
    ]


VAE_TILES = [None, 32, 16]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/bench_memory.json"))
    p.add_argument("--model-size", choices=("1.3B", "14B"), default="1.3B")
    p.add_argument("--layers", type=int, default=None, help="DiT blocks (default: the model's)")
    p.add_argument("--size", default="832x480", help="WIDTHxHEIGHT")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--te-layers", type=int, default=24, help="umT5 blocks (24 = XXL)")
    p.add_argument("--backend", default="sdpa_flash", help="attention backend name the estimates assume")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--skip-text-encoder", action="store_true")
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="predictions only, no GPU")
    return p.parse_args(argv)


def make_request(args):
    from wanfit.models.configs import DIT_PRESETS, WAN21_TEXT_ENCODER
    from wanfit.plan.estimates import Request

    config = DIT_PRESETS[args.model_size]
    if args.layers:
        config = config.with_overrides(num_layers=args.layers)
    width, height = (int(v) for v in args.size.lower().split("x"))
    return Request(
        config,
        height=height,
        width=width,
        num_frames=args.frames,
        guidance=True,
        model_name=args.model_size,
        text_encoder=replace(WAN21_TEXT_ENCODER, num_layers=args.te_layers),
    )


def make_plan(**fields):
    from wanfit.plan.plan import Plan

    base = {"device": "cuda", "compute_dtype": "bfloat16", "text_encoder_device": "cuda"}
    base.update(text_encoder_dtype="bfloat16", offload_dit_before_decode=True)
    return Plan(**{**base, **fields})


def predictions(args) -> list[dict]:
    """One row per measurement, with the planner's prediction filled in."""
    from wanfit.plan import estimates as E

    req = make_request(args)
    rows = []
    for name, fields, batch in dit_plans():
        plan = make_plan(**fields)
        est = E.estimate_denoise(req, plan, args.backend, others=False)
        rows.append(
            {
                "phase": "denoise",
                "plan": name,
                "batch": batch,
                "predicted": est.peak,
                "estimate": est.to_dict(),
            }
        )
    if not args.skip_vae:
        for tile in VAE_TILES:
            plan = make_plan(vae_tile=None if tile is None else (tile, tile))
            est = E.estimate_vae_decode(req, plan, args.backend, others=False)
            name = "untiled" if tile is None else f"tiles {tile}x{tile}"
            rows.append(
                {"phase": "vae_decode", "plan": name, "predicted": est.peak, "estimate": est.to_dict()}
            )
    if not args.skip_text_encoder:
        est = E.estimate_text_encoder(req, make_plan(), others=False)
        rows.append(
            {
                "phase": "text_encoder",
                "plan": f"umT5 {args.te_layers} layers, 2 prompts",
                "predicted": est.peak,
                "estimate": est.to_dict(),
            }
        )
    return rows


# ----------------------------------------------------------------------------- GPU measurements


def _cuda_time(fn, repeats: int) -> tuple[float, int]:
    """(median ms, peak bytes) of fn() after one warm-up call."""
    import torch

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated()


def _random_dit(config):
    import torch

    from wanfit.models.dit import WanDiT

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: no fp32 copy of a 14B model
    try:
        dit = WanDiT(config)
    finally:
        torch.set_default_dtype(previous)
    return dit.eval().requires_grad_(False)


def _dit_inputs(req, batch: int):
    import torch

    from wanfit.pipeline import latent_shape

    g = torch.Generator("cpu").manual_seed(1)
    shape = latent_shape(batch, req.config.in_dim, req.height, req.width, req.num_frames)
    x = torch.randn(shape, generator=g).to("cuda", torch.bfloat16)
    t = torch.full((batch,), 500.0, device="cuda")
    context = torch.randn(batch, req.config.text_len, req.config.text_dim, generator=g).to(
        "cuda", torch.bfloat16
    )
    return x, t, context


def measure_dit(args, req, rows: list[dict]) -> None:
    import torch

    from wanfit.runtime.placement import DiTPlacement

    dit = _random_dit(req.config)
    placement = DiTPlacement(dit)
    by_name = {r["plan"]: r for r in rows if r["phase"] == "denoise"}
    for name, fields, batch in dit_plans():
        row = by_name[name]
        try:
            placement.place(make_plan(**fields))
            x, t, context = _dit_inputs(req, batch)
            with torch.no_grad():
                ms, peak = _cuda_time(lambda x=x, t=t, c=context: placement(x, t, c), args.repeats)
            row.update(measured=peak, ms=ms, ms_per_sample=ms / batch)
        except Exception as err:  # one plan failing must not lose the others
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        finally:
            x = t = context = None
            placement.release()
            torch.cuda.empty_cache()
    if not args.skip_diffusers:
        measure_diffusers(args, req, dit, rows)


def measure_diffusers(args, req, dit, rows: list[dict]) -> None:
    """diffusers' WanTransformer3DModel on our random weights: resident, and block group offload."""
    import torch

    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        rows.append({"phase": "denoise", "plan": "diffusers", "error": f"diffusers not importable: {err}"})
        return
    from bench_dit import make_diffusers_model

    from wanfit.weights.dit_keys import official_to_diffusers

    model = make_diffusers_model(req.config, torch.device("cpu"), torch.bfloat16, seed=0)
    state = official_to_diffusers(dit.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    model = model.eval().requires_grad_(False).to(torch.bfloat16)
    note = (
        f"missing {len(missing)}, unexpected {len(unexpected)} keys"
        if missing or unexpected
        else "same weights"
    )
    x, t, context = _dit_inputs(req, 1)

    def forward():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]

    for name, setup in (
        ("diffusers resident", lambda: model.to("cuda")),
        (
            "diffusers group offload (block, stream)",
            lambda: (
                model.to("cpu"),
                model.enable_group_offload(
                    torch.device("cuda"),
                    offload_device=torch.device("cpu"),
                    offload_type="block_level",
                    num_blocks_per_group=1,
                    use_stream=True,
                ),
            ),
        ),
    ):
        row = {"phase": "denoise", "plan": name, "batch": 1, "note": note}
        try:
            setup()
            torch.cuda.empty_cache()
            with torch.no_grad():
                ms, peak = _cuda_time(forward, args.repeats)
            row.update(measured=peak, ms=ms, ms_per_sample=ms)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)


def measure_vae(args, req, rows: list[dict]) -> None:
    import torch

    from wanfit.pipeline import frames_to_uint8

    try:
        from wanfit.models.vae import WanVAE
    except ImportError as err:
        for row in rows:
            if row["phase"] == "vae_decode":
                row["error"] = f"wanfit.models.vae not importable: {err}"
        return
    torch.manual_seed(2)
    vae = WanVAE().to("cuda", torch.bfloat16).eval().requires_grad_(False)
    h, w = req.latent_hw
    z = torch.randn(1, 16, req.latent_frames, h, w, generator=torch.Generator("cpu").manual_seed(3))
    z = z.to("cuda", torch.bfloat16)
    decode_rows = [r for r in rows if r["phase"] == "vae_decode"]
    for tile, row in zip(VAE_TILES, decode_rows):
        try:
            with torch.no_grad():
                ms, peak = _cuda_time(
                    lambda tile=tile: frames_to_uint8(vae.decode(z, tile=tile)), max(1, args.repeats // 3)
                )
            row.update(measured=peak, ms=ms)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        torch.cuda.empty_cache()


def measure_text_encoder(args, req, rows: list[dict]) -> None:
    import torch

    row = next(r for r in rows if r["phase"] == "text_encoder")
    try:
        from transformers import UMT5Config, UMT5EncoderModel
    except ImportError as err:
        row["error"] = f"transformers not importable: {err}"
        return
    te = req.text_encoder
    config = UMT5Config(
        vocab_size=te.vocab,
        d_model=te.dim,
        d_kv=te.dim // te.num_heads,
        d_ff=te.ffn_dim,
        num_layers=te.num_layers,
        num_heads=te.num_heads,
        relative_attention_num_buckets=te.num_buckets,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    torch.manual_seed(4)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = UMT5EncoderModel(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    ids = torch.randint(0, te.vocab, (2, te.text_len), device="cuda")
    mask = torch.ones_like(ids)
    try:
        with torch.no_grad():
            ms, peak = _cuda_time(
                lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state, args.repeats
            )
        row.update(measured=peak, ms=ms)
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:300]


# ----------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    lines = [f"{'phase':<13}{'plan':<42}{'predicted':>11}{'measured':>11}{'error':>8}{'ms':>10}"]
    for r in rows:
        pred = f"{r['predicted'] / GIB:.2f}G" if "predicted" in r else "-"
        meas = f"{r['measured'] / GIB:.2f}G" if "measured" in r else "-"
        err = (
            f"{100 * (r['predicted'] - r['measured']) / r['measured']:+.0f}%"
            if "predicted" in r and "measured" in r
            else "-"
        )
        ms = f"{r['ms']:.1f}" if "ms" in r else ("FAIL" if "error" in r else "-")
        lines.append(f"{r['phase']:<13}{r['plan'][:41]:<42}{pred:>11}{meas:>11}{err:>8}{ms:>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    req = make_request(args)
    rows = predictions(args)
    info = {
        "request": {
            "model": args.model_size,
            "layers": req.config.num_layers,
            "size": args.size,
            "frames": args.frames,
            "tokens": req.tokens,
        },
        "backend_assumed": args.backend,
    }
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("bench_memory: no CUDA device; use --dry-run for predictions only.", file=sys.stderr)
            return 2
        info["device"] = torch.cuda.get_device_name()
        info["torch"] = torch.__version__
        started = time.perf_counter()
        for step in (measure_dit, measure_vae, measure_text_encoder):
            if (
                step is measure_vae
                and args.skip_vae
                or step is measure_text_encoder
                and args.skip_text_encoder
            ):
                continue
            try:
                step(args, req, rows)
            except Exception as err:  # e.g. a model not yet in the package: keep the rest
                rows.append(
                    {"phase": step.__name__, "plan": "-", "error": f"{type(err).__name__}: {err}"[:300]}
                )
            torch.cuda.empty_cache()
        info["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**info, "rows": rows}, indent=2, default=str))
    print(json.dumps(info, default=str))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
