"""Cards wanfit can emulate (`--emulate NAME`, `WANFIT_EMULATE`).

A profile states what the probe would report on that card: compute capability, usable memory (about
what torch reports as total), native dtypes. Speed is not emulated.
"""

from __future__ import annotations

from dataclasses import dataclass

from wanfit.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class CardProfile:
    """One emulated machine."""

    key: str
    name: str
    device_type: str  # "cuda" or "cpu"
    compute_capability: tuple[int, int] | None
    memory_gib: float | None  # device memory; None for a CPU (the host's RAM is used)
    bf16_native: bool
    fp16_native: bool
    host_ram_gib: float | None = None  # None: keep the real host's RAM
    # Dense fp16/bf16 tensor-core TFLOP/s with fp32 accumulation, from the vendor's spec sheet: the
    # time estimates' speed for this card (None: a CPU, whose speed is measured instead).
    tflops: float | None = None

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory_gib is None else int(self.memory_gib * GIB)


def _cuda(
    key: str, name: str, cc: tuple[int, int], gib: float, tflops: float, host_ram_gib: float | None = None
) -> CardProfile:
    return CardProfile(
        key=key,
        name=name,
        device_type="cuda",
        compute_capability=cc,
        memory_gib=gib,
        bf16_native=cc >= (8, 0),
        fp16_native=True,
        host_ram_gib=host_ram_gib,
        tflops=tflops,
    )


PROFILES: dict[str, CardProfile] = {
    p.key: p
    for p in (
        _cuda("t4", "Tesla T4", (7, 5), 15.0, 65),
        # The Colab free tier: a T4 next to 12.7 GB of host RAM, less than the text encoder in bf16.
        _cuda("t4-colab", "Tesla T4", (7, 5), 15.0, 65, host_ram_gib=12.7e9 / GIB),
        _cuda("v100", "Tesla V100-SXM2-16GB", (7, 0), 15.77, 125),
        _cuda("v100-32gb", "Tesla V100-SXM2-32GB", (7, 0), 31.74, 125),
        _cuda("rtx2080ti", "NVIDIA GeForce RTX 2080 Ti", (7, 5), 10.75, 57),
        _cuda("rtx3060", "NVIDIA GeForce RTX 3060", (8, 6), 11.76, 25.6),
        _cuda("rtx3060-laptop", "NVIDIA GeForce RTX 3060 Laptop GPU", (8, 6), 5.8, 21.8),
        _cuda("rtx4090", "NVIDIA GeForce RTX 4090", (8, 9), 23.6, 165),
        _cuda("a10g", "NVIDIA A10G", (8, 6), 22.1, 70),
        _cuda("l4", "NVIDIA L4", (8, 9), 22.2, 121),
        _cuda("a100-40gb", "NVIDIA A100-SXM4-40GB", (8, 0), 39.4, 312),
        _cuda("a100", "NVIDIA A100-SXM4-80GB", (8, 0), 79.2, 312),
        _cuda("h100", "NVIDIA H100 80GB HBM3", (9, 0), 79.1, 989),
        _cuda("h200", "NVIDIA H200", (9, 0), 139.8, 989),
        CardProfile("cpu", "CPU", "cpu", None, None, bf16_native=False, fp16_native=False),
    )
}


def profile_for_device(name: str) -> CardProfile | None:
    """The profile whose card name matches a real device's name (e.g. for its spec-sheet speed)."""
    matches = [p for p in PROFILES.values() if p.device_type == "cuda" and p.name.lower() in name.lower()]
    return max(matches, key=lambda p: len(p.name), default=None)


def get_profile(name: str) -> CardProfile:
    """The profile called `name` (case-insensitive); ConfigError listing the valid names otherwise."""
    key = name.strip().lower().replace("_", "-")
    if key not in PROFILES:
        raise ConfigError(f"Unknown card to emulate {name!r}; choose one of: {', '.join(sorted(PROFILES))}.")
    return PROFILES[key]
