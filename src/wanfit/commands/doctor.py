"""`wanfit doctor`: what this machine is and what wanfit would use on it."""

from __future__ import annotations

import argparse
import json

from wanfit.commands import common
from wanfit.hardware.probe import HardwareProbe
from wanfit.hardware.profiles import GIB
from wanfit.plan.planning import Constraints
from wanfit.precision import dtype_name


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="report the device, dtypes and attention backends wanfit would use")
    common.add_hardware_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def report(hw: HardwareProbe, constraints: Constraints | None = None) -> dict:
    """The doctor's findings for the default job (Wan2.1 1.3B, 832x480x81), JSON-ready: the
    planner's choices (wanfit.plan.planning) and every attention backend's answer for the DiT's
    self-attention call."""
    from wanfit.attention.dispatch import Dispatcher
    from wanfit.errors import WanfitError
    from wanfit.plan.planning import attention_calls, model_request, plan_for
    from wanfit.precision import precision_policy

    constraints = constraints or Constraints()
    job = model_request("1.3B")
    precision = precision_policy(hw, compute=constraints.dtype)
    d = Dispatcher(hw, forced=constraints.attention, allow_lossy=constraints.allow_lossy_attention)
    call = attention_calls(job, hw, precision.compute, d)["self"]
    try:  # the same planning call as `wanfit plan` and `generate`
        result = plan_for(job, constraints, hw)
        planned = {kind: result.plan.attention_for(kind) for kind in ("self", "cross", "vae")}
        attention_notes = []
        plan = {"feasible": True, "gave_up": list(result.steps), "peak_bytes": result.peak_bytes}
    except WanfitError as err:  # shown in the report, not raised: the doctor says what is wrong
        planned, attention_notes, plan = {}, [], {"feasible": False, "error": str(err)}
    cfg = job.config
    return {
        "device": {
            "type": hw.device_type,
            "name": hw.device_name,
            "index": hw.device_index,
            "compute_capability": list(hw.compute_capability) if hw.compute_capability else None,
            "sm": hw.sm,
            "total_memory": hw.total_memory,
            "free_memory": hw.free_memory,
            "bf16_native": hw.bf16_native,
            "fp16_native": hw.fp16_native,
            "emulated": hw.emulated,
            "present": hw.device_present,
            "physical_name": hw.physical_device_name,
        },
        "host": {
            "ram_total": hw.host_ram_total,
            "ram_available": hw.host_ram_available,
            "cpu_count": hw.cpu_count,
        },
        "torch": {
            "version": hw.torch_version,
            "cuda": hw.torch_cuda_version,
            "arch_list": list(hw.torch_arch_list),
            "sdpa_backends": dict(hw.sdpa_backends) if hw.sdpa_backends is not None else None,
        },
        "packages": [
            {"name": p.name, "module": p.module, "installed": p.installed, "version": p.version}
            for p in hw.kernel_packages
        ],
        "compute_dtype": dtype_name(precision.compute),
        "storage_dtype": dtype_name(precision.storage),
        "precision_notes": list(precision.notes) + attention_notes,
        "job": {
            "description": f"{job.describe()}: {job.tokens:,} tokens, {cfg.num_heads} heads of {cfg.head_dim}",
            "tokens": job.tokens,
            "heads": cfg.num_heads,
            "head_dim": cfg.head_dim,
        },
        "planned_attention": planned,
        "plan": plan,
        "attention": d.explain(call),
        "tiers": tiers(hw, precision.compute),
        "warnings": list(hw.warnings),
    }


def tiers(hw: HardwareProbe, compute) -> dict:
    """Which speed tiers this card gets and why: exact (the default) and fast (--fast, lossy)."""
    from wanfit.runtime.fp8_linear import fast_tier_status

    refused, failed = fast_tier_status(hw, compute)
    if refused is not None:
        fast = {"available": False, "why": f"--fast is refused: {refused}"}
    elif failed is not None:
        fast = {
            "available": False,
            "why": f"--fast runs exact: its fp8 GEMM failed the smoke test here ({failed}).",
        }
    else:
        smoke = (
            "smoke-tested here" if hw.device_present else "from the card's declarations, emulated: not run"
        )
        fast = {
            "available": True,
            "why": f"--fast: fp8 e4m3 GEMMs for the DiT's linears on {hw.sm}, lossy ({smoke})",
        }
    exact = f"the default: {dtype_name(compute)} compute, nothing lossy"
    return {"exact": {"available": True, "why": exact}, "fast": fast}


def run(args: argparse.Namespace) -> int:
    hw = common.hardware_from_args(args)
    data = report(hw, common.constraints_from_args(args))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(format_report(data, hw))
    return 0


def format_report(data: dict, hw: HardwareProbe) -> str:
    dev = data["device"]
    lines = ["wanfit doctor", ""]
    where = f"{dev['type']}, {dev['sm']}" if dev["sm"] else dev["type"]
    name = f"{dev['name']} ({where})"
    if dev["emulated"]:
        name += f", emulated on {dev['physical_name']}"
    lines.append(f"  device      {name}")
    lines.append(f"  memory      {_gib(dev['total_memory'])} total, {_gib(dev['free_memory'])} free")
    host = data["host"]
    lines.append(
        f"  host RAM    {_gib(host['ram_total'])} total, {_gib(host['ram_available'])} available, {host['cpu_count']} CPUs"
    )
    lines.append(
        f"  dtypes      native bf16: {_yes(dev['bf16_native'])}, native fp16: {_yes(dev['fp16_native'])}"
        f" -> compute {data['compute_dtype']}, storage {data['storage_dtype']}"
    )
    t = data["torch"]
    arches = ", ".join(t["arch_list"]) or "none (CPU build)"
    lines.append(f"  torch       {t['version']} (CUDA {t['cuda'] or 'none'}; kernels for {arches})")
    if t["sdpa_backends"] is not None:
        sdpa = ", ".join(f"{k} {_yes(v)}" for k, v in t["sdpa_backends"].items())
        lines.append(f"  torch SDPA  {sdpa} (torch's own check, head dim 128)")
    packages = ", ".join(
        f"{p['name']} {p['version'] or 'installed'}" if p["installed"] else f"{p['name']} -"
        for p in data["packages"]
    )
    lines.append(f"  packages    {packages}")
    for name, tier in data["tiers"].items():
        lines.append(f"  tier {name:<7}{_yes(tier['available']):<4} {tier['why']}")
    for note in data["precision_notes"] + data["warnings"]:
        lines.append(f"  note        {note}")

    att = data["attention"]
    lines += ["", f"Attention for the default job ({data['job']['description']}, {data['compute_dtype']}):"]
    if att["selection"]:
        sel = att["selection"]
        cast = f", cast from {sel['model_dtype']}" if sel["cast"] else ""
        inner = f" on {sel['inner']}" if sel["inner"] else ""
        lines.append(f"  selected    {sel['backend']}{inner} ({sel['kernel_dtype']}{cast})")
        lines.append(f"  why         {sel['reason']}")
    else:
        lines.append(f"  selected    none: {att['error']}")
    if data["planned_attention"]:
        kinds = ", ".join(f"{k} {v or 'none'}" for k, v in data["planned_attention"].items())
        lines.append(f"  plan        {kinds} (what `wanfit plan` and `generate` use per kind)")
    plan = data["plan"]
    if plan["feasible"]:
        gave_up = ", ".join(plan["gave_up"]) or "nothing"
        lines.append(
            f"  memory      predicted peak {_gib(plan['peak_bytes'])}; gave up: {gave_up} (`wanfit plan` for more)"
        )
    else:
        lines.append(f"  memory      {plan['error']}")
    lines.append("")
    width = max(len(c["name"]) for c in att["candidates"]) + 2
    for c in att["candidates"]:
        mark = "yes" if c["available"] else "no "
        smoke = f" [smoke test {c['smoke_test']}]" if c["smoke_test"] not in ("not run",) else ""
        lines.append(f"  {c['name']:<{width}}{mark}  {c['reason']}{smoke}")
    if not hw.device_present:
        lines += [
            "",
            "  (emulated card absent here: selection rests on declared requirements, nothing was run)",
        ]
    return "\n".join(lines)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
