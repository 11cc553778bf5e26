"""Emulated machines with a fixed host RAM, so plans do not depend on the machine running the tests."""

from dataclasses import replace

from wanfit.hardware.probe import probe

GIB = 1024**3


def emulated(card: str, host_gib: float = 64.0):
    """The probe of `card` (wanfit.hardware.profiles) on a machine with `host_gib` of free RAM."""
    hw = probe(emulate=card)
    host = int(host_gib * GIB)
    if hw.device_type == "cpu":
        hw = replace(hw, total_memory=host, free_memory=host)
    return replace(hw, host_ram_total=host, host_ram_available=host, process_rss=0)
