"""The Plan: every device-dependent decision of a run, as data.

Made by the planner, printed by `wanfit plan`, stored with each output, overridable by flags.
Model code never reads it; the pipeline and the runtime do.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import torch

from wanfit.precision import parse_dtype


@dataclass(frozen=True)
class Plan:
    device: str = "cpu"
    compute_dtype: str = "float32"  # activations and matmuls of the DiT and VAE
    storage_dtype: str | None = (
        None  # weights at rest (None: same as compute; "float8_e4m3fn" upcast per block)
    )
    attention: str | None = None  # a forced backend name, or None: the dispatcher's choice
    text_encoder_device: str = "cpu"
    text_encoder_dtype: str = "float32"
    free_text_encoder: bool = True  # drop umT5 once the prompts are encoded
    dit_blocks_resident: int | None = None  # None: whole DiT on the device; k: stream blocks, k resident
    # None: the whole text encoder on text_encoder_device; k: stream its blocks onto the device, k resident
    text_encoder_blocks_resident: int | None = None
    offload_dit_before_decode: bool = False  # move the DiT off the device before the VAE decode
    cfg_batch: bool = True  # cond and uncond in one batch
    vae_tile: tuple[int, int] | None = None  # decode tile core in latent pixels (h, w), None: untiled; exact
    compile_dit: bool = False  # torch.compile the DiT's blocks (resident DiT on CUDA only)
    attention_chunk: int | None = None  # query rows per attention call, None: whole sequence
    ffn_chunk: int | None = None  # tokens per FFN call, None: whole sequence
    # (width, height, frames) when the planner had to lower the request (--allow-downscale only)
    output_size: tuple[int, int, int] | None = None

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return parse_dtype(self.compute_dtype)

    @property
    def torch_text_encoder_dtype(self) -> torch.dtype:
        return parse_dtype(self.text_encoder_dtype)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("vae_tile", "output_size"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for name in ("vae_tile", "output_size"):
            if d.get(name) is not None:
                d[name] = tuple(d[name])
        return cls(**d)


def default_plan(device: str | torch.device | None = None) -> Plan:
    """A simple plan without the planner: everything resident, dtypes by wanfit.precision's policy.

    `wanfit generate` and `wanfit plan` use the planner instead; this serves pipelines built in code.
    """
    from wanfit.precision import compute_dtype_for, dtype_name

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        compute = dtype_name(compute_dtype_for("cuda", bf16_native=major >= 8, fp16_native=major >= 7))
        # umT5 never computes in fp16: bf16 weights, computed in fp32 block by block where bf16 is not native.
        return Plan(
            device=str(device),
            compute_dtype=compute,
            text_encoder_device=str(device),
            text_encoder_dtype="bfloat16",
        )
    return Plan(device=str(device))
