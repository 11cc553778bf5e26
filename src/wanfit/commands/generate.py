"""`wanfit generate`: text to a video (mp4, webm, gif) or a folder of PNG frames.

Every setting is checked before any model is loaded, so a typo costs a second, not a model load.
The output appears complete or not at all (wanfit.video writes a temporary and renames it). With
`--checkpoint-every N` the run keeps a resume file beside the output: every N steps, after the last
step, and on Ctrl-C or a crash (the last finished step), so `--resume FILE` loses no finished step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from wanfit.commands import common
from wanfit.commands.common import add_hardware_options, add_plan_options, parse_size, user_path
from wanfit.commands.lora_options import add_lora_options
from wanfit.commands.parallel import add_parallel_options, parallel_constraints
from wanfit.errors import ConfigError, OutputError

MODEL_DEFAULTS = {"size": "832x480", "frames": 81, "steps": None}
DEFAULT_PROMPT = "a red fox running through fresh snow, cinematic lighting"
# Settings a resumed run takes from its resume file (together they fix the frames).
RESUMED = ("prompt", "negative_prompt", "size", "frames", "steps", "guidance", "shift", "seed", "model")
RESUMED += ("sampler",)  # absent from older resume files: None, the model's default
RESUMED += common.COMPONENTS  # the parts named one by one (absent from older files: None)
PATHS = ("model", *common.COMPONENTS)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from wanfit.builtin import DEFAULT_PROMPT as BUILTIN_PROMPT
    from wanfit.builtin import SAMPLING as BUILTIN_SAMPLING

    builtin = builtin_defaults()
    p = sub.add_parser(
        "generate",
        help="generate a video from a prompt",
        description="Generate a video from a text prompt. Without --model the built-in model runs: a tiny "
        "Wan2.1 that draws one shape moving over a plain background, in seconds on a CPU, with no download "
        f"(e.g. {BUILTIN_PROMPT!r}; `wanfit demo prompts` lists what it can draw).",
    )
    common.add_model_options(
        p, "model folder: official Wan2.1 release, diffusers layout or a ComfyUI models/ folder"
    )
    p.add_argument(
        "--prompt",
        default=None,
        help=f"what to draw (default: {DEFAULT_PROMPT!r}, or {BUILTIN_PROMPT!r} without --model)",
    )
    p.add_argument(
        "--prompts",
        type=user_path,
        default=None,
        metavar="FILE",
        help="a batch: one prompt a line, or JSON lines with per-prompt settings (--out: their folder); "
        "with --gpus, each video on all the GPUs",
    )
    p.add_argument(
        "--resume-batch",
        action="store_true",
        help="with --prompts: skip each video already written with the same settings, make the rest",
    )
    p.add_argument(
        "--videos-per-prompt",
        type=int,
        default=1,
        metavar="N",
        help="videos of each prompt (seeds seed..seed+N-1)",
    )
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="default: the model's (the official one; empty for the built-in model)",
    )
    p.add_argument(
        "--size",
        default=None,
        help=f"WIDTHxHEIGHT, multiples of 16 (default {builtin['size']} for the built-in model, "
        f"{MODEL_DEFAULTS['size']} with --model)",
    )
    p.add_argument(
        "--frames",
        type=int,
        default=None,
        help=f"4k+1 frames (default {builtin['frames']} built-in, {MODEL_DEFAULTS['frames']} with --model)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"denoising steps (default {BUILTIN_SAMPLING.num_inference_steps} built-in, 50 with --model, or the preset's)",
    )
    p.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance (default 6; 1 = off)"
    )
    p.add_argument(
        "--shift", type=float, default=None, help="flow shift (default 8, or the folder's scheduler)"
    )
    p.add_argument("--seed", type=int, default=None, help="noise seed (default 0)")
    p.add_argument(
        "--out",
        type=user_path,
        default=None,
        help="FILE.mp4, FILE.webm or FILE.gif, or a name without an extension for a folder of PNG frames",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (only one wanfit wrote)"
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: the best one found)")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="keep a resume file (OUT.ckpt): every N steps, after the last one and on Ctrl-C",
    )
    p.add_argument(
        "--resume", type=user_path, default=None, metavar="FILE", help="finish a run from its resume file"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars and no plan/time line before the work"
    )
    add_lora_options(p)
    add_hardware_options(p)
    add_plan_options(p)
    add_parallel_options(p)
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Settings:
    """The run's checked settings (None: the model's default, resolved once it is loaded)."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    frames: int
    steps: int | None
    guidance: float | None
    shift: float | None
    seed: int
    checkpoint_every: int
    out: Path
    sampler: str | None = None
    preset: str | None = None


def run(args: argparse.Namespace) -> int:
    """One process, or (--gpus, --parallel, a parallel resume file) the processes of a run on several
    GPUs, started here or by torchrun: each runs _run in a parallel session (wanfit.runtime.parallel)."""
    from wanfit.runtime.parallel import session, world_size_from_env

    if args.prompts is not None:
        from wanfit.commands.batch import run_batch

        return run_batch(args)
    if args.resume_batch:
        raise ConfigError("--resume-batch continues a batch; give its prompts with --prompts FILE.")
    if args.videos_per_prompt != 1:
        raise ConfigError("--videos-per-prompt belongs to a batch; give the prompts with --prompts FILE.")

    if world_size_from_env() == 1 and (args.gpus is not None or args.parallel is not None or args.resume):
        code = _launch(args)
        if code is not None:
            return code
    with session(_session_device(args)) as current:
        return _run(args, current)


def _run(args: argparse.Namespace, current) -> int:
    import torch

    from wanfit import checkpointing
    from wanfit.commands.lora_options import apply_loras, apply_preset, lora_requests, read_loras
    from wanfit.plan.parallel import format_parallel
    from wanfit.runtime.parallel import dit_parallel
    from wanfit.video import write_video

    preset = apply_preset(args)
    settings, resume_state, _, saved = _settings(args, current.world_size)
    requests = lora_requests(args, preset)
    if saved is not None and not args.lora:
        requests = checkpointing.saved_lora_requests(saved)  # the resumed run's own LoRAs
    loras = read_loras(requests, _dit_config(args), args.lora_skip_unknown)
    if saved is not None:
        checkpointing.check_same_loras(saved, [lora.record(s) for lora, s in loras], args.resume)
    if current.is_parallel and args.device is not None and torch.device(args.device).index is not None:
        raise ConfigError(
            f"--device {args.device} names one GPU, but each process of a run on several uses the GPU of "
            "its local rank; give --device cuda or cpu."
        )
    hardware = _hardware(args)
    planned = plan_job(args, settings, hardware, current, loras=loras)
    if planned.plan.cache is not None:
        check_cache(planned, args, settings, [lora.record(s) for lora, s in loras])
    ckpt, resuming_own_file = _check_output(args, settings)
    if not settings.prompt.strip() and current.is_output_rank:
        print(
            "wanfit: warning: the prompt is empty; the video follows the negative prompt alone.",
            file=sys.stderr,
        )

    if not args.no_progress and current.is_output_rank:
        announce(planned, settings)
    pipe = _load_pipeline(args, planned, with_text_encoder=current.runs_text_encoder(planned.plan))
    apply_loras(pipe, loras, notes=current.is_output_rank)
    pipe.parallel = dit_parallel(current, pipe.plan)
    request = resolve_request(pipe, settings, args)
    request["world_size"] = current.world_size  # with the degrees: in the sidecar and the resume file
    request["parallel"] = (
        format_parallel(pipe.plan.cfg_parallel, pipe.plan.ulysses) if pipe.plan.world_size > 1 else None
    )
    if resume_state is not None:
        resume_state = _check_resume(pipe, resume_state, request, args.resume)
        if pipe.plan.cache is not None and resume_state.step_cache is None and resume_state.step:
            print(
                f"wanfit: warning: the resume file holds no step-cache state; --cache {pipe.plan.cache} "
                "starts afresh at the next step (computed in full), so the frames may differ slightly "
                "from an uninterrupted run.",
                file=sys.stderr,
            )

    steps = request["steps"]
    every = settings.checkpoint_every if current.is_output_rank else 0  # rank 0 keeps the resume file
    last = [resume_state]  # the last finished step, kept for a save on Ctrl-C or a crash
    saved_step = [None if resume_state is None else resume_state.step]

    def on_step(state):
        last[0] = state
        if every and (state.step % every == 0 or state.step == steps):
            checkpointing.save(ckpt, state, request)
            saved_step[0] = state.step

    try:
        frames_out = run_pipeline(
            pipe, request, settings, progress=not args.no_progress, resume=resume_state, on_step=on_step
        )
        if not current.is_output_rank:
            return 0  # rank 0 decodes and writes
        written = what_was_written(frames_out, request, planned)
        metadata = {
            **request,
            **written,  # the real size and frame count, which a downscaled plan changes
            **pipe.run_record(),
            "distributed_backend": current.backend,
            "device": hardware.device_name,
            "emulated": hardware.emulated,
            "lora_mode": pipe.lora_mode,
        }
        try:
            write_video(frames_out, settings.out, metadata=metadata)
        except OSError as err:
            raise OutputError(
                f"Could not write {settings.out}: {err.strerror or err}{_kept(ckpt if every else None, args.resume)}."
            ) from err
    except BaseException as err:
        done = last[0].step if last[0] is not None else 0
        if every and last[0] is not None and saved_step[0] != done:
            try:
                checkpointing.save(ckpt, last[0], request)
            except BaseException:  # e.g. a second Ctrl-C: the previous resume file stays as it was
                pass
        if isinstance(err, KeyboardInterrupt):
            where = f"after step {done} of {steps}" if done < steps else "while decoding or writing"
            kept = _kept(ckpt if every else None, args.resume) or (
                "; no step had finished, so nothing was saved"
                if every
                else "; nothing was saved (--checkpoint-every N keeps a resume file)"
            )
            raise KeyboardInterrupt(f"interrupted {where}{kept}.") from None
        raise
    if every or resuming_own_file:
        ckpt.unlink(missing_ok=True)
    print(f"wrote {settings.out} ({describe_written(written)})")
    if not common.has_model(args):
        print(
            "note: this was the built-in shapes model (`wanfit demo prompts` lists what it can draw). "
            "Point --model at a downloaded Wan2.1 folder for real videos (see README)."
        )
    if pipe.step_cache_report is not None:
        skipped = pipe.step_cache_report["skipped"].items()
        counts = ", ".join(f"{len(done)} of {steps} {name} steps" for name, done in skipped)
        print(f"step cache {pipe.plan.cache}: skipped {counts}")
    print(json.dumps({"timings": pipe.timings}))
    return 0


def what_was_written(frames, request: dict, planned) -> dict:
    """The size and frame count of the frames written, and, when they are not the request's, why."""
    count, height, width = frames.shape[:3]
    written = {"size": f"{width}x{height}", "frames": int(count)}
    if (written["size"], written["frames"]) != (request["size"], request["frames"]):
        written["downscaled"] = {
            "from_size": request["size"],
            "from_frames": request["frames"],
            "reason": _downscale_reason(planned),
        }
    return written


def describe_written(written: dict) -> str:
    """'5 frames, 48x32', with where it was downscaled from and why."""
    count = written["frames"]
    text = f"{count} frame{'' if count == 1 else 's'}, {written['size']}"
    down = written.get("downscaled")
    if down:
        text += f"; downscaled from {down['from_frames']} frames at {down['from_size']}: {down['reason']}"
    return text


def _downscale_reason(planned) -> str:
    """Why the plan's output_size differs from the request: the planner under --allow-downscale, or --set."""
    if planned.requested is None:
        return "asked for with --set output_size"
    return f"the requested size does not fit the memory budget ({planned.budget.source}) and --allow-downscale was given"


def _kept(ckpt: Path | None, resumed_from: Path | None) -> str:
    """How to continue, as the end of an error's sentence ('' when there is no resume file)."""
    for path in (ckpt, resumed_from):
        if path is not None and path.is_file():
            return f"; progress is saved: continue with `wanfit generate --resume {path}`"
    return ""


# --- settings ------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, world_size: int | None):
    """(settings, resume state, the resume file's process count, its saved settings): every check
    before the hardware.

    world_size: the processes of this run (None: not known yet, i.e. this process may start them).
    """
    from wanfit import checkpointing

    resume_state = saved_world = saved = None
    if args.resume is not None:
        resume_state, saved = checkpointing.load(args.resume)
        apply_resume_file(args, saved)
        saved_world = _resume_processes(args, saved, world_size)
    return check_settings(args), resume_state, saved_world, saved


def _check_output(args: argparse.Namespace, settings: Settings) -> tuple[Path, bool]:
    """The output and its resume file can be written; (resume file, whether this run resumes it)."""
    from wanfit import checkpointing
    from wanfit.video import check_writable

    protected = [p for p in (args.model, *common.model_components(args).values()) if p is not None]
    check_writable(settings.out, overwrite=args.overwrite, protected=protected)
    ckpt = checkpointing.checkpoint_path(settings.out)
    resuming_own_file = args.resume is not None and _same_file(args.resume, ckpt)
    if settings.checkpoint_every and ckpt.exists() and not (resuming_own_file or args.overwrite):
        raise ConfigError(
            f"{ckpt} holds an unfinished run; continue it with --resume {ckpt}, or pass --overwrite to start again."
        )
    return ckpt, resuming_own_file


def _resume_processes(args: argparse.Namespace, saved: dict, world_size: int | None) -> int:
    """The saved run's process count; its degrees unless --gpus/--parallel are given; CheckpointError
    when this run has another count (the frames depend on how the work was shared)."""
    from wanfit.errors import CheckpointError

    saved_world = int(saved.get("world_size") or 1)
    if args.gpus is None and args.parallel is None:
        args.parallel = saved.get("parallel")
    if world_size is not None and world_size != saved_world:
        raise CheckpointError(
            f"{args.resume} was written by a run of {saved_world} process(es) and this one has {world_size}; "
            f"resume it with {saved_world} (`wanfit generate --resume {args.resume}` starts them itself)."
        )
    return saved_world


def apply_resume_file(args: argparse.Namespace, saved: dict) -> None:
    """Take the saved run's settings; a flag that would change its frames is an error, not a surprise."""
    differs = resumed_difference(args, saved)
    if differs is not None:
        key, value, given = differs
        raise ConfigError(
            f"--resume continues the saved run, whose {key.replace('_', ' ')} is {value!r}, not "
            f"{given!r}; drop --{key.replace('_', '-')} or start a new run."
        )
    for key in RESUMED:
        value = saved.get(key)
        setattr(args, key, Path(value) if key in PATHS and value is not None else value)
    _resume_cache(args, saved.get("cache"))
    if args.out is None:
        args.out = Path(saved["out"])
    if args.checkpoint_every is None:
        args.checkpoint_every = saved.get("checkpoint_every")


def resumed_difference(args: argparse.Namespace, saved: dict, *, exact: tuple = ()):
    """The first RESUMED setting in which `args` differs from the `saved` run's, as (name, saved value,
    given value); None if none does. A setting `args` leaves unset (None) is not compared, unless it is
    in `exact`, where unset must meet unset (values the run records as given, not resolved)."""
    for key in RESUMED:
        given, value = getattr(args, key), saved.get(key)
        if given is None:
            if key not in exact or value is None:
                continue
        elif _same_setting(key, given, value):
            continue
        return key, value, str(given) if isinstance(given, Path) else given
    return None


def _resume_cache(args: argparse.Namespace, saved: str | None) -> None:
    """The saved run's step cache (files from before --cache hold none), or the same one again."""
    from wanfit.sampling.step_cache import canonical_spec

    given = canonical_spec(args.cache)
    if args.cache is not None and given != saved:
        raise ConfigError(
            f"--resume continues the saved run, whose step cache is {saved or 'off'}, not {given or 'off'}; "
            "drop --cache or start a new run."
        )
    args.cache = saved


def _same_setting(flag: str, given, saved) -> bool:
    if flag in PATHS:
        return saved is not None and Path(given).resolve() == Path(saved).resolve()
    if flag == "size":
        return parse_size(given) == parse_size(saved)
    return given == saved


def check_settings(args: argparse.Namespace) -> Settings:
    """Every user setting checked, one clear sentence for the first that is wrong; nothing loaded yet."""
    from wanfit.commands.lora_options import check_sampler
    from wanfit.pipeline import validate_request
    from wanfit.video import safe_filename

    defaults = MODEL_DEFAULTS if common.has_model(args) else builtin_defaults()
    width, height = parse_size(args.size or defaults["size"])
    frames = args.frames if args.frames is not None else defaults["frames"]
    steps = args.steps if args.steps is not None else defaults["steps"]
    for flag, value in (("--guidance", args.guidance), ("--shift", args.shift)):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}.")
    seed = 0 if args.seed is None else args.seed
    validate_request(height, width, frames, 1 if steps is None else steps, args.guidance or 0.0, seed)
    check_sampler(args.sampler, steps)
    if args.shift is not None and args.shift <= 0:
        raise ConfigError(f"The flow shift must be positive, got {args.shift}.")
    every = args.checkpoint_every or 0
    if every < 0:
        raise ConfigError("--checkpoint-every must be 0 (off) or a positive number of steps.")
    prompt = defaults.get("prompt", DEFAULT_PROMPT) if args.prompt is None else args.prompt
    out = args.out or Path(f"{safe_filename(prompt)}_{seed}.mp4")
    return Settings(
        prompt,
        args.negative_prompt,
        width,
        height,
        frames,
        steps,
        args.guidance,
        args.shift,
        seed,
        every,
        out,
        args.sampler,
        args.preset,
    )


def builtin_defaults() -> dict:
    """The built-in model's video: a few seconds on a CPU (its sampling defaults come with the model)."""
    from wanfit.builtin import DEFAULT_PROMPT as BUILTIN_PROMPT
    from wanfit.builtin import SAMPLING, VIDEO_FRAMES, VIDEO_SIZE

    return {
        "size": "{}x{}".format(*VIDEO_SIZE),
        "frames": VIDEO_FRAMES,
        "steps": SAMPLING.num_inference_steps,
        "prompt": BUILTIN_PROMPT,
    }


def resolve_request(pipe, settings: Settings, args: argparse.Namespace) -> dict:
    """The settings with the model's defaults filled in: stored in the output's metadata and resume file."""
    model = args.model
    scheduler = pipe.make_scheduler(settings.shift, settings.sampler)
    shift = scheduler.config.get("flow_shift", scheduler.config.get("shift"))
    return {
        "prompt": settings.prompt,
        "negative_prompt": pipe.defaults.negative_prompt
        if settings.negative_prompt is None
        else settings.negative_prompt,
        "size": f"{settings.width}x{settings.height}",
        "frames": settings.frames,
        "steps": settings.steps or pipe.defaults.num_inference_steps,
        "guidance": pipe.defaults.guidance_scale if settings.guidance is None else settings.guidance,
        "shift": settings.shift if settings.shift is not None else shift,
        "seed": settings.seed,
        "model": None if model is None else str(Path(model).resolve()),
        **{k: str(Path(v).resolve()) for k, v in common.model_components(args).items() if v is not None},
        "out": str(Path(settings.out).resolve()),
        "checkpoint_every": settings.checkpoint_every,
        "sampler": settings.sampler,
        "scheduler": type(scheduler).__name__,
        "preset": settings.preset,
        "loras": pipe.loras,
        "cache": pipe.plan.cache,  # a step cache changes the frames: it is part of the request
    }


def run_pipeline(pipe, request: dict, settings: Settings, **options):
    """The pipeline on a resolved request (generate's run, calibrate-cache's); options: progress, seed
    (a list, one per prompt, when the request's prompt is a list: a batch's pass), ..."""
    options.setdefault("seed", settings.seed)
    return pipe(
        request["prompt"],
        negative_prompt=request["negative_prompt"],
        height=settings.height,
        width=settings.width,
        num_frames=settings.frames,
        num_inference_steps=request["steps"],
        guidance_scale=request["guidance"],
        shift=request["shift"],
        sampler=request["sampler"],
        **options,
    )


def _check_resume(pipe, state, request: dict, path: Path):
    """The resume file's state on the run's device, after checking it fits this model and size."""
    from wanfit import checkpointing
    from wanfit.errors import CheckpointError
    from wanfit.pipeline import latent_shape

    width, height = parse_size(request["size"])
    in_dim = getattr(getattr(pipe.dit, "config", None), "in_dim", 16)
    expected = latent_shape(1, in_dim, height, width, request["frames"])
    if tuple(state.latents.shape) != expected:
        raise CheckpointError(
            f"{path} holds latents of shape {list(state.latents.shape)}, but this model at "
            f"{request['size']} and {request['frames']} frames needs {list(expected)}."
        )
    return checkpointing.to_device(state, pipe.plan.device)


# --- hardware and model ------------------------------------------------------------------------


def _hardware(args: argparse.Namespace):
    """The probe (honouring --emulate); an emulated card this machine lacks is refused."""
    hw = common.hardware_from_args(args)
    if hw.emulated and not hw.device_present:
        raise ConfigError(
            f"--emulate {args.emulate or hw.emulated} describes a {hw.device_name}, which this machine does not "
            f"have, and generate runs real kernels; see what would run there with `wanfit doctor --emulate "
            f"{hw.emulated}`, or drop --emulate."
        )
    return hw


def _job_request(
    args: argparse.Namespace, settings: Settings, loras=(), prompts: int = 1, lora_unloadable: bool = False
):
    """The job as the planner sees it; a CLI job never unloads its LoRAs (lora_unloadable: one that
    switches plans, as a batch of several sizes may, re-applies them from the base weights)."""
    from wanfit.plan.planning import model_request

    return model_request(
        args.model,
        width=settings.width,
        height=settings.height,
        frames=settings.frames,
        guidance=settings.guidance != 1.0,
        steps=settings.steps,
        loras=loras,
        lora_unloadable=lora_unloadable,
        prompts=prompts,
        **common.model_components(args),
    )


def plan_job(
    args: argparse.Namespace,
    settings: Settings,
    hw,
    current=None,
    loras=(),
    prompts: int = 1,
    share: bool = True,
    lora_unloadable: bool = False,
):
    """The planner's fastest plan that fits this machine (or --vram) for this job (with `loras`, as
    read_loras gives them; prompts: how many a batch job has of this size; lora_unloadable: whether
    the run re-applies them, so their base weights are kept); PlanError if none.

    In a run on several processes (current): the plan is for one GPU, and every process runs rank 0's
    (its collectives must match), on its own GPU; share False: this process's own, which the caller
    shares (Session.common_plan) once every process has one.
    """
    from wanfit.plan.planning import plan_for

    request = _job_request(args, settings, loras, prompts, lora_unloadable)
    world_size = current.world_size if current is not None else None
    constraints = parallel_constraints(
        args, request, common.constraints_from_args(args), world_size=world_size
    )
    result = plan_for(request, constraints, hw)
    if current is not None and share:
        result = current.common_plan(result)
    for note in result.notes if current is None or current.is_output_rank else ():
        kind = "warning" if result.requested is not None and note == result.notes[0] else "note"
        print(f"wanfit: {kind}: {note}", file=sys.stderr)
    return result


def _launch(args: argparse.Namespace) -> int | None:
    """Start the processes of a run on several GPUs here (None: the run needs one process)."""
    from wanfit.errors import CheckpointError
    from wanfit.plan.parallel import format_parallel, parallel_degrees

    settings, _, saved_world, _ = _settings(args, None)
    _check_output(args, settings)
    cfg, ulysses = parallel_degrees(_job_request(args, settings), gpus=args.gpus, spec=args.parallel)
    world = cfg * ulysses
    if saved_world is not None and saved_world != world:
        raise CheckpointError(
            f"{args.resume} was written by a run of {saved_world} process(es) and --gpus/--parallel ask "
            f"for {world}; resume it with {saved_world}."
        )
    degrees = format_parallel(cfg, ulysses)
    return start_processes(args, world, degrees, ["--parallel", degrees])


def start_processes(args: argparse.Namespace, world: int, what: str, extra: list[str]) -> int | None:
    """Run this command (its argv and `extra`) on `world` processes started here, after the checks
    that need no model: the run's exit code, or None when one process does it (world 1). what: the
    run, for the sentence when the GPUs are too few ('cfg2,ulysses1', 'this batch')."""
    import torch

    from wanfit.runtime.parallel.launch import launch

    cache = common.constraints_from_args(args).overrides.get("cache")
    if cache is not None and world > 1:
        from wanfit.sampling.step_cache import refuse_parallel

        refuse_parallel(cache, world)
    if world == 1:
        return None
    on_cpu = _session_device(args) == "cpu"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not on_cpu and count < world:
        raise ConfigError(
            f"{what} needs {world} GPUs and this machine has {count}"
            + ("" if count else " (--device cpu runs the processes on the CPU, to try it out)")
            + "."
        )
    argv = getattr(args, "argv", None) or sys.argv[1:]
    return launch([*argv, *extra], world, on_cpu=on_cpu)


def _session_device(args: argparse.Namespace) -> str | None:
    """'cpu' when --device asks for it (gloo processes on the CPU), else None (CUDA when present)."""
    return "cpu" if (args.device or "").split(":")[0] == "cpu" else None


def check_cache(planned, args: argparse.Namespace, settings: Settings, loras: list[dict]) -> None:
    """The plan's step cache checked against this model, its LoRAs (records), the step count and
    the processes, before any weights load."""
    from wanfit.pipeline import SamplingDefaults
    from wanfit.sampling.step_cache import build
    from wanfit.sampling.step_cache.tables import calibration_key, dit_model_key
    from wanfit.weights.model_dir import find_model_files

    files = find_model_files(common.model_folder(args), **common.model_components(args))
    key = calibration_key(dit_model_key(files.dit), loras)
    steps = settings.steps or SamplingDefaults.num_inference_steps  # (the built-in model's are set by now)
    plan = planned.plan
    build(plan.cache, planned.request.config, steps, model_key=key, world_size=plan.world_size)


def announce(result, settings: Settings) -> None:
    """One line before the work: the plan's gist and a time estimate; on a CPU, a hint when it is long."""
    from dataclasses import replace

    from wanfit.pipeline import SamplingDefaults
    from wanfit.plan.timing import estimate_time, format_duration

    steps = settings.steps or SamplingDefaults.num_inference_steps  # (the built-in model's are set by now)
    plan, req = result.plan, result.request
    given_up = f"; gave up: {', '.join(result.steps)}" if result.steps else ""
    estimate = estimate_time(result, steps)
    where = plan.device
    if plan.world_size > 1:
        from wanfit.plan.parallel import format_parallel

        where = f"{plan.world_size} processes ({format_parallel(plan.cfg_parallel, plan.ulysses)}), each on {plan.device}"
    print(
        f"wanfit: {req.describe()}, {steps} steps on {where} ({plan.compute_dtype}, attention "
        f"{plan.self_attention or 'auto'}){given_up}; {estimate.describe()}"
        + (" for one process doing it all" if plan.world_size > 1 else ""),
        file=sys.stderr,
    )
    if result.device.kind == "cpu" and estimate.seconds > 600:
        short = replace(result, request=req.resized(320, 192, 17))
        print(
            f"wanfit: note: this is a long job for a CPU; --size 320x192 --frames 17 --steps 10 would take "
            f"about {format_duration(estimate_time(short, 10).seconds)}.",
            file=sys.stderr,
        )


def _load_pipeline(args, planned, *, with_text_encoder: bool = True):
    """The pipeline for the plan; with_text_encoder False: without umT5 (another process encodes)."""
    from wanfit.hardware.probe import apply_emulation_limits
    from wanfit.pipeline import WanPipeline
    from wanfit.plan.planning import BUILTIN

    apply_emulation_limits(planned.hardware)  # caps memory only under --emulate on a GPU
    return WanPipeline.from_pretrained(
        args.model if common.has_model(args) else BUILTIN,
        plan=planned,
        progress=not args.no_progress,
        with_text_encoder=with_text_encoder,
        **common.model_components(args),
    )


def _dit_config(args: argparse.Namespace):
    """The DiT's config (the folder's config.json or headers; the built-in model's folder without
    --model): no weights read."""
    from wanfit.weights.dit_loader import folder_dit_config
    from wanfit.weights.model_dir import find_model_files

    if not any(common.model_components(args).values()):
        return folder_dit_config(Path(common.model_folder(args)))[0]
    return folder_dit_config(files=find_model_files(args.model, **common.model_components(args)))[0]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
