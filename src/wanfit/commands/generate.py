"""`wanfit generate`: text to an mp4 (or a folder of PNGs)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from wanfit.errors import ConfigError

# Without --model the built-in tiny random model runs, at a size a CPU finishes in seconds.
TINY_DEFAULTS = {"size": "320x192", "frames": 17, "steps": 10}
MODEL_DEFAULTS = {"size": "832x480", "frames": 81, "steps": None}


def parse_size(text: str) -> tuple[int, int]:
    """'832x480' -> (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like WIDTHxHEIGHT (e.g. 832x480), got {text!r}.") from None
    return width, height


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a video from a prompt",
        description="Generate a video from a text prompt. Without --model a built-in tiny random model runs "
        "(it draws noise; it shows the tool works without downloading 17 GB).",
    )
    p.add_argument("--model", type=Path, help="model folder: official Wan2.1 release or diffusers layout")
    p.add_argument("--prompt", default="a red fox running through fresh snow, cinematic lighting")
    p.add_argument("--negative-prompt", default=None, help="default: the official negative prompt")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT, multiples of 16 (default 832x480)")
    p.add_argument("--frames", type=int, default=None, help="4k+1 frames (default 81)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50)")
    p.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance (default 6; 1 = off)"
    )
    p.add_argument(
        "--shift", type=float, default=None, help="flow shift (default 8, or the folder's scheduler)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="FILE.mp4, or a folder name for PNG frames")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: the best one found)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="save progress every N steps")
    p.add_argument(
        "--resume", type=Path, default=None, metavar="FILE", help="finish a run from its checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanfit import checkpointing
    from wanfit.pipeline import validate_request
    from wanfit.video import check_writable, safe_filename, write_video

    resume_state = None
    if args.resume is not None:
        resume_state, saved = checkpointing.load(args.resume)
        for key, value in saved.items():  # the run's own settings win over flags
            setattr(args, key, Path(value) if key in ("model", "out") and value is not None else value)

    defaults = TINY_DEFAULTS if args.model is None else MODEL_DEFAULTS
    width, height = parse_size(args.size or defaults["size"])
    frames = args.frames if args.frames is not None else defaults["frames"]
    steps = args.steps if args.steps is not None else defaults["steps"]
    validate_request(height, width, frames, steps or 1, 0.0 if args.guidance is None else args.guidance)
    if args.checkpoint_every < 0:
        raise ConfigError("--checkpoint-every must be 0 (off) or a positive number of steps.")
    if not args.prompt.strip():
        print(
            "wanfit: warning: the prompt is empty; the video follows the negative prompt alone.",
            file=sys.stderr,
        )

    out = args.out or Path(f"{safe_filename(args.prompt)}_{args.seed}.mp4")
    check_writable(out, overwrite=args.overwrite or args.resume is not None)

    pipe = _load_pipeline(args)
    request = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "size": f"{width}x{height}",
        "frames": frames,
        "steps": steps,
        "guidance": args.guidance,
        "shift": args.shift,
        "seed": args.seed,
        "model": None if args.model is None else str(args.model),
        "out": str(out),
    }
    ckpt_path = out.with_name(out.name + ".ckpt")
    on_step = None
    if args.checkpoint_every:

        def on_step(state):
            if state.step % args.checkpoint_every == 0:
                checkpointing.save(ckpt_path, state, request)

    # Ctrl-C: finish the step in flight, keep the checkpoint, exit cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    frames_out = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=args.guidance,
        shift=args.shift,
        seed=args.seed,
        progress=not args.no_progress,
        resume=resume_state,
        on_step=on_step,
    )
    metadata = {**request, "plan": pipe.plan.to_dict(), "timings": pipe.timings, "tool": "wanfit"}
    write_video(frames_out, out, metadata=metadata)
    ckpt_path.unlink(missing_ok=True)
    print(f"wrote {out} ({frames_out.shape[0]} frames, {width}x{height})")
    if args.model is None:
        print(
            "note: this was the built-in tiny random model, so the video is noise. "
            "Point --model at a downloaded Wan2.1 folder for real videos (see README)."
        )
    print(json.dumps({"timings": pipe.timings}))
    return 0


def _load_pipeline(args):
    from wanfit.pipeline import WanPipeline

    if args.model is None:
        from wanfit.demo import tiny_pipeline

        return tiny_pipeline(device=args.device)
    return WanPipeline.from_pretrained(args.model, device=args.device)
