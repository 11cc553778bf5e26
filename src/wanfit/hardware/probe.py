"""What this machine is: device, memory, native dtypes, the torch build and optional kernel packages.

`probe()` only looks; it never changes the process. Under emulation (`--emulate NAME` or
WANFIT_EMULATE) it reports the profile's card instead of the real one; `apply_emulation_limits()` is
the separate step, called by the runtime, that caps this process's GPU memory to match.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from wanfit.hardware.profiles import GIB, CardProfile, get_profile

EMULATE_ENV = "WANFIT_EMULATE"


@dataclass(frozen=True)
class KernelPackage:
    """An optional attention package: whether its module is installed and which version."""

    name: str  # what users call it
    module: str  # the top-level module to import
    installed: bool
    version: str | None


@dataclass(frozen=True)
class HardwareProbe:
    """A snapshot of the machine (or of the emulated card). Memory in bytes."""

    device_type: str  # "cuda" | "cpu" | "mps"
    device_name: str
    device_index: int | None
    compute_capability: tuple[int, int] | None
    total_memory: int  # device memory; the host's RAM on a CPU
    free_memory: int
    bf16_native: bool
    fp16_native: bool
    host_ram_total: int | None
    host_ram_available: int | None
    cpu_count: int
    torch_version: str
    torch_cuda_version: str | None
    torch_arch_list: tuple[str, ...]
    kernel_packages: tuple[KernelPackage, ...]
    # What torch's own checks allow for a small bf16/fp16 call of head dim 128 on the real CUDA
    # device; None where torch cannot be asked (CPU, MPS, an emulated card).
    sdpa_backends: tuple[tuple[str, bool], ...] | None
    emulated: str | None = None  # profile key
    device_present: bool = True  # False: the described device does not exist here (emulation)
    physical_device_name: str | None = None  # the real card under emulation
    physical_total_memory: int | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    # What host_ram_available is: MemAvailable, or what a cgroup's memory.max leaves (and that limit).
    host_ram_source: str = "MemAvailable"
    host_ram_limit: int | None = None
    # This process's own anonymous memory when probed: the host estimates count the whole process.
    process_rss: int | None = None
    # PYTORCH_CUDA_ALLOC_CONF as the user set it (None: unset): the planner leaves a set one alone.
    allocator_conf: str | None = None

    @property
    def sm(self) -> str | None:
        """The arch name, e.g. "sm_75"."""
        cc = self.compute_capability
        return None if cc is None else f"sm_{cc[0]}{cc[1]}"

    def package(self, name_or_module: str) -> KernelPackage | None:
        for p in self.kernel_packages:
            if name_or_module in (p.name, p.module):
                return p
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        d["sdpa_backends"] = dict(self.sdpa_backends) if self.sdpa_backends is not None else None
        d["torch_arch_list"] = list(self.torch_arch_list)
        d["kernel_packages"] = [asdict(p) for p in self.kernel_packages]
        d["warnings"] = list(self.warnings)
        d["sm"] = self.sm
        return d


def probe(emulate: str | None = None, device_index: int | None = None) -> HardwareProbe:
    """Probe the machine. `emulate` (or WANFIT_EMULATE when None) names a card to report instead."""
    if emulate is None:
        emulate = os.environ.get(EMULATE_ENV) or None
    profile = get_profile(emulate) if emulate else None
    real = _probe_real(device_index)
    return _emulate(real, profile) if profile else real


def apply_emulation_limits(hw: HardwareProbe) -> float | None:
    """Cap this process's GPU memory at the emulated card's size; returns the fraction set, or None.

    Called by the runtime (not by probe()), so looking at the machine never changes it.
    """
    if not hw.emulated or hw.device_type != "cuda" or not hw.device_present:
        return None
    index = hw.device_index or 0
    real_total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, hw.total_memory / real_total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


# --- the real machine ---------------------------------------------------------------------------


def _probe_real(device_index: int | None) -> HardwareProbe:
    host = host_memory()
    ram_total, ram_available = host.total, host.available
    common = dict(
        host_ram_total=ram_total,
        host_ram_available=ram_available,
        host_ram_source=host.source,
        host_ram_limit=host.limit,
        process_rss=process_rss(),
        allocator_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or None,
        cpu_count=os.cpu_count() or 1,
        torch_version=torch.__version__,
        torch_cuda_version=torch.version.cuda,
        torch_arch_list=_arch_list(),
        kernel_packages=find_kernel_packages(),
    )
    if torch.cuda.is_available():
        index = torch.cuda.current_device() if device_index is None else device_index
        props = torch.cuda.get_device_properties(index)
        cc = (props.major, props.minor)
        free, total = torch.cuda.mem_get_info(index)
        hw = HardwareProbe(
            device_type="cuda",
            device_name=props.name,
            device_index=index,
            compute_capability=cc,
            total_memory=total,
            free_memory=free,
            bf16_native=cc >= (8, 0),
            fp16_native=_fp16_native(cc),
            sdpa_backends=_sdpa_backends(index, torch.bfloat16 if cc >= (8, 0) else torch.float16),
            **common,
        )
    elif _mps_available():
        hw = HardwareProbe(
            device_type="mps",
            device_name="Apple MPS",
            device_index=0,
            compute_capability=None,
            total_memory=_mps_memory() or ram_total or 0,
            free_memory=_mps_memory() or ram_available or 0,
            bf16_native=_mps_bf16(),
            fp16_native=True,
            sdpa_backends=None,
            **common,
        )
    else:
        flags = _cpu_flags()
        hw = HardwareProbe(
            device_type="cpu",
            device_name=_cpu_name(),
            device_index=None,
            compute_capability=None,
            total_memory=ram_total or 0,
            free_memory=ram_available or ram_total or 0,
            bf16_native=bool(flags & {"avx512_bf16", "amx_bf16"}),
            fp16_native=bool(flags & {"avx512_fp16", "amx_fp16"}),
            sdpa_backends=None,
            **common,
        )
    return _with_warnings(hw)


def host_cpu(hw: HardwareProbe) -> HardwareProbe:
    """The machine's CPU as a device (a run with --device cpu on a GPU machine): host RAM is its memory."""
    if hw.device_type == "cpu" and not hw.emulated:
        return hw
    flags = _cpu_flags()
    ram = hw.host_ram_total or 0
    return HardwareProbe(
        **{
            **_fields(hw),
            "device_type": "cpu",
            "device_name": _cpu_name(),
            "device_index": None,
            "compute_capability": None,
            "total_memory": ram,
            "free_memory": hw.host_ram_available or ram,
            "bf16_native": bool(flags & {"avx512_bf16", "amx_bf16"}),
            "fp16_native": bool(flags & {"avx512_fp16", "amx_fp16"}),
            "sdpa_backends": None,
            "emulated": None,
            "device_present": True,
        }
    )


def _fp16_native(cc: tuple[int, int]) -> bool:
    # Fast fp16 arithmetic: tensor cores from Volta; P100 and Jetson TX1/TX2 have it at double rate.
    return cc >= (7, 0) or cc in ((5, 3), (6, 0), (6, 2))


def _arch_list() -> tuple[str, ...]:
    try:
        return tuple(torch.cuda.get_arch_list())
    except Exception:
        return ()


def arch_has_kernels(cc: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Whether a torch build for `arch_list` runs on a card of compute capability `cc`.

    Cubins run on the same major arch with an equal or newer minor; PTX (compute_XY) is compiled
    by the driver for any newer card.
    """
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        digits = "".join(ch for ch in num if ch.isdigit())
        if len(digits) < 2:
            continue
        major, minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and major == cc[0] and minor <= cc[1] and not num.endswith("a"):
            return True
        if kind == "sm" and num.endswith("a") and (major, minor) == cc:
            return True
        if kind == "compute" and (major, minor) <= cc:
            return True
    return False


def _suggested_wheel_index(cc: tuple[int, int]) -> str:
    # CUDA 12.8+ wheels dropped Maxwell, Pascal and Volta; Blackwell needs 12.8+.
    tag = "cu126" if cc < (7, 5) else "cu128"
    return f"pip install torch --index-url https://download.pytorch.org/whl/{tag}"


def arch_warning(hw: HardwareProbe) -> str | None:
    """A sentence when this torch build has no kernels for the (maybe emulated) card, else None.

    A CPU-only build (empty arch list) is not flagged: under emulation it says nothing about the
    build the real card would have.
    """
    cc = hw.compute_capability
    if hw.device_type != "cuda" or cc is None or not hw.torch_arch_list:
        return None
    if arch_has_kernels(cc, hw.torch_arch_list):
        return None
    return (
        f"This PyTorch {hw.torch_version} (CUDA {hw.torch_cuda_version}) has no kernels for "
        f"{hw.sm} ({hw.device_name}); it was built for {', '.join(hw.torch_arch_list)}. "
        f"Install a build that includes {hw.sm}, e.g. `{_suggested_wheel_index(cc)}`."
    )


def _with_warnings(hw: HardwareProbe, extra: tuple[str, ...] = ()) -> HardwareProbe:
    warning = arch_warning(hw)
    warnings = (*extra, warning) if warning else extra
    return HardwareProbe(**{**_fields(hw), "warnings": tuple(warnings)})


def _fields(hw: HardwareProbe) -> dict:
    return {f: getattr(hw, f) for f in hw.__dataclass_fields__}


def _sdpa_backends(index: int, dtype: torch.dtype) -> tuple[tuple[str, bool], ...] | None:
    """Ask torch which SDPA kernels it would use for a small call of head dim 128 on this card."""
    try:
        from torch.backends.cuda import (
            SDPAParams,
            can_use_cudnn_attention,
            can_use_efficient_attention,
            can_use_flash_attention,
        )

        q = torch.randn(1, 12, 64, 128, device=f"cuda:{index}", dtype=dtype)
        try:
            params = SDPAParams(q, q, q, None, 0.0, False, False)
        except TypeError:  # torch < 2.5 has no enable_gqa argument
            params = SDPAParams(q, q, q, None, 0.0, False)
        return (
            ("flash", bool(can_use_flash_attention(params))),
            ("efficient", bool(can_use_efficient_attention(params))),
            ("cudnn", bool(can_use_cudnn_attention(params))),
            ("math", bool(torch.backends.cuda.math_sdp_enabled())),
        )
    except Exception:
        return None


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _mps_memory() -> int | None:
    try:
        return int(torch.mps.recommended_max_memory())
    except Exception:
        return None


def _mps_bf16() -> bool:
    try:
        return bool(torch.backends.mps.is_macos_or_newer(14, 0))
    except Exception:
        return False


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_ram(meminfo_path: str = "/proc/meminfo") -> tuple[int | None, int | None]:
    """(total, available) host RAM in bytes; /proc/meminfo, else sysconf (total only), else None."""
    try:
        values = {}
        with open(meminfo_path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    values[key] = int(parts[0]) * 1024  # reported in kB
        if "MemTotal" in values:
            available = values.get("MemAvailable", values.get("MemFree"))
            return values["MemTotal"], available
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
    except (ValueError, OSError, AttributeError):
        return None, None


# A cgroup v1 "no limit" is the largest page-aligned int64; anything this large means none.
_NO_LIMIT = 1 << 60


@dataclass(frozen=True)
class CgroupMemory:
    """The memory limit of the cgroup this process runs in, and what the group uses (bytes)."""

    limit: int  # memory.max (v2) or memory.limit_in_bytes (v1)
    usage: int  # memory.current / memory.usage_in_bytes: the group's processes and its page cache
    reclaimable: int  # inactive file pages (memory.stat): page cache the kernel drops before it kills
    path: str  # the folder the numbers come from
    version: int

    @property
    def available(self) -> int:
        return max(0, self.limit - max(0, self.usage - self.reclaimable))


@dataclass(frozen=True)
class HostMemory:
    total: int | None
    available: int | None  # what this process may still use
    source: str  # how `available` was found, in words
    limit: int | None = None  # the cgroup's limit when it binds


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, *names: str) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    values = dict(line.split(None, 1) for line in lines if " " in line)
    for name in names:
        if values.get(name, "").strip().isdigit():
            return int(values[name])
    return 0


def _cgroup_mounts(proc: Path) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """((root, mount point) of the cgroup v2 hierarchy, the same of v1's memory controller)."""
    v2 = v1 = None
    try:
        lines = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 1:
            continue
        root, point = fields[3], fields[4].replace("\\040", " ")
        if tail[0] == "cgroup2" and v2 is None:
            v2 = (root, point)
        elif tail[0] == "cgroup" and len(tail) > 2 and "memory" in tail[2].split(",") and v1 is None:
            v1 = (root, point)
    return v2, v1


def _group_folders(mount: tuple[str, str], path: str) -> list[Path]:
    """The folders of `path` (from /proc/self/cgroup) and of its ancestors up to the mount point.

    Inside a container the group's path is often not visible under the mount: the mount point is
    then the group itself."""
    root, point = mount
    relative = path[len(root) :] if root != "/" and path.startswith(root) else path
    folder = Path(point) / relative.lstrip("/")
    if not folder.is_dir():
        return [Path(point)]
    folders = [folder]
    while folder != Path(point) and folder.parent != folder:
        folder = folder.parent
        folders.append(folder)
    return folders


def cgroup_memory(proc: str | os.PathLike = "/proc") -> CgroupMemory | None:
    """The tightest memory limit over this process's cgroup and its ancestors (v2 or v1), or None.

    `proc` is where to read self/cgroup and self/mountinfo (tests point it at fake files).
    """
    proc = Path(proc)
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    v2, v1 = _cgroup_mounts(proc)
    found: list[CgroupMemory] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and v2 is not None:
            for folder in _group_folders(v2, path):
                limit = _read_int(folder / "memory.max")  # "max" (no limit) reads as None
                usage = _read_int(folder / "memory.current")
                if limit is not None and usage is not None and limit < _NO_LIMIT:
                    reclaimable = _stat_value(folder / "memory.stat", "inactive_file")
                    found.append(CgroupMemory(limit, usage, reclaimable, str(folder), 2))
        elif "memory" in controllers.split(",") and v1 is not None:
            for folder in _group_folders(v1, path):
                limit = _read_int(folder / "memory.limit_in_bytes")
                usage = _read_int(folder / "memory.usage_in_bytes")
                if limit is not None and usage is not None and limit < _NO_LIMIT:
                    stat = folder / "memory.stat"
                    reclaimable = _stat_value(stat, "total_inactive_file", "inactive_file")
                    found.append(CgroupMemory(limit, usage, reclaimable, str(folder), 1))
    return min(found, key=lambda g: g.available, default=None)


def host_memory(meminfo_path: str = "/proc/meminfo", proc: str | os.PathLike = "/proc") -> HostMemory:
    """The host RAM this process may use: MemAvailable, or less when a cgroup's limit binds."""
    total, available = host_ram(meminfo_path)
    group = cgroup_memory(proc)
    if group is not None and (available is None or group.available < available):
        where = "memory.max" if group.version == 2 else "memory.limit_in_bytes"
        source = (
            f"cgroup {where} {group.limit / GIB:.2f} GiB minus the group's "
            f"{max(0, group.usage - group.reclaimable) / GIB:.2f} GiB in use"
        )
        return HostMemory(min(total or group.limit, group.limit), group.available, source, group.limit)
    return HostMemory(total, available, "MemAvailable" if available is not None else "unknown")


def process_rss(status_path: str = "/proc/self/status") -> int | None:
    """This process's resident anonymous memory (RssAnon), or None where it cannot be read."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def find_kernel_packages() -> tuple[KernelPackage, ...]:
    """Which optional attention packages (the attention registry's) are installed (find_spec; nothing
    heavy is imported)."""
    from wanfit.attention.backends import default_registry, namespace_only

    found = []
    for module, dists in default_registry().packages():
        name = dists[0].replace("-", "_")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        installed = spec is not None and not namespace_only(spec)
        version = None
        if installed:
            for dist in dists:
                try:
                    version = importlib.metadata.version(dist)
                    break
                except importlib.metadata.PackageNotFoundError:
                    continue
        found.append(KernelPackage(name=name, module=module, installed=installed, version=version))
    return tuple(found)


# --- emulation ----------------------------------------------------------------------------------


def _emulate(real: HardwareProbe, profile: CardProfile) -> HardwareProbe:
    notes = []
    host_total, host_available = real.host_ram_total, real.host_ram_available
    host_source = real.host_ram_source
    if profile.host_ram_gib is not None:
        host_total = int(profile.host_ram_gib * GIB)
        if host_available is None or host_total < host_available:
            host_available = host_total
            host_source = f"{profile.key}'s {host_total / GIB:.2f} GiB of RAM (emulated)"
    if profile.device_type == "cpu":
        total, free = host_total or 0, host_available or host_total or 0
        present = True
    else:
        total = profile.memory_bytes or 0
        present = real.device_type == "cuda"
        free = min(total, real.free_memory) if present else total
        if present:
            notes.append(
                f"Emulating {profile.name} on {real.device_name}: memory is capped at "
                f"{total / GIB:.1f} GiB and kernels and dtypes follow {profile.name}'s rules; speed is not emulated."
            )
        else:
            notes.append(
                f"Emulating {profile.name} without a CUDA device: selection follows {profile.name}'s "
                "declared capabilities; nothing runs on the card, so no kernel is smoke-tested or timed."
            )
    hw = HardwareProbe(
        **{
            **_fields(real),
            "device_type": profile.device_type,
            "device_name": profile.name,
            "device_index": real.device_index if present and profile.device_type == "cuda" else None,
            "compute_capability": profile.compute_capability,
            "total_memory": total,
            "free_memory": free,
            "bf16_native": profile.bf16_native,
            "fp16_native": profile.fp16_native,
            "host_ram_total": host_total,
            "host_ram_available": host_available,
            "host_ram_source": host_source,
            "sdpa_backends": None,
            "emulated": profile.key,
            "device_present": present,
            "physical_device_name": real.device_name,
            "physical_total_memory": real.total_memory,
        }
    )
    return _with_warnings(hw, tuple(notes))
