"""The whole job as a user runs it, each in a fresh Python process: what a first run pays once.

    # GPU machine: flash-attn-4 installed by the two calls in benchmarks/fa4_carry.sh's header, then
    # a third call while it stays warm (H200: about 5 minutes of --budget-s's 530 s):
    PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site:src \
        python3 benchmarks/bench_fresh.py --out $OUT/fresh.json
    python3 benchmarks/bench_fresh.py --dry-run                                       # CPU, tiny: logic only

Three children, one after the other, each a new interpreter (`--child NAME`, started by this script):

  wanfit_cold   wanfit's pipeline as `wanfit generate` plans it, with empty caches: a fresh
                WANFIT_CACHE_DIR (flash-attn-4's compiled kernels go under it, in flash_attn4/),
                TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR and CUTE_DSL_CACHE_DIR (the CuTe
                DSL's own), as on a new machine
  wanfit_warm   the same job again, with the caches wanfit_cold left: every later run
  diffusers     diffusers' WanPipeline as shipped (eager, SDPA)

A name with a repeat suffix (`wanfit_warm_r2`, `diffusers_r2`) runs that child again in another fresh
process, for the run-to-run spread; ratios are taken against the median of the diffusers runs, and
`median_ratios` give each kind's median job over diffusers' median.

Every child reads bytecode compiled once before them (a PYTHONPYCACHEPREFIX folder of the run), as
on a machine where pip installed the packages; --no-bytecode-cache leaves the environment as it is
(the GPU machine sets PYTHONDONTWRITEBYTECODE, so each process compiles its imports from source).

Each builds Wan2.1 T2V-1.3B's real configs (DiT, VAE, umT5-XXL) with random weights as
bench_pipeline.build_models does (diffusers' models, wanfit's views of the same tensors) and runs
832x480x81, UniPC, guidance 5, `--steps` steps (50) from the same latents. Reported per child: the
job (wanfit: planning, where the per-process smoke tests compile their kernels, to frames returned;
diffusers: the pipeline call to frames returned; synchronised), spawn to job end (interpreter,
imports, model build and job), the model build, wanfit's phases (pipe.timings and its planning),
the median step and the first step's extra over it, peak GiB, the cache files left, and the mean
|frame difference| of the videos against wanfit_cold's. The JSON is rewritten after every child;
a child predicted (from the previous one's time) to end past `--budget-s` is skipped and said.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import wanfit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

CHILDREN = ("wanfit_cold", "wanfit_warm", "diffusers")
REPEAT = re.compile(r"^(.+)_r\d+$")


def kind_of(name: str) -> str:
    """The child kind a name runs: itself, or the kind before a repeat suffix (diffusers_r2 -> diffusers)."""
    match = REPEAT.match(name)
    return match.group(1) if match else name


# The caches a first run fills; each child gets these folders (the FA4 one lives under wanfit's).
CACHE_ENVS = {
    "wanfit": "WANFIT_CACHE_DIR",
    "triton": "TRITON_CACHE_DIR",
    "inductor": "TORCHINDUCTOR_CACHE_DIR",
    "cute_dsl": "CUTE_DSL_CACHE_DIR",  # the DSL's own file cache (nvidia-cutlass-dsl 4.3.2+)
}
# Set by a user, these would move flash-attn-4's cache out of the fresh wanfit dir (see attention.backends).
FA4_ENVS = ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")
FIRST_GUESS_S = 150.0  # the cold child on the H200, until one was measured: build ~30 s, job ~60 s, compiles
# The next child from the previous one: diffusers' 50-step job took 1.27x wanfit's (docs/benchmarks.md).
NEXT_MARGIN = 1.3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--layers", type=int, default=None, help="DiT blocks (default: all 30)")
    p.add_argument("--text-layers", type=int, default=None, help="umT5 blocks (default: all 24)")
    p.add_argument(
        "--budget-s", type=float, default=530.0, help="start no child predicted to end past this (s)"
    )
    p.add_argument(
        "--profile-plan", action="store_true",
        help="wanfit's children: cProfile's top functions of the planning phase, in the JSON",
    )  # fmt: skip
    p.add_argument(
        "--no-bytecode-cache", action="store_true",
        help="children compile every module from source, as a machine with PYTHONDONTWRITEBYTECODE set does",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 2 steps: checks the script only")
    p.add_argument("--out", default=None, help="write the results as JSON here (after every child)")
    p.add_argument("--children", default=",".join(CHILDREN), help="which children run, in this order")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-dir", default=None, help=argparse.SUPPRESS)  # the child's JSON and frames
    p.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)  # time.time()
    return p.parse_args(argv)


# --- a child: one job in this fresh process -----------------------------------------------------------


def child(args) -> None:
    """Build the models, run the one job, write result.json (or the error) and frames.npy."""
    out_dir = Path(args.child_dir)
    try:
        result, frames = child_job(args)
    except Exception as err:
        failure = {"error": f"{type(err).__name__}: {err}"[:2000] + "\n" + traceback.format_exc(limit=6)}
        (out_dir / "result.json").write_text(json.dumps(failure, indent=2))
        raise SystemExit(1) from err
    np.save(out_dir / "frames.npy", np.asarray(frames))
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))


def child_job(args) -> tuple[dict, np.ndarray]:
    import torch
    from bench_dit import cuda_or_exit
    from bench_speed import Models, sync

    class Kept(Models):
        """bench_speed's models, keeping the last wanfit pipeline for its run record."""

        plan_profile = None

        def pipeline(self, plan):
            self.last_pipe = super().pipeline(plan)
            return self.last_pipe

        def plan(self, variant, steps):
            if not args.profile_plan:
                return super().plan(variant, steps)
            import cProfile

            from profile_planning import top_functions

            profile = cProfile.Profile()
            profile.enable()
            try:
                return super().plan(variant, steps)
            finally:
                profile.disable()
                self.plan_profile = top_functions(profile, 40)

    if args.dry_run:
        device = torch.device("cpu")
        args.size, args.frames = "64x48", 5
    else:
        device = cuda_or_exit()
    before_build = time.time()
    start = time.perf_counter()
    models = Kept(args, device)
    sync(device)
    build_s = time.perf_counter() - start
    if kind_of(args.child) == "diffusers":
        result, frames = models.diffusers_job(args.steps)
    else:  # as `wanfit generate` plans it: the planner picks attention, fused kernels and compile
        result, frames = models.wanfit_job("wanfit_planned", args.steps)
        record = models.last_pipe.run_record()
        result.update(plan=record["plan"], attention=record["attention"])
        if models.plan_profile is not None:
            result["plan_profile"] = models.plan_profile
    ended = time.time()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "job_s": result.pop("total_s"),
        "spawn_to_job_end_s": ended - args.spawned_at,
        "spawn_to_build_s": before_build - args.spawned_at,  # the interpreter, torch and the imports
        "build_s": build_s,
        # After the job: wanfit sets flash-attn-4's variables when it imports it (a CUDA card only).
        "cache_env": {var: os.environ.get(var) for var in (*CACHE_ENVS.values(), *FA4_ENVS)},
        **result,
    }, frames


# --- the parent: fresh caches, the children in turn ---------------------------------------------------


# What the children import, compiled to bytecode first (see warm_bytecode).
BYTECODE_IMPORTS = (
    "import torch, transformers, diffusers, wanfit.pipeline, wanfit.plan.planning\n"
    "from transformers import UMT5EncoderModel\n"
    "from diffusers import WanPipeline, WanTransformer3DModel, AutoencoderKLWan\n"
    "try:\n    import flash_attn.cute\nexcept Exception:\n    pass\n"
)


def child_env(caches: Path, bytecode: Path | None) -> dict:
    """This environment with the benchmark's cache folders (empty until the cold child fills them) and,
    with `bytecode`, a bytecode cache every child reads."""
    env = dict(os.environ)
    for name, var in CACHE_ENVS.items():
        env[var] = str(caches / name)
    for var in FA4_ENVS:
        env.pop(var, None)
    if bytecode is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(bytecode)
    return env


def warm_bytecode(env: dict) -> float:
    """Import what the children import once, so that they read compiled bytecode as on a machine where pip
    installed the packages (it writes .pyc files; a GPU machine with PYTHONDONTWRITEBYTECODE and
    `pip --no-compile` has none, and every process compiles its imports from source: seconds)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", BYTECODE_IMPORTS], env=env, check=False)
    return time.perf_counter() - start


def predicted_s(previous_s: float | None) -> float:
    """A child's time, from the one before it (a guess for the first)."""
    return FIRST_GUESS_S if previous_s is None else previous_s * NEXT_MARGIN


def cache_files(caches: Path) -> dict[str, int]:
    """Files in each cache folder (flash-attn-4's, inside wanfit's, also alone): what a run left for the next."""
    folders = {name: caches / name for name in CACHE_ENVS}
    folders["flash_attn4"] = caches / "wanfit" / "flash_attn4"
    return {
        name: sum(1 for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0 for name, d in folders.items()
    }


def child_command(args, name: str, out_dir: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-dir", str(out_dir)]
    command += ["--size", args.size, "--frames", str(args.frames), "--steps", str(args.steps)]
    command += ["--guidance", str(args.guidance)]
    for flag, value in (("--layers", args.layers), ("--text-layers", args.text_layers)):
        if value is not None:
            command += [flag, str(value)]
    return (
        command + (["--dry-run"] if args.dry_run else []) + (["--profile-plan"] if args.profile_plan else [])
    )


def run(args) -> dict:
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-fresh-"))
    caches = work / "caches"
    bytecode = None if args.no_bytecode_cache else work / "bytecode"
    env = child_env(caches, bytecode)
    result: dict = {
        "benchmark": "bench_fresh",
        "video": f"{args.size}x{args.frames}" if not args.dry_run else "64x48x5 (dry run)",
        "steps": args.steps,
        "guidance": args.guidance,
        "budget_s": args.budget_s,
        "caches": str(caches),
        "bytecode_cache": bytecode is not None,
        "children": {},
        "skipped": [],
        "errors": {},
    }

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    if bytecode is not None:
        result["bytecode_warm_s"] = warm_bytecode(env)
        log(f"bytecode compiled in {result['bytecode_warm_s']:.1f} s")
    previous = None
    for name in [c for c in args.children.split(",") if c]:
        left = args.budget_s - (time.perf_counter() - started)
        guess = predicted_s(previous)
        if guess > left:
            result["skipped"].append({"what": name, "why": f"predicted {guess:.0f} s, {left:.0f} s left"})
            log(f"skipped {name} (predicted {guess:.0f} s, {left:.0f} s left)")
            continue
        log(f"{name} in a fresh process ...")
        out_dir = work / name
        out_dir.mkdir()
        t0 = time.perf_counter()
        command = child_command(args, name, out_dir) + ["--spawned-at", repr(time.time())]
        try:
            # Killed where it would run past the budget, so this JSON is still written after it.
            done = subprocess.run(command, env=env, timeout=max(left, 1.0), check=False)
            rc = done.returncode
        except subprocess.TimeoutExpired:
            rc = None
        previous = time.perf_counter() - t0
        got = read_child(out_dir)
        if rc == 0 and "error" not in got:
            result["children"][name] = {
                **got,
                "child_wall_s": previous,
                "cache_files_after": cache_files(caches),
            }
        else:
            why = "killed at the budget" if rc is None else f"exit status {rc}"
            result["errors"][name] = got.get("error") or why
            log(f"{name} FAILED: {result['errors'][name].splitlines()[0][:300]}")
        save(result, args.out, time.perf_counter() - started)
    result["frames_vs_wanfit_cold_mean_abs_uint8"] = compare_frames(work, result["children"])
    result["ratios"] = ratios(result["children"])
    result["median_ratios"] = median_ratios(result["children"])
    save(result, args.out, time.perf_counter() - started)
    return result


def read_child(out_dir: Path) -> dict:
    path = out_dir / "result.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def compare_frames(work: Path, children: dict) -> dict[str, float]:
    """Each video's mean |difference| from wanfit_cold's (same weights, same latents)."""
    base_path = work / "wanfit_cold" / "frames.npy"
    if "wanfit_cold" not in children or not base_path.is_file():
        return {}
    base = np.load(base_path).astype(np.float64)
    out = {}
    for name in children:
        path = work / name / "frames.npy"
        if name != "wanfit_cold" and path.is_file():
            other = np.load(path).astype(np.float64)
            out[name] = float(np.abs(other - base).mean()) if other.shape == base.shape else float("nan")
    return out


RATIO_KEYS = ("job_s", "spawn_to_job_end_s")


def _median_of(children: dict, kind: str, key: str) -> float | None:
    values = [c[key] for name, c in children.items() if kind_of(name) == kind]
    return statistics.median(values) if values else None


def ratios(children: dict) -> dict[str, float]:
    """Each wanfit child's job and spawn-to-job-end time over diffusers' (the median of its runs)."""
    peer = {key: _median_of(children, "diffusers", key) for key in RATIO_KEYS}
    if peer["job_s"] is None:
        return {}
    return {
        f"{name}_{key}_over_diffusers": c[key] / peer[key]
        for name, c in children.items()
        if kind_of(name) != "diffusers"
        for key in RATIO_KEYS
    }


def median_ratios(children: dict) -> dict[str, float]:
    """Each wanfit kind's median job over diffusers' median job."""
    peer = _median_of(children, "diffusers", "job_s")
    kinds = dict.fromkeys(kind_of(name) for name in children if kind_of(name) != "diffusers")
    return {} if peer is None else {k: _median_of(children, k, "job_s") / peer for k in kinds}


def save(result: dict, out: str | None, elapsed: float) -> None:
    result["elapsed_s"] = elapsed
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2, default=str))


def table(result: dict) -> str:
    def cell(value, fmt="{:.2f}"):
        return "-" if value is None else fmt.format(value)

    children = result["children"]
    device = next((c["device"] for c in children.values()), "?")
    lines = [
        f"bench_fresh on {device}: {result['video']}, {result['steps']} steps, guidance {result['guidance']}, "
        f"{result.get('elapsed_s', 0):.0f} s",
        "",
        "| child | job s | x diffusers | spawn to job end s | imports s | build s | plan s | median step s | first-step extra s | peak GiB | self-attention |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]  # fmt: skip
    for name, c in children.items():
        ratio = result["ratios"].get(f"{name}_job_s_over_diffusers")
        attention = (c.get("plan") or {}).get(
            "self_attention", "sdpa (diffusers)" if kind_of(name) == "diffusers" else "-"
        )
        lines.append(
            f"| {name} | {c['job_s']:.2f} | {cell(ratio, '{:.3f}')} | {c['spawn_to_job_end_s']:.2f} | "
            f"{c['spawn_to_build_s']:.2f} | {c['build_s']:.2f} | {cell(c['phases_s'].get('plan_s'))} | "
            f"{cell(c.get('median_step_s'), '{:.3f}')} | "
            f"{cell(c.get('first_step_extra_s'))} | {cell(c.get('peak_gib'))} | {attention} |"
        )
    for kind, ratio in result.get("median_ratios", {}).items():
        runs = sum(kind_of(name) == kind for name in children)
        if runs > 1:
            lines.append(f"- {kind}: median job over diffusers' median, {runs} runs: {ratio:.3f}")
    for name, c in children.items():
        if kind_of(name) != "diffusers":
            phases = ", ".join(f"{k} {v:.2f}" for k, v in c["phases_s"].items())
            lines.append(f"- {name} phases: {phases}; caches after: {c['cache_files_after']}")
    for name, diff in result.get("frames_vs_wanfit_cold_mean_abs_uint8", {}).items():
        lines.append(f"- {name} frames vs wanfit_cold: mean |diff| {diff:.3f}/255")
    lines += [f"- skipped {s['what']}: {s['why']}" for s in result["skipped"]]
    lines += [f"- FAILED {name}: {err.splitlines()[0][:200]}" for name, err in result["errors"].items()]
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return None
    names = [n for n in args.children.split(",") if n]
    if any(kind_of(n) not in CHILDREN for n in names) or len(set(names)) != len(names):
        raise SystemExit(
            f"--children takes distinct names of {', '.join(CHILDREN)}, each with an optional repeat "
            f"suffix (_r2, _r3 ...); got {args.children!r}."
        )
    if args.dry_run:
        args.steps = 2
    result = run(args)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
