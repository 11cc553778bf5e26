"""A rough time estimate for a planned job, said before the work starts.

FLOPs counted from the request (the DiT's linears and attention per step, the VAE's convolutions per
output pixel, the text encoder once) over a speed: the card's spec-sheet tensor throughput
(wanfit.hardware.profiles) or, on a CPU, a matmul timed here for a fraction of a second, times the
share of it such work reaches. It is a guess within a factor of about two, and says so.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from wanfit.plan.planner import PlanResult

# Share of the speed each kind of work reaches. GPU DiT: an H200 runs the 1.3B 480p forward
# (2.8e14 FLOP) in 0.52 s of 989 TFLOP/s, 0.54. The rest: fitted on this project's CPU runs (tiny
# models reach about a tenth of the matmul rate) and the H100 VAE decode (1.5 s at 480p x 81).
EFFICIENCY = {
    ("cuda", "dit"): 0.5,
    ("cuda", "vae"): 0.25,
    ("cpu", "dit"): 0.3,
    ("cpu", "vae"): 0.1,
}
# FLOPs of the Wan2.1 VAE decoder per output pixel (96 base channels; the convolutions of each
# level times its resolution, 480p), scaled by (base_dim / 96)^2 for other widths.
VAE_DECODE_FLOP_PER_PIXEL = 1.25e7
# Fixed cost of one DiT block call beyond its FLOPs (kernel launches, Python): dominates tiny models.
BLOCK_OVERHEAD_S = {"cuda": 2e-4, "cpu": 3e-3}
FP32_ON_TENSOR_CARDS = 1 / 8  # fp32 runs without tensor cores: about an eighth of the fp16 rate
# LoRAs, measured on an H200 (benchmarks/bench_lora.py, 2026-12-02, last call: 1.3B, 832x480x81,
# bf16, a LightX2V-shaped LoRA of rank 64 on every block Linear, 305 modules): the runtime branch (the
# base GEMM adding into the small one's output, q/k/v sharing one down-projection) made each eager
# DiT forward 3.8% slower (577.1 -> 599.2 ms) and each compiled one 5.0% (511.5 -> 537.2 ms); the
# planner's estimate takes the larger share. The branch's share scales with its factors against that
# LoRA's (wanfit.plan.lora.full_branch_elements), the merge with the elements merged. The merge's speed
# hangs on where the base copy goes (Plan.lora_base_copy), measured on the 14B (same script, 2026-12-02,
# --models 14B --skip-job, 1.405e10 block weight elements merged): 23.84 s with the copy sent to the
# host (so that copy is nearly all of it), 0.53 s with it kept on the device, 0.47 s with none kept.
LORA_BRANCH_FORWARD_COST = 0.050
# The per-call merge (Plan.lora_mode "merge_per_call") with a LoRA on every block Linear: its share of
# a forward (docs/benchmarks.md, twelfth run: H100, rank 64, 832x480x81, eager, compiled and fp8-stored,
# cuDNN and flash-attn-4 attention): 1.3B +0.3 to +1.7%, 10 of the 14B's blocks +1.5 to +2.5%, the
# whole 14B +1.2 to +1.4%. It follows the weights rewritten per call, not the rank; the figure taken
# is about the largest seen on the 14B's shapes.
LORA_PER_CALL_MERGE_FORWARD_COST = 0.020
LORA_BRANCH_MEASURED_RANK = 64
LORA_MERGED_ELEMENTS_14B = 1.405e10
LORA_MERGE_S_PER_ELEMENT = {
    "host": 23.84 / LORA_MERGED_ELEMENTS_14B,
    "device": 0.53 / LORA_MERGED_ELEMENTS_14B,
    "none": 0.47 / LORA_MERGED_ELEMENTS_14B,
}


@dataclass(frozen=True)
class TimeEstimate:
    seconds: float
    denoise_s: float
    decode_s: float
    basis: str  # where the speed came from, in words
    lora_merge_s: float = 0.0  # merging the LoRAs, once before the denoising

    def describe(self) -> str:
        return f"about {format_duration(self.seconds)} ({self.basis}; a rough guess)"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{round(seconds / 86400)} days"


@functools.cache
def measured_cpu_flops() -> float:
    """This CPU's fp32 matmul rate (FLOP/s), timed for about 0.2 s once per process."""
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < 0.2:
        a @ b
        n += 1
    return 2 * 512**3 * n / elapsed


def dit_flops_per_step(result: PlanResult) -> float:
    """Multiply-adds x 2 of one denoising step: every block's linears and attention, per sample."""
    req = result.request
    cfg = req.config
    n, d, f, t = req.tokens, cfg.dim, cfg.ffn_dim, cfg.text_len
    linears = 2 * n * (6 * d * d + 2 * d * f) + 2 * t * 2 * d * d
    attention = 4 * n * n * d + 4 * n * t * d
    samples = 2 if req.guidance else 1
    return samples * cfg.num_layers * (linears + attention)


def estimate_time(result: PlanResult, steps: int) -> TimeEstimate:
    """How long the planned job will take, roughly, and on what the guess rests."""
    from wanfit.hardware.profiles import profile_for_device

    kind = "cpu" if result.device.kind == "cpu" else "cuda"
    hw = result.hardware
    if kind == "cpu":
        speed, basis = measured_cpu_flops(), "this CPU's matmul speed, timed just now"
    else:
        name = getattr(hw, "device_name", result.device.name)
        profile = profile_for_device(name)
        if profile is None or profile.tflops is None:
            speed, basis = 100e12, f"no speed on record for {name}: 100 TFLOP/s assumed"
        else:
            speed, basis = profile.tflops * 1e12, f"{profile.name}'s spec-sheet speed"
        if result.plan.compute_dtype == "float32":
            speed *= FP32_ON_TENSOR_CARDS
    req = result.request
    cfg = req.config
    passes = 2 if req.guidance and not result.plan.cfg_batch else 1
    overhead = steps * passes * cfg.num_layers * BLOCK_OVERHEAD_S[kind]
    denoise = steps * dit_flops_per_step(result) / (speed * EFFICIENCY[(kind, "dit")]) + overhead
    branch, merge = lora_costs(result)
    denoise *= 1 + branch
    pixels = req.num_frames * req.height * req.width
    vae_flops = pixels * VAE_DECODE_FLOP_PER_PIXEL * (req.vae.base_dim / 96) ** 2
    decode = vae_flops / (speed * EFFICIENCY[(kind, "vae")])
    return TimeEstimate(merge + denoise + decode, denoise, decode, basis, merge)


def lora_costs(result: PlanResult) -> tuple[float, float]:
    """(the runtime branch's share added to each DiT forward, the merge's seconds) of the plan's LoRAs."""
    from wanfit.plan.lora import (
        branch_elements,
        full_branch_elements,
        merged_elements,
        per_call_merged_share,
        planned_lora_base_copy,
        planned_lora_mode,
    )

    req = result.request
    mode = planned_lora_mode(req, result.plan)
    if mode is None:
        return 0.0, 0.0
    per_element = LORA_MERGE_S_PER_ELEMENT[planned_lora_base_copy(req, result.plan)]
    merge = merged_elements(req.config, req.loras, mode) * per_element
    if mode == "merge":
        return 0.0, merge
    if mode == "merge_per_call":
        return LORA_PER_CALL_MERGE_FORWARD_COST * per_call_merged_share(req.config, req.loras), merge
    measured = full_branch_elements(req.config, LORA_BRANCH_MEASURED_RANK)
    return LORA_BRANCH_FORWARD_COST * branch_elements(req.config, req.loras) / measured, merge
