"""Where a GPU call's time goes: one call under torch.profiler, its kernels' device time grouped by
kind (GEMMs, attention, Inductor's fused Triton kernels, other elementwise work, copies).

Used by the benchmarks' `--profile` flags, so a timing and the breakdown that explains it come from
the same run. CUDA only (None elsewhere).
"""

from __future__ import annotations

import re

import torch

# First match wins; kernel names as CUDA, cuBLAS, cuDNN and Triton give them.
KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa|cudnn", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|\bmm\b|_mm_|splitk", re.I)),
    ("fused (triton)", re.compile(r"^triton|triton_", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|reduce|norm|softmax|gelu|cat|index", re.I)),
)


def kernel_kind(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def kernel_profile(fn, top: int = 25) -> dict | None:
    """Run fn() once under the profiler: total device ms, ms per kind, and the `top` kernels by time."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None)
        if us is None:
            us = getattr(event, "cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": event.key[:160], "ms": us / 1000, "calls": event.count})
    rows.sort(key=lambda r: -r["ms"])
    gaps = device_gaps(prof)
    by_kind: dict[str, float] = {}
    for row in rows:
        row["kind"] = kernel_kind(row["kernel"])
        by_kind[row["kind"]] = by_kind.get(row["kind"], 0.0) + row["ms"]
    return {
        "device_ms": sum(r["ms"] for r in rows),
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top": rows[:top],
        **({"gaps": gaps} if gaps else {}),
    }


def device_gaps(prof, long_us: float = 20.0) -> dict | None:
    """How busy the device was between the call's first kernel start and its last kernel end: the
    span, the time some kernel ran, and the idle time, in all and in gaps longer than `long_us`
    (gaps a kernel launch's latency does not explain: the host fell behind, or waited)."""
    from torch.autograd import DeviceType

    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if getattr(e, "device_type", None) == DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    if not spans:
        return None
    busy, idle, long_idle, long_count, edge = 0.0, 0.0, 0.0, 0, spans[0][0]
    for start, end in spans:
        if start > edge:
            gap = start - edge
            idle += gap
            if gap > long_us:
                long_idle, long_count = long_idle + gap, long_count + 1
        if end > edge:
            busy += end - max(start, edge)
            edge = end
    return {
        "kernels": len(spans),
        "span_ms": (edge - spans[0][0]) / 1000,
        "busy_ms": busy / 1000,
        "idle_ms": idle / 1000,
        f"idle_in_gaps_over_{long_us:g}us_ms": long_idle / 1000,
        f"gaps_over_{long_us:g}us": long_count,
    }
