"""`wanfit doctor`: what this machine is and what wanfit would use on it."""

from __future__ import annotations

import argparse
import json

from wanfit.commands.common import DEFAULT_JOB, HardwareSetup, add_hardware_options, hardware_from_args
from wanfit.hardware.probe import HardwareProbe
from wanfit.hardware.profiles import GIB
from wanfit.precision import dtype_name


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="report the device, dtypes and attention backends wanfit would use")
    add_hardware_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def report(setup: HardwareSetup) -> dict:
    """The doctor's findings, JSON-ready."""
    hw, d = setup.probe, setup.dispatcher
    job = DEFAULT_JOB
    call = d.call_on_probe(setup.precision.compute, job.tokens, heads=job.heads, head_dim=job.head_dim)
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
        "compute_dtype": dtype_name(setup.precision.compute),
        "storage_dtype": dtype_name(setup.precision.storage),
        "precision_notes": list(setup.precision.notes),
        "job": {
            "description": job.describe(),
            "tokens": job.tokens,
            "heads": job.heads,
            "head_dim": job.head_dim,
        },
        "attention": d.explain(call),
        "warnings": list(hw.warnings),
    }


def run(args: argparse.Namespace) -> int:
    setup = hardware_from_args(args)
    data = report(setup)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(format_report(data, setup.probe))
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
