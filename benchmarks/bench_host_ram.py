"""Host RAM under a real cap: `wanfit generate` inside a cgroup v2 with memory.max set, beside the
planner's predictions (host RAM per phase, device peak per phase), for the small machines of issue 12.

    sudo python3 benchmarks/bench_host_ram.py --work /tmp/wanfit-bench --out $OUT/host_ram.json
        [--cases t4-colab,t4-16gb,...] [--steps 2] [--skip-forwards] [--keep-models] [--dry-run]

Cases (each its own cgroup with memory.max = the machine's RAM; swap off in the group):
    baseline             the process alone (import wanfit, CUDA context, one matmul, conv, attention)
    t4-colab             1.3B, 832x480x81, --emulate t4-colab, 12.7 GB   (the Colab free tier)
    t4-16gb              1.3B, --emulate t4, 16 GB
    rtx3060-laptop-16gb  1.3B, --emulate rtx3060-laptop, 16 GB
    vram4gib-16gb        1.3B, --vram 4GiB, 16 GB
    rtx4090-32gb-14b     14B, 1280x720x81, --emulate rtx4090, 32 GB
The planner's predictions come from `wanfit plan --json` run in a group with the same limit (so its
probe reads the cgroup, as the run's does). Measured: memory.peak, the largest anon / file /
unevictable of memory.stat (sampled every 0.1 s), memory.events oom_kill, the exit code, the DiT's
time per step and each phase's device peak (torch.cuda.max_memory_allocated, wanfit's own timings),
and any out-of-memory step-down (the output's metadata). Caches are dropped before each case so the
group reads its files itself. --forwards (default on) also times one DiT forward resident, streamed
from pinned copies and streamed from the mapped file, in this process.

Random-weight model folders (benchmarks/make_random_model.py) are written into --work once per
machine: the 1.3B folder (about 15 GB) and a 14B one sharing its VAE and umT5 (28 GB more).
--dry-run (no GPU, no root): the predictions for every case, and the built-in tiny model run once
through the same measuring code without a cgroup.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_memory
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

GIB = 1024**3
CGROUP = Path("/sys/fs/cgroup")
STAT_KEYS = ("anon", "file", "file_mapped", "shmem", "unevictable")
# What the process needs at one instant (what the planner's host estimate predicts): its anonymous
# memory (pinned copies included) and shared memory. File pages are not counted, mapped ones included:
# they are clean and the kernel reclaims them under a cap (uncapped, the loader's mmap of the 14B DiT
# showed 28.6 GB file_mapped beside 20.6 GiB anon, and under a 32 GB cap the same job ran with no
# oom_kill); memory.peak, which counts them, is set beside the plan's total with page cache instead.
NEED_KEYS = ("anon", "shmem")

CASES = {
    "baseline": {"model": None, "ram": None, "args": []},
    "t4-colab": {"model": "1.3B", "ram": 12_700_000_000, "args": ["--emulate", "t4-colab"]},
    "t4-16gb": {"model": "1.3B", "ram": 16_000_000_000, "args": ["--emulate", "t4"]},
    "rtx3060-laptop-16gb": {"model": "1.3B", "ram": 16_000_000_000, "args": ["--emulate", "rtx3060-laptop"]},
    "vram4gib-16gb": {"model": "1.3B", "ram": 16_000_000_000, "args": ["--vram", "4GiB"]},
    "rtx4090-32gb-14b": {
        "model": "14B",
        "ram": 32_000_000_000,
        "args": ["--emulate", "rtx4090", "--size", "1280x720"],
    },
}
# Item 5's sweep (--sweep): 14B on the 16 GB cards at 480p and on the 24 GB cards at 720p.
SWEEP_14B = {"832x480": ("t4", "t4-colab", "v100"), "1280x720": ("rtx4090", "a10g", "l4")}


def sweep_cases() -> dict[str, dict]:
    """Every emulated card's default job (1.3B, 832x480x81), and SWEEP_14B's, each on the free host
    RAM of the card's typical machine (`--ram`, as docs/hardware.md assumes), with no cgroup limit
    (the groups only count), longest first."""
    from wanfit.hardware.profiles import PROFILES
    from wanfit.plan.hardware_doc import card_hardware

    def ram(key: str) -> list[str]:
        return ["--ram", str(card_hardware(key).host_ram_available)]

    cases = {}
    for size, keys in reversed(SWEEP_14B.items()):
        for key in keys:
            args = ["--emulate", key, *ram(key), "--size", size]
            cases[f"{key}-14B-{size.split('x')[1]}p"] = {"model": "14B", "ram": None, "args": args}
    for key, profile in PROFILES.items():
        if profile.device_type == "cuda":
            cases[key] = {"model": "1.3B", "ram": None, "args": ["--emulate", key, *ram(key)]}
    return cases


BASELINE = """
import torch, wanfit
x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
(x @ x).sum().item()
conv = torch.nn.Conv3d(96, 96, 3).cuda().bfloat16()
conv(torch.randn(1, 96, 4, 64, 64, device="cuda", dtype=torch.bfloat16)).sum().item()
q = torch.randn(1, 12, 4096, 128, device="cuda", dtype=torch.bfloat16)
torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("host_ram.json"))
    p.add_argument("--work", type=Path, default=Path("/tmp/wanfit-bench"), help="model folders and outputs")
    p.add_argument("--cases", default="", help=f"comma-separated (default all), of: {', '.join(CASES)}, or with --sweep a card key")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--skip-forwards", action="store_true", help="no DiT forward timings")
    p.add_argument("--keep-models", action="store_true", help="keep the random folders for the next call")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run before it is stopped")
    p.add_argument("--dry-run", action="store_true", help="predictions only, and one tiny CPU run")
    p.add_argument("--sweep", action="store_true", help="item 5: every emulated card's default job instead")
    p.add_argument("--parallel", type=int, default=1, help="--sweep: runs at a time (they share the GPU)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- cgroups


class Group:
    """A cgroup v2 group with memory.max (None: no limit) and no swap; removed on close."""

    def __init__(self, name: str, limit: int | None):
        self.path = CGROUP / name
        if not (CGROUP / "cgroup.controllers").is_file():
            raise RuntimeError("no cgroup v2 hierarchy at /sys/fs/cgroup")
        control = CGROUP / "cgroup.subtree_control"
        if "memory" not in control.read_text().split():
            control.write_text("+memory")
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.max").write_text(str(limit) if limit else "max")
        swap = self.path / "memory.swap.max"
        if swap.exists():
            swap.write_text("0")  # a capped run must hit the limit, not swap

    def enter(self) -> None:
        """For preexec_fn: move the calling (child) process into the group."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def stat(self) -> dict[str, int]:
        values = dict(line.split() for line in self.read("memory.stat").splitlines() if " " in line)
        return {k: int(values.get(k, 0)) for k in STAT_KEYS}

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run_in_group(cmd: list[str], group: Group | None, timeout: int) -> dict:
    """Run `cmd` (in `group`); its exit code, output, wall time and the group's memory figures."""
    peaks = dict.fromkeys((*STAT_KEYS, "need"), 0)
    done = threading.Event()

    def sample():
        while not done.is_set():
            stat = group.stat()
            stat["need"] = sum(stat[k] for k in NEED_KEYS)
            for key, value in stat.items():
                peaks[key] = max(peaks[key], value)
            done.wait(0.1)

    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=group.enter if group is not None else None,
        cwd=ROOT,
        # No prompt cache: every run pays its text encoder, as a first run does (a cached prompt
        # would skip the phase whose device and host peaks the table compares).
        env={
            **os.environ,
            "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}",
            "WANFIT_PROMPT_CACHE": "0",
        },
    )
    sampler = threading.Thread(target=sample, daemon=True) if group is not None else None
    if sampler:
        sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    done.set()
    if sampler:
        sampler.join()
    result = {"exit": proc.returncode, "wall_s": time.perf_counter() - started, "stdout": out, "stderr": err}
    if group is not None:
        events = dict(line.split() for line in group.read("memory.events").splitlines() if " " in line)
        peak = group.read("memory.peak").strip()
        result.update(
            memory_peak=int(peak) if peak.isdigit() else None,
            oom_kill=int(events.get("oom_kill", 0)),
            stat_max=peaks,
        )
    else:
        import resource

        result["maxrss_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


def drop_caches() -> None:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        pass  # not root: the page cache stays as it is (figures then count less file cache)


# ----------------------------------------------------------------------------- the cases


def ensure_models(work: Path, sizes: set[str]) -> dict[str, Path]:
    """The random-weight folders of `sizes` (written once; the 14B shares the 1.3B's VAE and umT5, so
    the 1.3B folder is always written)."""
    folders = {"1.3B": work / "wan-1.3B", "14B": work / "wan-14B"}
    folders = {size: folder for size, folder in folders.items() if size in sizes | {"1.3B"}}
    timings = {}
    for size, folder in folders.items():
        if (folder / "config.json").is_file():
            continue
        started = time.perf_counter()
        cmd = [sys.executable, str(ROOT / "benchmarks" / "make_random_model.py"), "--out", str(folder)]
        if size == "14B":
            cmd += ["--size", "14B", "--share", str(folders["1.3B"])]
        subprocess.run(cmd, check=True, cwd=ROOT)
        timings[size] = time.perf_counter() - started
        print(f"bench_host_ram: wrote the {size} folder in {timings[size]:.0f} s", flush=True)
    return {**folders, "seconds": timings}


def wanfit(*args: str) -> list[str]:
    return [sys.executable, "-m", "wanfit", *args]


def case_args(case: dict, model: Path | None) -> list[str]:
    """The case's model (its folder; a preset size for the planner without one) and options."""
    if model is not None:
        return ["--model", str(model), *case["args"]]
    return [*(["--model-size", case["model"]] if case["model"] else []), *case["args"]]


def predict(case: dict, model: Path | None, group: Group | None, timeout: int) -> dict:
    """`wanfit plan --json` for the case, in a group with its limit (--ram stands in for it without one)."""
    extra = []
    if group is None and case["ram"]:  # what the probe would leave of the limit: the planner's margin
        from wanfit.plan.planner import HOST_MARGIN_FRACTION, HOST_MARGIN_MIN

        extra = ["--ram", str(case["ram"] - max(HOST_MARGIN_MIN, int(HOST_MARGIN_FRACTION * case["ram"])))]
    result = run_in_group(wanfit("plan", "--json", *case_args(case, model), *extra), group, timeout)
    try:
        return json.loads(result["stdout"])
    except ValueError:
        return {"feasible": False, "error": result["stderr"].strip().splitlines()[-1:]}


def sidecar_path(out: Path) -> Path:
    from wanfit.video import sidecar_path as where

    return where(out)


def measure(
    name: str, case: dict, model: Path | None, args, out_dir: Path, dry: bool, drop: bool = True
) -> dict:
    row: dict = {"case": name, "ram_limit": case["ram"], "args": case["args"]}
    if name == "baseline":
        if dry:
            return {**row, "skipped": "needs a CUDA device"}
        group = Group("wanfit-bench-baseline", None)
        try:
            result = run_in_group([sys.executable, "-c", BASELINE], group, args.timeout)
        finally:
            group.close()
        from wanfit.plan.host_estimates import HOST_PROCESS_CUDA

        return {**row, "predicted_process": HOST_PROCESS_CUDA, **_memory(result), "exit": result["exit"]}
    plan_group = None if dry else Group(f"wanfit-bench-{name}-plan", case["ram"])
    try:
        row["plan"] = predict(case, model, plan_group, args.timeout)
    finally:
        if plan_group:
            plan_group.close()
    out = out_dir / name  # PNG frames: the GPU machine has no ffmpeg
    sidecar_path(out).unlink(missing_ok=True)  # an earlier call's, perhaps of another format
    gen = ["generate", "--steps", str(args.steps), "--no-progress", "--overwrite", "--out", str(out)]
    if dry:
        gen = [*gen, "--size", "64x48", "--frames", "5"]  # the built-in tiny model, on the CPU
    elif drop:
        drop_caches()
    group = None if dry else Group(f"wanfit-bench-{name}", case["ram"])
    try:
        result = run_in_group(wanfit(*gen, *([] if dry else case_args(case, model))), group, args.timeout)
    finally:
        if group:
            group.close()
    row.update(_memory(result), exit=result["exit"], wall_s=result["wall_s"])
    row["stderr_tail"] = result["stderr"].strip().splitlines()[-3:]
    timings = next(
        (json.loads(line) for line in reversed(result["stdout"].splitlines()) if line.startswith("{")), {}
    )
    row["timings"] = timings.get("timings", {})
    row["per_step_s"] = row["timings"].get("denoise_s", 0) / args.steps if row["timings"] else None
    sidecar = sidecar_path(out)
    if sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        row["oom_steps"] = meta.get("oom_steps", [])
        row["ran_plan"] = meta.get("plan", {})
    return row


def _memory(result: dict) -> dict:
    keys = ("memory_peak", "oom_kill", "stat_max", "maxrss_children")
    return {k: result[k] for k in keys if k in result}


# ----------------------------------------------------------------------------- DiT forwards


def measure_forwards(model: Path, repeats: int = 5) -> list[dict]:
    """One DiT forward (1.3B, 832x480x81, batch 1, bf16) resident, streamed from pinned copies and
    streamed from the mapped file (0 blocks resident): median ms and peak GiB."""
    import torch
    from bench_memory import _cuda_time

    from wanfit.models.configs import WAN_T2V_1_3B
    from wanfit.pipeline import latent_shape
    from wanfit.plan.plan import Plan
    from wanfit.runtime.placement import DiTLayout, DiTPlacement
    from wanfit.weights.dit_loader import load_dit

    g = torch.Generator("cpu").manual_seed(1)
    x = torch.randn(latent_shape(1, 16, 480, 832, 81), generator=g).to("cuda", torch.bfloat16)
    t = torch.full((1,), 500.0, device="cuda")
    context = torch.randn(1, 512, WAN_T2V_1_3B.text_dim, generator=g).to("cuda", torch.bfloat16)
    rows = []
    for name, fields in (
        ("resident", {}),
        ("streamed, pinned copies, 0 resident", {"dit_blocks_resident": 0}),
        (
            "streamed from the mapped file, 0 resident",
            {"dit_blocks_resident": 0, "dit_stream_source": "mmap"},
        ),
    ):
        plan = Plan(device="cuda", compute_dtype="bfloat16", cfg_batch=False, **fields)
        layout = DiTLayout.from_plan(plan)
        dit = load_dit(model, device=layout.load_device, dtype=layout.load_dtype)
        placement = DiTPlacement(dit)
        placement.place(plan)
        with torch.no_grad():
            ms, peak = _cuda_time(lambda run=placement: run(x, t, context), repeats)
        rows.append({"plan": name, "ms": ms, "peak_gib": peak / GIB})
        placement.release()
        del dit, placement
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- the report


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _pair(row: dict, phase: str) -> str:
    """'predicted / measured' device peak of a phase, GiB."""
    pred = row.get("plan", {}).get("phases", {}).get(phase, {}).get("peak")
    meas = row.get("timings", {}).get(f"{phase}_peak_gib")
    return f"{_gib(pred)} / {'-' if meas is None else f'{meas:.2f}'}"


def table(rows: list[dict]) -> str:
    """Markdown: per case, the host RAM predicted (needed, + page cache) beside memory.peak and the
    largest anon, the device peak per phase predicted / measured, time per step, and what ran."""
    lines = [
        "| case | limit GB | plan | host needed (pred) GiB | + cache (pred) | memory.peak GiB | anon max GiB "
        "| oom_kill | exit | text enc. pred/meas GiB | denoise pred/meas | decode pred/meas | s/step |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |",
    ]
    for r in rows:
        if r["case"] == "baseline":
            if "skipped" not in r:
                lines.append(
                    f"| baseline | - | the process alone | {_gib(r['predicted_process'])} | - | "
                    f"{_gib(r.get('memory_peak'))} | {_gib(r.get('stat_max', {}).get('anon'))} | "
                    f"{r.get('oom_kill', '-')} | {r['exit']} | - | - | - | - |"
                )
            continue
        plan = r.get("plan", {})
        host = plan.get("host_phases", {})
        needed = max((p["needed"] for p in host.values()), default=None)
        cached = max((p["peak"] for p in host.values()), default=None)

        gave = ", ".join(plan.get("gave_up", [])) or ("no plan" if not plan.get("feasible") else "fastest")
        step = r.get("per_step_s")
        lines.append(
            f"| {r['case']} | {r['ram_limit'] / 1e9 if r['ram_limit'] else '-'} | {gave} | {_gib(needed)} | "
            f"{_gib(cached)} | {_gib(r.get('memory_peak'))} | {_gib(r.get('stat_max', {}).get('anon'))} | "
            f"{r.get('oom_kill', '-')} | {r.get('exit')} | {_pair(r, 'text_encoder')} | "
            f"{_pair(r, 'denoise')} | {_pair(r, 'vae_decode')} | "
            f"{'-' if not step else f'{step:.2f}'} |"
        )
    return "\n".join(lines)


def forwards_table(rows: list[dict]) -> str:
    lines = ["| DiT forward (1.3B, 480p x 81, batch 1) | ms | peak GiB |", "| --- | ---: | ---: |"]
    lines += [f"| {r['plan']} | {r['ms']:.1f} | {r['peak_gib']:.2f} |" for r in rows]
    return "\n".join(lines)


def _missing_packages() -> list[str]:
    """wanfit's required packages this Python cannot import (a run on the GPU machine of 2026-12-02
    lost every case to a missing diffusers)."""
    import importlib

    missing = []
    for module, dist in (("diffusers", "diffusers"), ("transformers", "transformers"), ("ftfy", "ftfy")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    return missing


def sweep_table(rows: list[dict]) -> str:
    """Markdown for --sweep: per card and job, each phase's device peak predicted / measured (and
    whether it is within 10%), the host need predicted / measured, step-downs and the exit."""
    lines = [
        "| case | plan | text enc. pred/meas GiB | denoise pred/meas | decode pred/meas | within 10% "
        "| host need pred/meas GiB | + page cache pred / memory.peak | file_mapped max | step-downs | exit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | ---: | --- | ---: |",
    ]
    for r in rows:
        plan = r.get("plan", {})
        gave = ", ".join(plan.get("gave_up", [])) or ("no plan" if not plan.get("feasible") else "fastest")
        host = max((p["needed"] for p in plan.get("host_phases", {}).values()), default=None)
        total = max((p["peak"] for p in plan.get("host_phases", {}).values()), default=None)
        stat = r.get("stat_max", {})
        need = sum(stat[k] for k in NEED_KEYS) if all(k in stat for k in NEED_KEYS) else None
        steps = "; ".join(" ".join(map(str, s)) for s in r.get("oom_steps", [])) or "none"
        lines.append(
            f"| {r['case']} | {gave} | {_pair(r, 'text_encoder')} | {_pair(r, 'denoise')} | "
            f"{_pair(r, 'vae_decode')} | {_within(r)} | {_gib(host)} / {_gib(need)} | "
            f"{_gib(total)} / {_gib(r.get('memory_peak'))} | {_gib(stat.get('file_mapped'))} | {steps} | {r.get('exit')} |"
        )
    return "\n".join(lines)


def _within(row: dict, tolerance: float = 0.10) -> str:
    """'yes' when every phase's measured device peak is within `tolerance` of the prediction."""
    phases = row.get("plan", {}).get("phases", {})
    checks = []
    for phase in ("text_encoder", "denoise", "vae_decode"):
        pred = phases.get(phase, {}).get("peak")
        meas = row.get("timings", {}).get(f"{phase}_peak_gib")
        if pred and meas is not None:
            checks.append(abs(meas * GIB - pred) <= tolerance * pred)
    return "-" if not checks else ("yes" if all(checks) else "no")


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = sweep_cases() if args.sweep else CASES
    names = [n.strip() for n in args.cases.split(",") if n.strip()] if args.cases else list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        print(
            f"bench_host_ram: unknown case(s) {', '.join(unknown)}; choose from {', '.join(cases)}.",
            file=sys.stderr,
        )
        return 2
    info: dict = {"cases": names, "steps": args.steps, "dry_run": args.dry_run, "sweep": args.sweep}
    out_dir = args.work / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    folders: dict = {}
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available() or os.geteuid() != 0:
            print("bench_host_ram: needs a CUDA device and root (cgroups); use --dry-run.", file=sys.stderr)
            return 2
        info["device"], info["torch"] = torch.cuda.get_device_name(), torch.__version__
        missing = _missing_packages()
        if missing:  # every run would stop at its first step: say so before any model is written
            print(f"bench_host_ram: install {', '.join(missing)} first (wheels: ../shared/scripts/gpu-wheels.sh).",
                  file=sys.stderr)  # fmt: skip
            return 2
        needed = {cases[n]["model"] for n in names} - {None}
        if needed or not args.skip_forwards:
            folders = ensure_models(args.work, needed)
            info["model_seconds"] = folders.pop("seconds")
    rows: list[dict] = []
    forwards: list[dict] = []
    lock = threading.Lock()

    def save() -> None:  # after every case: a call cut off keeps what it measured
        with lock:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            body = {**info, "seconds": time.perf_counter() - started, "rows": rows, "forwards": forwards}
            args.out.write_text(json.dumps(body, indent=2, default=str))

    def one(name: str) -> None:
        case = cases[name]
        model = folders.get(case["model"]) if case["model"] else None
        drop = args.parallel <= 1  # dropping the page cache under a neighbour's feet would skew its run
        row = measure(name, case, model, args, out_dir, args.dry_run, drop=drop)
        with lock:
            rows.append(row)
        save()
        print(f"bench_host_ram: {name} done after {time.perf_counter() - started:.0f} s", flush=True)

    if args.parallel > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(one, names))
    else:
        for name in names:
            one(name)
    rows.sort(key=lambda r: names.index(r["case"]))
    if not args.dry_run and not args.skip_forwards:
        forwards = measure_forwards(folders["1.3B"])
    save()
    if not args.dry_run and not args.keep_models:
        import shutil

        for folder in (args.work / "wan-14B", args.work / "wan-1.3B"):
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({k: v for k, v in info.items()}, default=str))
    print(sweep_table(rows) if args.sweep else table(rows))
    if forwards:
        print()
        print(forwards_table(forwards))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
