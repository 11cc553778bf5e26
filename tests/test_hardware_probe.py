import dataclasses

import pytest
import torch

from wanfit.errors import ConfigError
from wanfit.hardware import PROFILES, apply_emulation_limits, arch_has_kernels, arch_warning, host_ram, probe
from wanfit.hardware.profiles import GIB

CUDA13_ARCHES = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("WANFIT_EMULATE", raising=False)


def test_real_probe_on_this_machine_is_a_cpu_with_its_ram():
    hw = probe()
    assert hw.device_type == "cpu" and hw.emulated is None and hw.device_present
    assert hw.compute_capability is None and hw.sm is None
    assert hw.host_ram_total and hw.host_ram_total > hw.host_ram_available > 0
    assert hw.total_memory == hw.host_ram_total
    assert hw.torch_version == torch.__version__
    assert {p.name for p in hw.kernel_packages} == {"flash_attn_4", "flash_attn", "flash_attn_3", "sageattention", "triton", "xformers"}


@pytest.mark.parametrize(
    "card, cc, gib, bf16",
    [("t4", (7, 5), 15.0, False), ("v100", (7, 0), 15.77, False), ("rtx2080ti", (7, 5), 10.75, False),
     ("rtx3060", (8, 6), 11.76, True), ("rtx4090", (8, 9), 23.6, True), ("a100", (8, 0), 79.2, True),
     ("h100", (9, 0), 79.1, True)],
)  # fmt: skip
def test_emulated_cards_report_their_capability_memory_and_dtypes(card, cc, gib, bf16):
    hw = probe(card)
    assert (hw.device_type, hw.compute_capability, hw.bf16_native, hw.fp16_native) == ("cuda", cc, bf16, True)
    assert hw.total_memory == pytest.approx(gib * GIB, rel=1e-6)
    assert hw.emulated == card and not hw.device_present  # no CUDA device here
    assert hw.physical_device_name == probe().device_name
    assert any("declared capabilities" in w for w in hw.warnings)


def test_emulation_comes_from_the_environment_too(monkeypatch):
    monkeypatch.setenv("WANFIT_EMULATE", "T4")
    assert probe().device_name == "Tesla T4"
    assert probe("cpu").device_type == "cpu"  # an explicit name wins


def test_colab_profile_also_emulates_the_small_host_ram():
    hw = probe("t4-colab")
    assert hw.host_ram_total == int(12.7e9)
    assert hw.host_ram_available <= hw.host_ram_total


def test_unknown_card_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError) as err:
        probe("x100")
    message = str(err.value)
    assert "'x100'" in message and all(name in message for name in ("t4", "v100", "h100", "cpu"))
    assert set(PROFILES) >= {"t4", "v100", "rtx2080ti", "rtx3060", "rtx4090", "a100", "h100", "cpu"}


def test_arch_list_check_knows_binary_and_ptx_compatibility():
    assert not arch_has_kernels((7, 0), CUDA13_ARCHES)  # V100 with a CUDA 13 build
    assert arch_has_kernels((7, 5), CUDA13_ARCHES)
    assert arch_has_kernels((8, 9), ("sm_80", "sm_86"))  # same major, newer minor
    assert not arch_has_kernels((8, 0), ("sm_86", "sm_90"))
    assert arch_has_kernels((12, 1), ("sm_90", "compute_90"))  # PTX is JIT-compiled for newer cards
    assert not arch_has_kernels((8, 0), ("sm_90a",))  # arch-specific cubins run only there


def test_v100_with_a_cuda13_build_is_told_what_to_install():
    hw = dataclasses.replace(probe("v100"), torch_arch_list=CUDA13_ARCHES, torch_cuda_version="13.0")
    warning = arch_warning(hw)
    assert warning is not None and "no kernels for sm_70" in warning and "cu126" in warning
    assert arch_warning(dataclasses.replace(hw, compute_capability=(7, 5))) is None
    assert arch_warning(probe("v100")) is None  # a CPU-only build says nothing about the card's build


def test_host_ram_reads_meminfo_and_falls_back(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  1000 kB\nMemAvailable:    8000000 kB\n")
    assert host_ram(str(meminfo)) == (16000000 * 1024, 8000000 * 1024)
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  1000 kB\n")
    assert host_ram(str(meminfo)) == (16000000 * 1024, 1000 * 1024)
    total, available = host_ram(str(tmp_path / "missing"))
    assert total and total > 0 and available is None


def test_memory_cap_is_applied_only_when_asked_and_matches_the_card(monkeypatch):
    calls = []
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 80 * GIB})()
    )
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i: calls.append((f, i)))
    t4 = probe("t4")
    assert calls == []  # probing never changes the process
    assert apply_emulation_limits(t4) is None  # no such device here: nothing to cap
    on_gpu = dataclasses.replace(t4, device_present=True, device_index=0)
    assert apply_emulation_limits(on_gpu) == pytest.approx(15 / 80)
    assert calls == [(pytest.approx(15 / 80), 0)]
    assert apply_emulation_limits(probe()) is None and len(calls) == 1
