"""Where wanfit's planning spends its time in a fresh process (probe, attention selection and its smoke
tests, the planner), as `wanfit generate` plans a job: cProfile's top entries by cumulative time.

    python3 benchmarks/profile_planning.py --runs 2 --out $OUT/planning.json   # GPU: runs 2.. reuse caches
    python3 benchmarks/profile_planning.py --dry-run                          # CPU: the logic only

Each run is a new interpreter (`--child`): the first pays what a first run pays (kernel compiles into
the user cache), the later ones what every later run pays. Reported per run: the import of wanfit,
plan_for's wall time, and the 25 functions with the most cumulative time under it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--dry-run", action="store_true", help="CPU: plan the 1.3B for an emulated H200")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args) -> dict:
    import cProfile

    start = time.perf_counter()
    from wanfit.plan.planning import Constraints, model_request, plan_for

    imported = time.perf_counter() - start
    width, height = (int(v) for v in args.size.split("x"))
    request = model_request("1.3B", width=width, height=height, frames=args.frames, steps=args.steps)
    hardware = "h200" if args.dry_run else None
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    result = plan_for(request, Constraints(), hardware)
    profile.disable()
    planned = time.perf_counter() - start
    return {
        "import_s": imported,
        "plan_for_s": planned,
        "self_attention": result.plan.self_attention,
        "top": top_functions(profile, args.top),
    }


def top_functions(profile, top: int) -> list[dict]:
    """A cProfile.Profile's `top` functions by cumulative time (own time beside it)."""
    import pstats

    rows = [
        {
            "function": f"{Path(file).name}:{line}({name})",
            "calls": calls,
            "cumulative_s": cumulative,
            "own_s": own,
        }
        for (file, line, name), (_, calls, own, cumulative, _) in pstats.Stats(profile).stats.items()
    ]
    rows.sort(key=lambda r: -r["cumulative_s"])
    return rows[:top]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    runs = []
    for i in range(args.runs):
        command = [sys.executable, __file__, "--child", "--size", args.size, "--frames", str(args.frames),
                   "--steps", str(args.steps), "--top", str(args.top)] + (["--dry-run"] if args.dry_run else [])  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        run = json.loads(done.stdout.strip().splitlines()[-1])
        run["process_s"] = time.perf_counter() - started
        runs.append(run)
        print(f"run {i}: process {run['process_s']:.2f} s, import {run['import_s']:.2f} s, "
              f"plan_for {run['plan_for_s']:.2f} s ({run['self_attention']})", file=sys.stderr)  # fmt: skip
        for row in run["top"][:15]:
            print(f"    {row['cumulative_s']:7.3f} s  {row['calls']:6d}  {row['function']}", file=sys.stderr)
    result = {"benchmark": "profile_planning", "size": args.size, "frames": args.frames, "runs": runs}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
