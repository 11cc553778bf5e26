"""Precision policy: the dtype the math runs in (compute) and the dtype weights are kept in (storage).

bf16 compute on sm_80+; fp16 on cards with fast fp16 but no native bf16 (sm_70/75: the DiT keeps its
residual stream, norms, modulation, RoPE, time embedding and head in fp32 so fp16 stays safe); fp32
on a CPU. Storage is separate: weights are upcast per block to the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wanfit.errors import ConfigError
from wanfit.hardware.probe import HardwareProbe

# The one dtype table. Canonical names are torch's ("bfloat16"): the Plan, estimates and metadata use
# them. float64 is known only to read files (loaders compute in fp32 instead); users cannot pick it.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "float8_e5m2")
    if hasattr(torch, name)
}
FP8_DTYPES = tuple(d for d in DTYPES.values() if d.itemsize == 1)
# The fp8 form weights are stored in (quantize_fp8's; an fp8 file's matrices are kept only in it).
FP8_STORAGE_DTYPE = DTYPES.get("float8_e4m3fn")
# What users type -> the canonical name.
ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}
# safetensors header dtype names -> the canonical name.
SAFETENSORS_NAMES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
# Every name a user may give -> the canonical name.
_USER_NAMES = {
    **{n: n for n in DTYPES if n != "float64"},
    **{a: n for a, n in ALIASES.items() if n in DTYPES},
}

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn with one fp32 scale per tensor: t ~= q.float() * scale (the absmax maps to 448)."""
    scale = t.detach().abs().amax().float().clamp_min(1e-12) / FP8_MAX
    return (t.detach().float() / scale).to(FP8_STORAGE_DTYPE), scale


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """ "bf16", "float16", torch.float32, ... -> torch.dtype; ConfigError for anything else."""
    if isinstance(name, torch.dtype):
        return name
    key = name.strip().lower().removeprefix("torch.")
    if key not in _USER_NAMES:
        raise ConfigError(f"Unknown dtype {name!r}; use one of: {', '.join(sorted(_USER_NAMES))}.")
    return DTYPES[_USER_NAMES[key]]


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element: "bfloat16" (or "bf16", torch.bfloat16) -> 2."""
    return parse_dtype(dtype).itemsize


def parse_stored_dtype(stored: str) -> torch.dtype | None:
    """A tensor's dtype as a file states it ("BF16" in safetensors, "bfloat16" from a pickle), or
    None when it is no float dtype wanfit reads (integers, packed quantisations)."""
    return DTYPES.get(SAFETENSORS_NAMES.get(stored, stored))


def parse_weight_dtype(dtype: str | torch.dtype, what: str) -> torch.dtype:
    """A dtype a loader may keep weights in (bf16, fp16, fp32); ConfigError naming `what` otherwise."""
    parsed = parse_dtype(dtype)
    if parsed not in COMPUTE_DTYPES:
        raise ConfigError(f"{what} keeps weights in bf16, fp16 or fp32, not {dtype_name(parsed)}.")
    return parsed


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PrecisionPolicy:
    """Compute and storage dtypes, with notes on any user choice the card does not favour."""

    compute: torch.dtype
    storage: torch.dtype
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "compute": dtype_name(self.compute),
            "storage": dtype_name(self.storage),
            "notes": list(self.notes),
        }


def compute_dtype_for(device_type: str, bf16_native: bool, fp16_native: bool) -> torch.dtype:
    """The policy itself: bf16 where native, fp16 where fast, else fp32 (CPUs included)."""
    if device_type == "cpu":
        return torch.float32
    if bf16_native:
        return torch.bfloat16
    if fp16_native:
        return torch.float16
    return torch.float32


def default_compute_dtype(hw: HardwareProbe) -> torch.dtype:
    """compute_dtype_for this machine (or emulated card)."""
    return compute_dtype_for(hw.device_type, hw.bf16_native, hw.fp16_native)


def default_storage_dtype(hw: HardwareProbe, compute: torch.dtype) -> torch.dtype:
    # Checkpoints ship in bf16: keeping them so on a CPU halves the RAM of fp32 at no loss.
    return torch.bfloat16 if hw.device_type == "cpu" else compute


def precision_policy(
    hw: HardwareProbe, compute: str | torch.dtype | None = None, storage: str | torch.dtype | None = None
) -> PrecisionPolicy:
    """The policy for this machine; `compute`/`storage` override the defaults."""
    notes = []
    if compute is None:
        compute_dtype = default_compute_dtype(hw)
    else:
        compute_dtype = parse_dtype(compute)
        if compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"Compute dtype {dtype_name(compute_dtype)} is not supported; use bf16, fp16 or fp32."
            )
        if compute_dtype == torch.bfloat16 and not hw.bf16_native and hw.device_type != "cpu":
            notes.append(
                f"{hw.device_name} has no native bf16: matmuls run emulated (slow) and attention kernels "
                "may cast to fp16."
            )
        if compute_dtype != torch.float32 and hw.device_type == "cpu":
            notes.append(f"Compute in {dtype_name(compute_dtype)} on a CPU is slower than fp32 on most CPUs.")
    storage_dtype = default_storage_dtype(hw, compute_dtype) if storage is None else parse_dtype(storage)
    return PrecisionPolicy(compute=compute_dtype, storage=storage_dtype, notes=tuple(notes))
