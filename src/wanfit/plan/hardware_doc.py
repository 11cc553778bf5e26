"""Generate docs/hardware.md from the planner: `python -m wanfit.plan.hardware_doc [--out PATH]`.

For each emulated card (wanfit.hardware.profiles): the compute dtype (wanfit.precision), the
attention backend (the dispatcher, from the backends' declared requirements), the plan and the
predicted peak for Wan2.1 1.3B at 832x480x81 and 14B at 1280x720x81, and what to install.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B
from wanfit.plan.estimates import GIB, Request
from wanfit.plan.planner import MIB, DeviceBudget, NoPlanError, PlanResult, budget_from_probe, fmt_bytes
from wanfit.plan.planning import plan_for

# Memory a CUDA context and the driver take before wanfit allocates anything.
CUDA_CONTEXT_BYTES = GIB // 2
# Host RAM free at start, as a share of the machine's total (the OS, desktop, page cache).
HOST_FREE_FRACTION = 0.85
# The host RAM of a typical machine with each card: an assumption the document states.
TYPICAL_HOST_RAM_GIB = {
    "t4": 30, "v100": 64, "v100-32gb": 128, "rtx2080ti": 32, "rtx3060": 32, "rtx3060-laptop": 16,
    "rtx4090": 64, "a10g": 64, "l4": 64, "a100-40gb": 128, "a100": 256, "h100": 256, "h200": 256, "cpu": 32,
}  # fmt: skip

JOBS = (
    ("1.3B, 832x480x81", Request(WAN_T2V_1_3B, height=480, width=832, num_frames=81, model_name="1.3B")),
    ("14B, 1280x720x81", Request(WAN_T2V_14B, height=720, width=1280, num_frames=81, model_name="14B")),
)


def card_hardware(key: str):
    """An emulated card on its typical machine (no device needs to be present)."""
    from wanfit.hardware.probe import probe
    from wanfit.hardware.profiles import PROFILES

    hw = probe(emulate=key)
    profile = PROFILES[key]
    host = int((profile.host_ram_gib or TYPICAL_HOST_RAM_GIB[key]) * GIB)
    host_free = int(host * HOST_FREE_FRACTION)
    if hw.device_type == "cpu":
        hw = replace(hw, total_memory=host, free_memory=host_free)
    else:
        hw = replace(
            hw, free_memory=hw.total_memory - CUDA_CONTEXT_BYTES, device_present=False, device_index=None
        )
    return replace(hw, host_ram_total=host, host_ram_available=host_free)


def card_budget(key: str) -> DeviceBudget:
    """The planner's view of an emulated card on its typical machine."""
    return budget_from_probe(card_hardware(key))


def install_advice(budget: DeviceBudget) -> str:
    """What to install for speed on this kind of card."""
    cc = budget.compute_capability
    if budget.kind == "cpu":
        return "nothing; expect hours per 480p video (use `--size 320x192 --frames 17` to try things)"
    if cc < (7, 5):
        return (
            "a CUDA 12 build of torch (`pip install torch --index-url https://download.pytorch.org/whl/cu126`): "
            "CUDA 13 builds dropped sm_70; flash-attn does not support this card"
        )
    if cc < (8, 0):
        return "nothing: fp16 runs PyTorch's memory-efficient SDPA; flash-attn does not support this card"
    if cc >= (9, 0):
        return (
            "`pip install flash-attn-4` for speed: its attention took 8.87 ms to cuDNN's 11.24 on an H200, "
            "the 1.3B's forward 0.89x diffusers compiled (docs/benchmarks.md); without it PyTorch's cuDNN "
            "attention runs; `wanfit bench attention` ranks what is installed"
        )
    return (
        "optional `pip install flash-attn` (FlashAttention-2) or `flash-attn-4` (its sm_80 path, not "
        "measured here); `wanfit bench attention` ranks them against PyTorch's"
    )


def describe_plan(result: PlanResult) -> str:
    """A short phrase for a plan: what it gave up."""
    p = result.plan
    parts = []
    if p.text_encoder_device == "cpu" and result.device.kind != "cpu":
        parts.append("text encoder on CPU")
    elif p.text_encoder_blocks_resident is not None:
        from_file = " from its file" if p.text_encoder_stream_source == "mmap" else ""
        parts.append(f"text encoder streamed{from_file}")
    elif p.free_text_encoder:
        parts.append("text encoder freed")
    if result.device.kind == "cpu" and p.text_encoder_dtype == "bfloat16":
        parts.append("text encoder in bf16")
    if not p.cfg_batch and result.request.guidance:
        parts.append("CFG sequential")
    if p.offload_dit_before_decode:
        parts.append("DiT off before decode")
    if p.dit_blocks_resident is not None:
        from_file = " from its file" if p.dit_stream_source == "mmap" else ""
        parts.append(
            f"DiT streamed{from_file} ({p.dit_blocks_resident}/{result.request.config.num_layers} resident)"
        )
    if p.text_encoder_dtype == "float8_e4m3fn":
        parts.append("text encoder in fp8")
    if p.vae_tile:
        parts.append(f"VAE tiles {p.vae_tile[0]}x{p.vae_tile[1]}")
    if p.attention_chunk:
        parts.append(f"attention chunks {p.attention_chunk}")
    if p.ffn_chunk:
        parts.append(f"FFN chunks {p.ffn_chunk}")
    return ", ".join(parts) or "all resident, CFG batched"


def _cell(hw, request: Request) -> tuple[str, str | None]:
    """(the table cell, the self-attention backend) of the plan for `request` on `hw`."""
    try:
        result = plan_for(request, hardware=hw)
    except NoPlanError as err:
        return f"does not fit ({err.short})", None
    cell = f"{describe_plan(result)}; peak {fmt_bytes(result.peak_bytes)}, host RAM {fmt_bytes(result.host_bytes)}"
    return cell, result.plan.self_attention


def least_host_ram(hw, request: Request) -> str:
    """The least host RAM a plan for `request` needs on this card (the planner's answer to a budget
    nothing fits), or '-' when the card itself is too small."""
    from wanfit.plan.planning import Constraints

    try:
        result = plan_for(request, Constraints(ram=MIB), hardware=hw)
    except NoPlanError as err:
        return fmt_bytes(err.host_bytes_needed) if "host RAM" in err.short else "-"
    return fmt_bytes(result.host_bytes)


def render() -> str:
    from wanfit.hardware.profiles import PROFILES
    from wanfit.precision import compute_dtype_for, dtype_name

    lines = [
        "# Hardware requirements",
        "",
        "Generated by `python -m wanfit.plan.hardware_doc` from the memory planner (`wanfit plan`); "
        "do not edit by hand. Peaks are the planner's predictions of `torch.cuda.max_memory_allocated` "
        f"(the planner keeps a margin on top). Free device memory is taken as total minus "
        f"{fmt_bytes(CUDA_CONTEXT_BYTES)} for the CUDA context; free host RAM as "
        f"{HOST_FREE_FRACTION:.0%} of the host RAM of an assumed typical machine per card (the column). "
        "The attention column is what the dispatcher selects with PyTorch alone (docs/attention.md). "
        "Host RAM in a cell is what that plan needs (the process included on a GPU; docs/host_ram.md); the least "
        "host RAM column is the smallest the planner can make the 1.3B job need on that card (blocks "
        "streamed from the memory-mapped files). "
        "Run `wanfit plan` (or `wanfit plan --emulate CARD`) for your own machine.",
        "",
        "| card | memory | host RAM | least host RAM (1.3B) | dtype | attention | "
        + " | ".join(f"Wan2.1 {label}" for label, _ in JOBS)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(JOBS),
    ]
    advice = []
    for key, profile in PROFILES.items():
        hw = card_hardware(key)
        budget = budget_from_probe(hw)
        dtype = dtype_name(compute_dtype_for(budget.kind, budget.bf16_native, budget.fp16_native))
        cc = budget.compute_capability
        name = f"{profile.name} (`{key}`, sm_{cc[0]}{cc[1]})" if cc else f"{profile.name} (`{key}`)"
        cells = [_cell(hw, request) for _, request in JOBS]
        backend = next((b for _, b in cells if b), None)
        host_gib = budget.host_free_bytes / HOST_FREE_FRACTION / GIB
        lines.append(
            f"| {name} | {budget.total_bytes / GIB:.1f} GiB | {host_gib:.1f} GiB | "
            f"{least_host_ram(hw, JOBS[0][1])} | {dtype} | "
            f"{backend or '-'} | " + " | ".join(cell for cell, _ in cells) + " |"
        )
        advice.append(f"- **{profile.name}** (`{key}`): {install_advice(budget)}.")
    lines += ["", "## What to install for speed", "", *advice]
    lines += [
        "",
        "Precision: bf16 on sm_80 and newer; fp16 on sm_70/75 (the DiT keeps its residual stream, norms, "
        "modulation and RoPE in fp32); fp32 on a CPU. The text encoder never runs in fp16 (umT5 overflows): "
        "bf16 where native, else bf16 weights computed in fp32 block by block.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/hardware.md from the memory planner.")
    parser.add_argument("--out", type=Path, default=Path("docs/hardware.md"))
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
