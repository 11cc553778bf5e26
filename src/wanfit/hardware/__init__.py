"""wanfit.hardware: what this machine is (probe) and the cards it can pretend to be (profiles)."""

from wanfit.hardware.probe import (
    EMULATE_ENV,
    HardwareProbe,
    KernelPackage,
    apply_emulation_limits,
    arch_has_kernels,
    arch_warning,
    host_ram,
    probe,
)
from wanfit.hardware.profiles import PROFILES, CardProfile, get_profile

__all__ = [
    "EMULATE_ENV",
    "PROFILES",
    "CardProfile",
    "HardwareProbe",
    "KernelPackage",
    "apply_emulation_limits",
    "arch_has_kernels",
    "arch_warning",
    "get_profile",
    "host_ram",
    "probe",
]
