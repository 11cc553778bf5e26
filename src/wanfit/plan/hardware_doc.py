"""Generate docs/hardware.md from the planner: `python -m wanfit.plan.hardware_doc [--out PATH]`.

For each card in CARDS: the compute dtype, the expected attention backend, the plan and the
predicted peak for Wan2.1 1.3B at 832x480x81 and 14B at 1280x720x81, and what to install.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B
from wanfit.plan.estimates import GIB, Request
from wanfit.plan.planner import DeviceBudget, NoPlanError, PlanResult, fmt_bytes, plan_run

# Memory a CUDA context and the driver take before wanfit allocates anything.
CUDA_CONTEXT_BYTES = GIB // 2
# Host RAM free at start, as a share of the machine's total (the OS, desktop, page cache).
HOST_FREE_FRACTION = 0.85


@dataclass(frozen=True)
class Card:
    """An emulated card: what torch reports (total memory) and a typical host next to it."""

    key: str
    name: str
    kind: str
    compute_capability: tuple[int, int] | None
    memory_gib: float  # device memory as torch reports it; for the CPU, the host RAM
    host_ram_gib: float  # a typical machine with this card (an assumption, stated in the doc)
    install: str

    @property
    def bf16_native(self) -> bool:
        return self.compute_capability is not None and self.compute_capability >= (8, 0)

    def budget(self) -> DeviceBudget:
        total = int(self.memory_gib * GIB)
        host_free = int(self.host_ram_gib * GIB * HOST_FREE_FRACTION)
        if self.kind == "cpu":
            return DeviceBudget("cpu", self.name, None, total, host_free, host_free, False, device="cpu")
        return DeviceBudget(
            "cuda",
            self.name,
            self.compute_capability,
            total,
            total - CUDA_CONTEXT_BYTES,
            host_free,
            self.bf16_native,
            device="cuda",
        )


_FLASH = "`pip install flash-attn` (FlashAttention-2) for the fastest attention"
_NO_FLASH = (
    "no flash-attn (it needs sm_80+); fp16 runs PyTorch's memory-efficient SDPA, nothing extra to install"
)
# One table of emulated cards (the attention worker's hardware/profiles.py has the same cards: to merge).
CARDS: dict[str, Card] = {
    c.key: c
    for c in (
        Card("t4", "Tesla T4", "cuda", (7, 5), 15.0, 30.0, _NO_FLASH),
        Card("t4-colab", "Tesla T4 (Colab free tier)", "cuda", (7, 5), 15.0, 12.7e9 / GIB, _NO_FLASH),
        Card(
            "v100",
            "Tesla V100 16 GB",
            "cuda",
            (7, 0),
            15.77,
            64.0,
            "a CUDA 12 build of torch (`pip install torch --index-url https://download.pytorch.org/whl/cu126`): "
            "CUDA 13 builds dropped sm_70; no flash-attn",
        ),
        Card(
            "v100-32gb",
            "Tesla V100 32 GB",
            "cuda",
            (7, 0),
            31.74,
            128.0,
            "a CUDA 12 build of torch (cu126 wheels): CUDA 13 builds dropped sm_70; no flash-attn",
        ),
        Card("rtx2080ti", "GeForce RTX 2080 Ti", "cuda", (7, 5), 10.75, 32.0, _NO_FLASH),
        Card("rtx3060", "GeForce RTX 3060 12 GB", "cuda", (8, 6), 11.76, 32.0, _FLASH),
        Card("rtx4090", "GeForce RTX 4090", "cuda", (8, 9), 23.6, 64.0, _FLASH),
        Card("a100", "A100 40 GB", "cuda", (8, 0), 39.4, 128.0, _FLASH),
        Card("a100-80gb", "A100 80 GB", "cuda", (8, 0), 79.2, 256.0, _FLASH),
        Card(
            "h100",
            "H100 80 GB",
            "cuda",
            (9, 0),
            79.1,
            256.0,
            "`pip install flash-attn` (FlashAttention-2; FlashAttention-3's hopper build is faster still)",
        ),
        Card("cpu", "CPU only (32 GB RAM)", "cpu", None, 32.0, 32.0, "nothing; expect hours per video"),
    )
}

JOBS = (
    ("1.3B, 832x480x81", Request(WAN_T2V_1_3B, height=480, width=832, num_frames=81, model_name="1.3B")),
    ("14B, 1280x720x81", Request(WAN_T2V_14B, height=720, width=1280, num_frames=81, model_name="14B")),
)


def describe_plan(result: PlanResult) -> str:
    """A short phrase for a plan: what it gave up."""
    p = result.plan
    parts = []
    if p.text_encoder_device == "cpu" and result.device.kind != "cpu":
        parts.append("text encoder on CPU")
    elif p.text_encoder_blocks_resident is not None:
        parts.append("text encoder streamed")
    elif p.free_text_encoder:
        parts.append("text encoder freed")
    if result.device.kind == "cpu" and p.text_encoder_dtype == "bfloat16":
        parts.append("text encoder in bf16")
    if not p.cfg_batch and result.request.guidance:
        parts.append("CFG sequential")
    if p.offload_dit_before_decode:
        parts.append("DiT off before decode")
    if p.dit_blocks_resident is not None:
        parts.append(f"DiT streamed ({p.dit_blocks_resident}/{result.request.config.num_layers} resident)")
    if p.vae_tile:
        parts.append(f"VAE tiles {p.vae_tile[0]}x{p.vae_tile[1]}")
    if p.attention_chunk:
        parts.append(f"attention chunks {p.attention_chunk}")
    if p.ffn_chunk:
        parts.append(f"FFN chunks {p.ffn_chunk}")
    return ", ".join(parts) or "all resident, CFG batched"


def _cell(card: Card, request: Request) -> str:
    try:
        result = plan_run(card.budget(), request)
    except NoPlanError as err:
        return f"does not fit ({err.short})"
    return f"{describe_plan(result)}; peak {fmt_bytes(result.peak_bytes)}"


def render() -> str:
    from wanfit.plan.planner import compute_dtype_policy, expected_attention_backend

    lines = [
        "# Hardware requirements",
        "",
        "Generated by `python -m wanfit.plan.hardware_doc` from the memory planner (`wanfit plan`); "
        "do not edit by hand. Peaks are the planner's predictions of `torch.cuda.max_memory_allocated` "
        f"(the planner keeps a margin on top). Free device memory is taken as total minus "
        f"{fmt_bytes(CUDA_CONTEXT_BYTES)} for the CUDA context; free host RAM as "
        f"{HOST_FREE_FRACTION:.0%} of the host's RAM, which is an assumed typical machine per card. "
        "Run `wanfit plan` (or `wanfit plan --emulate CARD`) for your own machine.",
        "",
        "| card | memory | host RAM | dtype | attention (PyTorch alone) | "
        + " | ".join(f"Wan2.1 {label}" for label, _ in JOBS)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(JOBS),
    ]
    for card in CARDS.values():
        budget = card.budget()
        dtype = compute_dtype_policy(budget.kind, budget.compute_capability, budget.bf16_native)
        backend = expected_attention_backend(budget, dtype)
        cc = (
            f" (sm_{card.compute_capability[0]}{card.compute_capability[1]})"
            if card.compute_capability
            else ""
        )
        cells = [_cell(card, request) for _, request in JOBS]
        lines.append(
            f"| {card.name}{cc} | {card.memory_gib:.1f} GiB | {card.host_ram_gib:.1f} GiB | {dtype} | "
            f"{backend} | " + " | ".join(cells) + " |"
        )
    lines += ["", "## What to install for speed", ""]
    lines += [f"- **{card.name}**: {card.install}." for card in CARDS.values()]
    lines += [
        "",
        "Precision: bf16 on sm_80 and newer; fp16 on sm_70/75 (the DiT keeps its residual stream, norms, "
        "modulation and RoPE in fp32); fp32 on a CPU. The text encoder runs in bf16 (umT5 overflows in fp16).",
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
