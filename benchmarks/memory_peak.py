"""What is alive at a DiT forward's memory peak, wanfit's and diffusers', eager and compiled.

    PYTHONPATH=/tmp/site:src python3 benchmarks/memory_peak.py --out $OUT/peak.json   # H200: ~2 min
    python3 benchmarks/memory_peak.py --dry-run                                       # CPU: logic only

The models of bench_speed (Wan2.1 T2V-1.3B, random weights shared by both libraries, 832x480x81).
Each variant runs warm, then one more forward under the CUDA caching allocator's history recorder
(Python stacks). Replaying that forward's alloc/free events gives its peak over what was allocated
before it, and the blocks alive at that moment, grouped by the line that allocated them (for a
compiled graph, the line of Inductor's generated code, whose text is given). The peak of the replay
is checked against torch.cuda.max_memory_allocated of the same call.
"""

from __future__ import annotations

import argparse
import json
import linecache
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import wanfit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bench_speed  # noqa: E402

VARIANTS = ("wanfit_eager", "wanfit_compiled", "diffusers_eager", "diffusers_compiled")
# Frames of these files say nothing about which tensor it is; the first other frame names the site.
PLUMBING = ("/torch/", "/contextlib.py", "/functools.py", "/_ops.py", "<frozen")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--top", type=int, default=25, help="allocation sites listed per variant")
    p.add_argument("--layers", type=int, default=None, help="DiT blocks (default: all 30)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models: checks the script only")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def site(frames: list[dict]) -> str:
    """The innermost frame outside torch's plumbing, with its source line."""
    for frame in frames:
        name = frame.get("filename", "")
        if not any(part in name for part in PLUMBING) or "torchinductor" in name:
            text = linecache.getline(name, frame.get("line", 0)).strip()
            return f"{Path(name).name}:{frame.get('line')} {frame.get('name')}: {text[:160]}"
    return "torch internals"


def replay(events: list[dict], base: int) -> dict:
    """Peak of base + the call's allocations, and what the call allocated that is alive there."""
    live: dict[int, tuple[int, str]] = {}
    current = peak = base
    at_peak: dict[int, tuple[int, str]] = {}
    freed_before = 0  # blocks allocated before the call and freed during it
    freed_at_peak = 0
    for event in events:
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[addr] = (size, site(event.get("frames", [])))
            current += size
            if current > peak:
                peak, at_peak, freed_at_peak = current, dict(live), freed_before
        elif action == "free_completed":
            current -= size
            if live.pop(addr, None) is None:
                freed_before += size
    sites: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, where in at_peak.values():
        sites[where][0] += size
        sites[where][1] += 1
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])
    return {
        "peak_over_base_gib": (peak - base) / 2**30,
        "alive_from_call_gib": sum(s for s, _ in at_peak.values()) / 2**30,
        "freed_from_before_at_peak_gib": freed_at_peak / 2**30,
        "sites": [{"mib": b / 2**20, "blocks": n, "site": where} for where, (b, n) in ranked],
    }


def snapshot_peak(fn, device, top: int) -> dict:
    with torch.no_grad():
        fn()
        fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    try:
        with torch.no_grad():
            out = fn()
        torch.cuda.synchronize(device)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    del out
    events = snap["device_traces"][device.index or 0]
    result = replay(events, base)
    result["max_memory_allocated_over_base_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    result["base_gib"] = base / 2**30
    result["events"] = len(events)
    result["sites"] = result["sites"][:top]
    return result


def run(args) -> dict:
    argv = ["--dry-run"] if args.dry_run else []
    if args.layers:
        argv += ["--layers", str(args.layers)]
    speed_args = bench_speed.parse_args(argv)
    if args.dry_run:
        speed_args.size, speed_args.frames = "64x48", 5
        device = torch.device("cpu")
    else:
        device = bench_speed.cuda_or_exit()
    models = bench_speed.Models(speed_args, device)
    x, t, context = models.forward_inputs(1)
    x32 = x.float()
    result = {"benchmark": "memory_peak", "tokens": models.tokens, "variants": {}}
    wanted = [v for v in args.variants.split(",") if v]
    for name in wanted:
        if name.startswith("wanfit"):
            pipe = models.pipeline(models.plan(name, steps=None))
            placement = pipe.placement.dit
            placement.place(pipe.plan)

            def call(placement=placement):
                return placement(x32, t, context)

        else:
            if name == "diffusers_compiled":
                models.compile_diffusers()

            def call():
                return models.ref_dit(
                    hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False
                )[0]

        if device.type != "cuda":  # the CPU has no allocator history: the call only
            with torch.no_grad():
                call()
            result["variants"][name] = {"ran": True}
        else:
            result["variants"][name] = snapshot_peak(call, device, args.top)
        if name.startswith("wanfit"):
            models.leave(pipe)
            result["variants"][name]["plan"] = {
                k: getattr(pipe.plan, k)
                for k in ("self_attention", "compile_dit", "ffn_gelu_in_place", "fused_elementwise")
                if hasattr(pipe.plan, k)
            }
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return result


def table(result: dict) -> str:
    lines = [f"memory_peak: {result['tokens']} tokens"]
    for name, r in result["variants"].items():
        if "peak_over_base_gib" not in r:
            lines.append(f"- {name}: ran")
            continue
        lines.append(
            f"\n## {name}: peak over base {r['peak_over_base_gib']:.3f} GiB "
            f"(max_memory_allocated {r['max_memory_allocated_over_base_gib']:.3f}); alive from the call "
            f"{r['alive_from_call_gib']:.3f}, freed from before {r['freed_from_before_at_peak_gib']:.3f}; "
            f"plan {r.get('plan')}"
        )
        lines += [f"  {s['mib']:8.1f} MiB x{s['blocks']:<3} {s['site']}" for s in r["sites"]]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
