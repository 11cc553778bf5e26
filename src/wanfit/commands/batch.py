"""`wanfit generate --prompts FILE [--videos-per-prompt N]`: many videos, one model load.

Every line is read and checked before any model loads; a bad line gets its own error and the others
still run. Each distinct size is planned once and the pipeline switches plans between prompts (the
placements move only what differs); each prompt is encoded once for all its videos. Videos that
share every setting but the prompt and seed are denoised together, the plan's prompts_per_pass at a
time (the planner decides how many fit); each video is written as soon as its pass is done, and a
pass that fails runs its videos again one by one, so each error stays its own video's. A summary
lists each output or its error, and the exit code is 2 if any failed.

With --resume-batch a video whose output is already finished (its sidecar written, see
video.finished_output_metadata) with the settings this run asks of it is skipped as done; one made
with other settings is that video's error unless --overwrite, which makes it again.

On several processes (--gpus, --parallel, torchrun) every video runs on all of them, with the
degrees the planner gives its size (one prompt per pass: Plan.batching_blocker); rank 0 writes the
videos, their sidecars and the summary. The processes take one path through the batch: rank 0's
view of the jobs (what is done, what failed before any model), and after each step that may fail on
some of them (planning a size, writing a video) the outcome they agree on (Session.agree). A failure
inside a video's shared work (encoding, denoising) ends the run on every process, as one video's
would: the others may be waiting in a collective for the one that failed. Rank 0 then prints the
summary so far, and --resume-batch makes the rest.
"""

from __future__ import annotations

import argparse
import copy
import json
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path

from wanfit.commands import common
from wanfit.errors import ConfigError, OutputError, WanfitError

# JSON line key -> (the generate option it sets, what it must be)
_TYPES = {
    "negative_prompt": ("negative_prompt", str),
    "seed": ("seed", int),
    "size": ("size", str),
    "frames": ("frames", int),
    "steps": ("steps", int),
    "guidance": ("guidance", float),
    "shift": ("shift", float),
    "out": ("out", str),
}


@dataclass
class Job:
    line: int
    video: int
    settings: object = None  # generate.Settings once checked
    plan: object = None  # its PlanResult
    error: str | None = None
    done: bool = False  # --resume-batch: finished by an earlier run with these settings
    written: str | None = None  # the output, once written
    described: str = ""  # its frames and size

    @property
    def label(self) -> str:
        return f"line {self.line}" + (f" video {self.video + 1}" if self.video else "")


def check_batch_options(args: argparse.Namespace) -> None:
    if args.prompt is not None:
        raise ConfigError("--prompt and --prompts were both given; put every prompt in the file.")
    if args.resume is not None or args.checkpoint_every:
        raise ConfigError(
            "--resume and --checkpoint-every keep one video's progress; with --prompts, --resume-batch "
            "skips the videos an earlier run finished."
        )
    if args.videos_per_prompt < 1:
        raise ConfigError(f"--videos-per-prompt must be at least 1, got {args.videos_per_prompt}.")
    if args.out is not None and args.out.suffix:
        raise ConfigError(
            f"With --prompts, --out names the folder the videos go to, not a file ({args.out}); a line "
            'may name its own file with "out".'
        )


def _line_args(args: argparse.Namespace, item, video: int, out_dir: Path) -> argparse.Namespace:
    """The generate options for one video of a line: the command line's, with the line's settings."""
    from wanfit.video import safe_filename

    line = copy.copy(args)
    line.prompt = item.prompt
    for key, value in item.settings.items():
        option, kind = _TYPES[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f'"{key}" must be a whole number, got {value!r}.')
        if kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise ConfigError(f'"{key}" must be a number, got {value!r}.')
        if kind is str and not isinstance(value, str):
            raise ConfigError(f'"{key}" must be a string, got {value!r}.')
        setattr(line, option, float(value) if kind is float else value)
    seed = (line.seed if line.seed is not None else 0) + video
    line.seed = seed
    name = item.settings.get("out")
    if name is None:
        name = f"{item.line:03d}_{safe_filename(item.prompt)}_{seed}.mp4"
    elif video:
        stem = Path(name)
        name = str(stem.with_name(f"{stem.stem}_{video + 1}{stem.suffix}"))
    line.out = out_dir / name
    return line


def _protected(args: argparse.Namespace) -> list[Path]:
    """The model's files and folders: never an output to replace."""
    return [p for p in (args.model, *common.model_components(args).values()) if p is not None]


def plan_jobs(args: argparse.Namespace, items) -> list[Job]:
    """One Job per video of each line, checked (settings, output) before any model loads."""
    from wanfit.commands.generate import check_settings
    from wanfit.prompts_file import LineError
    from wanfit.video import check_writable

    out_dir = args.out if args.out is not None else Path(".")
    protected = _protected(args)
    jobs, outputs = [], set()
    for item in items:
        if isinstance(item, LineError):
            jobs.append(Job(item.line, 0, error=item.message))
            continue
        for video in range(args.videos_per_prompt):
            job = Job(item.line, video)
            try:
                line_args = _line_args(args, item, video, out_dir)
            except WanfitError as err:  # the line's settings: one error for all its videos
                jobs.append(Job(item.line, 0, error=str(err)))
                break
            try:
                settings = check_settings(line_args)
            except WanfitError as err:  # the line's own settings: one error for all its videos
                jobs.append(Job(item.line, 0, error=str(err)))
                break
            try:
                key = Path(settings.out).resolve()
                if key in outputs:
                    raise ConfigError(
                        f'{settings.out} is also another line\'s output; give each line its own "out".'
                    )
                outputs.add(key)
                job.done = args.resume_batch and _finished_before(line_args, settings, args.overwrite)
                if not job.done:
                    check_writable(settings.out, overwrite=args.overwrite, protected=protected)
                job.settings = settings
            except WanfitError as err:
                job.error = str(err)
            jobs.append(job)
    return jobs


def _finished_before(line_args: argparse.Namespace, settings, overwrite: bool) -> bool:
    """Whether an earlier run finished this video with the settings asked of it now (the ones a
    single video's --resume compares); a finished one made otherwise is an error unless `overwrite`."""
    from wanfit.commands.generate import PATHS, resumed_difference
    from wanfit.video import finished_output_metadata

    saved = finished_output_metadata(settings.out)
    if saved is None:
        return False  # not there, or cut short: made (again)
    asked = copy.copy(line_args)
    asked.prompt, asked.seed, asked.frames = settings.prompt, settings.seed, settings.frames
    asked.size, asked.steps = f"{settings.width}x{settings.height}", settings.steps
    # The paths and the sampler are recorded as given, so leaving them unset must meet unset.
    differs = resumed_difference(asked, saved, exact=(*PATHS, "sampler"))
    if differs is None:
        return True
    if overwrite:
        return False
    name, value, given = differs
    raise ConfigError(
        f"{settings.out} was made with {name.replace('_', ' ')} {value!r}, not {given!r} as asked now; "
        "pass --overwrite to make it again."
    )


def _check_done_loras(jobs: list[Job], loras: list[dict], args: argparse.Namespace) -> None:
    """A video done before with other LoRAs (by content hash) or strengths is not done: its error, or
    (--overwrite) made again."""
    from wanfit.checkpointing import lora_difference
    from wanfit.video import check_writable, finished_output_metadata

    for job in (job for job in jobs if job.done):
        out = job.settings.out
        differs = lora_difference(finished_output_metadata(out) or {}, loras)
        if differs is None:
            continue
        job.done = False
        if args.overwrite:
            try:
                check_writable(out, overwrite=True, protected=_protected(args))
            except WanfitError as err:
                job.error = str(err)
        else:
            job.error = (
                f"{out} was made with {differs[0]}, not {differs[1]}; pass --overwrite to make it again."
            )


def run_batch(args: argparse.Namespace) -> int:
    """The batch on this process, or (--gpus, --parallel) on the processes started here; under
    torchrun, this process's part."""
    from wanfit.commands import generate as g
    from wanfit.runtime.parallel import session, world_size_from_env

    check_batch_options(args)
    if world_size_from_env() == 1 and (args.gpus is not None or args.parallel is not None):
        code = _launch(args)
        if code is not None:
            return code
    with session(g._session_device(args)) as current:
        return _run_batch(args, current)


def _launch(args: argparse.Namespace) -> int | None:
    """Start the batch's processes here: as many as every runnable video can share (None: one)."""
    from wanfit.commands import generate as g
    from wanfit.commands.lora_options import apply_preset
    from wanfit.plan.parallel import batch_world_size
    from wanfit.prompts_file import read_prompts_file

    asked = copy.copy(args)  # the workers read the command line again
    apply_preset(asked)
    jobs = plan_jobs(asked, read_prompts_file(args.prompts))
    requests = {
        _plan_key(job.settings): g._job_request(asked, job.settings)
        for job in jobs
        if job.error is None and not job.done
    }
    if not requests:
        return None  # nothing to make: one process says so
    world = batch_world_size(list(requests.values()), gpus=args.gpus, spec=args.parallel)
    return g.start_processes(args, world, "this batch", [])


def _run_batch(args: argparse.Namespace, current) -> int:
    from wanfit.commands import generate as g
    from wanfit.commands.lora_options import apply_loras, apply_preset, lora_requests, read_loras
    from wanfit.prompts_file import read_prompts_file

    preset = apply_preset(args)
    jobs = plan_jobs(args, read_prompts_file(args.prompts))
    if any(job.error is None for job in jobs):  # runnable or done: both need the LoRAs known
        loras = read_loras(lora_requests(args, preset), g._dit_config(args), args.lora_skip_unknown)
        _check_done_loras(jobs, [lora.record(st) for lora, st in loras], args)
    _take_output_ranks_view(jobs, current)
    runnable = [job for job in jobs if job.error is None and not job.done]
    if runnable:
        hardware = g._hardware(args)
        # How many videos of each planned size could share a pass: the planner's prompts count.
        shared: dict = {}
        for job in runnable:
            shared.setdefault(_plan_key(job.settings), {}).setdefault(_pass_key(job.settings), []).append(job)
        plans: dict = {}
        for job in runnable:  # each distinct size planned once, before anything loads
            s = job.settings
            key = _plan_key(s)
            if key not in plans:
                prompts = max(len(group) for group in shared[key].values())
                # Several sizes may apply the LoRAs in several modes: each re-applied from the base.
                unloadable = len(shared) > 1
                plans[key] = _plan_size(
                    args, s, hardware, current, loras, prompts, f"plan/{len(plans)}", unloadable
                )
            if isinstance(plans[key], str):  # this size fits nowhere: its lines fail, the rest run
                job.error = plans[key]
            else:
                job.plan = plans[key]
        runnable = [job for job in runnable if job.error is None]
    if runnable:
        first = runnable[0].plan
        pipe = g._load_pipeline(args, first, with_text_encoder=current.runs_text_encoder(first.plan))
        apply_loras(pipe, loras, notes=current.is_output_rank)
        run = _Run(args, current)
        try:
            with pipe.batch():
                for group in passes(runnable):
                    _run_pass(pipe, group, run)
        except KeyboardInterrupt:
            if current.is_output_rank:
                _summary(jobs, sys.stderr)
            raise KeyboardInterrupt(
                "interrupted; the videos listed as written are complete (--resume-batch makes the rest)."
            ) from None
        except BaseException:
            if current.is_parallel and current.is_output_rank:  # the run ends: what it made so far
                _summary(jobs, sys.stderr)
                print(
                    "wanfit: note: the batch stopped (a failure in a video's shared work ends every "
                    "process); the videos listed as written are complete (--resume-batch makes the rest).",
                    file=sys.stderr,
                    flush=True,
                )
            raise
    if not current.is_output_rank:
        return 0  # rank 0 speaks for the run (a worker's failure would also end the others early)
    _summary(jobs, sys.stdout)
    return 2 if any(job.error for job in jobs) else 0


@dataclass
class _Run:
    """What the videos of one batch run share: the options and this process's session."""

    args: argparse.Namespace
    current: object
    parallels: dict = field(default_factory=dict)  # (cfg, ulysses) -> its DiTParallel


def _take_output_ranks_view(jobs: list[Job], current) -> None:
    """Rank 0's view of which jobs are done or failed before any model (what it read of the outputs
    and the LoRAs), so that every process makes the same videos."""
    if not current.is_parallel:
        return
    view = json.loads(current.share("batch/jobs", lambda: json.dumps([[j.error, j.done] for j in jobs])))
    for job, (error, done) in zip(jobs, view, strict=True):
        job.error, job.done = error, done


def _plan_size(args, settings, hardware, current, loras, prompts: int, key: str, lora_unloadable: bool):
    """The plan (a PlanResult) for one size, rank 0's on every process, or the error every process
    agrees on (a string)."""
    from wanfit.commands import generate as g

    error = None
    try:
        planned = g.plan_job(
            args,
            settings,
            hardware,
            current,
            loras=loras,
            prompts=prompts,
            share=False,
            lora_unloadable=lora_unloadable,
        )
        if planned.plan.cache is not None:
            g.check_cache(planned, args, settings, [lora.record(st) for lora, st in loras])
    except WanfitError as err:
        error = str(err)
    error = current.agree(key, error)
    return error if error is not None else current.common_plan(planned, key)


def _use_plan(pipe, planned, run: _Run) -> None:
    """Switch the pipeline to a video's plan (another size: the placements move what differs) and, on
    several processes, to the process groups of its degrees (made once each, on every process)."""
    from wanfit.runtime.parallel import dit_parallel

    if pipe.planning is not planned:
        pipe.apply_plan(planned)
    if not run.current.is_parallel:
        return
    plan = planned.plan
    degrees = (plan.cfg_parallel, plan.ulysses)
    if degrees not in run.parallels:
        run.parallels[degrees] = dit_parallel(run.current, plan)
    if pipe.parallel is not run.parallels[degrees]:
        if pipe.parallel is not None:
            pipe.parallel.detach(pipe.dit)  # the other degrees' Ulysses exchange off the attention
        pipe.parallel = run.parallels[degrees]


def _plan_key(s) -> tuple:
    """What a plan is made for: videos with the same key share one plan."""
    return (s.width, s.height, s.frames, s.guidance != 1.0)


def _pass_key(s) -> tuple:
    """What videos denoised in one pass must share: everything but the prompt and the seed."""
    return (*_plan_key(s), s.guidance, s.steps, s.shift, s.sampler, s.negative_prompt)


def passes(jobs: list[Job]) -> list[list[Job]]:
    """The jobs in passes: those of one pass key together, in file order, the plan's prompts_per_pass
    (Plan.samples_per_pass) at a time; the passes in the order of their first job."""
    groups: dict = {}
    for job in jobs:
        groups.setdefault(_pass_key(job.settings), []).append(job)
    out = []
    for group in groups.values():
        size = group[0].plan.plan.samples_per_pass
        out += [group[i : i + size] for i in range(0, len(group), size)]
    return sorted(out, key=lambda group: jobs.index(group[0]))


def _run_pass(pipe, group: list[Job], run: _Run) -> None:
    """Make and write the videos of one pass; if the pass fails, each video again on its own, so an
    error stays its own video's. (Several processes: one video a pass, Plan.batching_blocker.)"""
    from wanfit.commands import generate as g

    if len(group) == 1:
        _run_one(pipe, group[0], run)
        return
    args = run.args
    first = group[0]
    try:
        _use_plan(pipe, first.plan, run)
        requests = [g.resolve_request(pipe, job.settings, args) for job in group]
        together = {**requests[0], "prompt": [r["prompt"] for r in requests]}
        seeds = [job.settings.seed for job in group]
        videos = g.run_pipeline(pipe, together, first.settings, seed=seeds, progress=not args.no_progress)
    except WanfitError as err:
        print(
            f"wanfit: note: a pass of {len(group)} videos failed ({err}); running them one by one.",
            file=sys.stderr,
        )
        for job in group:
            _run_one(pipe, job, run)
        return
    for job, request, frames in zip(group, requests, videos):
        try:
            _write(pipe, job, request, frames, args)
        except WanfitError as err:
            _failed(job, str(err))


def _run_one(pipe, job: Job, run: _Run) -> None:
    """Make and write one video; an error stays this job's. On several processes a failure in the
    shared work ends the run (see the module docstring); rank 0 writes, and all agree on the outcome."""
    from wanfit.commands import generate as g
    from wanfit.plan.parallel import format_parallel

    s, args, current = job.settings, run.args, run.current
    try:
        _use_plan(pipe, job.plan, run)
        request = g.resolve_request(pipe, s, args)
        if current.is_parallel:  # with the degrees: in the sidecar
            request["world_size"] = current.world_size
            request["parallel"] = format_parallel(pipe.plan.cfg_parallel, pipe.plan.ulysses)
        frames = g.run_pipeline(pipe, request, s, progress=not args.no_progress)
    except WanfitError as err:
        if current.is_parallel:
            job.error = str(err)
            raise
        _failed(job, str(err))
        return
    error = None
    if current.is_output_rank:
        try:
            _write(pipe, job, request, frames, args, current)
        except WanfitError as err:
            error = str(err)
    error = current.agree(f"video/{job.line}/{job.video}", error)
    if error is not None:
        _failed(job, error, speak=current.is_output_rank)


def _failed(job: Job, error: str, speak: bool = True) -> None:
    job.error = error
    if speak:
        print(f"wanfit: error: {job.label}: {job.error}", file=sys.stderr, flush=True)


def _write(pipe, job: Job, request: dict, frames, args: argparse.Namespace, current=None) -> None:
    """Write one video with its metadata (the run record of the pass that made it)."""
    from wanfit.commands import generate as g
    from wanfit.video import write_video

    s = job.settings
    written = g.what_was_written(frames, request, job.plan)
    metadata = {
        **request,
        **written,
        **pipe.run_record(),
        "batch": {"prompts": str(args.prompts), "line": job.line, "video": job.video + 1},
        "lora_mode": pipe.lora_mode,
    }
    if current is not None and current.is_parallel:
        metadata["distributed_backend"] = current.backend
    try:
        write_video(frames, s.out, metadata=metadata)
    except OSError as err:
        raise OutputError(f"Could not write {s.out}: {err.strerror or err}.") from err
    job.written, job.described = str(s.out), g.describe_written(written)
    print(f"wrote {s.out} ({job.described})", flush=True)


def _summary(jobs: list[Job], stream) -> None:
    written = sum(1 for job in jobs if job.written)
    done = sum(1 for job in jobs if job.done)
    skipped = f", {done} skipped as done before" if done else ""
    print(f"batch: {written} of {len(jobs)} videos written{skipped}", file=stream)
    for job in jobs:
        what = (
            f"wrote {job.written} ({job.described})"
            if job.written
            else f"done before: {job.settings.out} (skipped)"
            if job.done
            else f"error: {job.error}"
            if job.error
            else "not run"
        )
        print(f"  {job.label}: {what}", file=stream)
    results = [
        {
            "line": job.line,
            "video": job.video + 1,
            "out": job.written or (str(job.settings.out) if job.done else None),
            "error": job.error,
            "skipped": job.done,
        }
        for job in jobs
    ]
    print(json.dumps({"batch": results}), file=stream)
