"""Runs wanfit.runtime.fused_elementwise's Triton kernels under Triton's interpreter and prints what
tests/test_fused_elementwise.py checks, as JSON. A process of its own: TRITON_INTERPRET must be set
before Triton is first imported."""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from wanfit.models.configs import WAN_TINY  # noqa: E402
from wanfit.models.dit import WanDiT, apply_rope, modulate, rope_frequencies  # noqa: E402
from wanfit.runtime import fused_elementwise as fe  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def layer_norm_cases() -> list:
    out = []
    for channels, dtype in ((64, "bfloat16"), (96, "float16"), (128, "float32"), (128, "bfloat16")):
        g = torch.Generator().manual_seed(channels)
        x = 3.0 * torch.randn(2, 37, channels, generator=g) + 0.5
        shift, _, scale = torch.randn(2, 3, channels, generator=g).unbind(1)  # strided rows, as unbind gives
        fp32 = modulate(F.layer_norm(x, (channels,), eps=1e-6), shift, scale)
        got = fe.layer_norm_modulate(x, shift, scale, 1e-6, DTYPES[dtype])
        out.append({
            "case": [channels, dtype],
            "dtype": str(got.dtype).removeprefix("torch."),
            "shape_ok": got.shape == x.shape,
            "max_abs_vs_fp32": (got.float() - fp32).abs().max().item(),
            "max_abs_vs_torch": (got.float() - fp32.to(DTYPES[dtype]).float()).abs().max().item(),
            "max_abs_fp32": fp32.abs().max().item(),
        })  # fmt: skip
    return out


def rope_reference(x, weight, rope, heads, eps=1e-6):
    """What SelfAttention does today for q (the torch path)."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).unflatten(-1, (heads, -1))
    return apply_rope(normed, rope)


def rope_cases() -> list:
    out = []
    for channels, heads, dtype in ((128, 2, "bfloat16"), (96, 2, "float16"), (64, 2, "float32")):
        g = torch.Generator().manual_seed(channels + 1)
        grid = (3, 5, 3)  # 45 tokens; the rows used below are a shard of them (as sequence parallelism has)
        rope = rope_frequencies(grid, channels // heads)[4:41]
        x = (2.0 * torch.randn(2, 37, channels, generator=g)).to(DTYPES[dtype])
        weight = (torch.rand(channels, generator=g) + 0.5).to(DTYPES[dtype])
        fp32 = rope_reference(x, weight, rope, heads)
        got = fe.rms_norm_rope(x, weight, rope, heads, 1e-6)
        unrotated = F.rms_norm(x.float(), (channels,), weight.float(), 1e-6).unflatten(-1, (heads, -1))
        out.append({
            "case": [channels, heads, dtype],
            "dtype": str(got.dtype).removeprefix("torch."),
            "shape": list(got.shape),
            "max_abs_vs_fp32": (got.float() - fp32).abs().max().item(),
            "max_abs_vs_torch": (got.float() - fp32.to(DTYPES[dtype]).float()).abs().max().item(),
            "max_abs_fp32": fp32.abs().max().item(),
            "rotation_matters": (fp32 - unrotated).abs().max().item(),
        })  # fmt: skip
    return out


def plain_cases() -> list:
    """The affine LayerNorm (norm3) and RMSNorm without RoPE (cross-attention's q), bf16 out."""
    g = torch.Generator().manual_seed(5)
    x = 3.0 * torch.randn(2, 37, 96, generator=g) + 0.5
    weight, bias = torch.rand(96, generator=g) + 0.5, torch.randn(96, generator=g)
    q = (2.0 * torch.randn(2, 37, 96, generator=g)).to(torch.bfloat16)
    runs = (
        ("layer_norm_affine", fe.layer_norm_affine(x, weight, bias, 1e-6, torch.bfloat16),
         F.layer_norm(x, (96,), weight, bias, 1e-6)),
        ("rms_norm", fe.rms_norm(q, weight.to(torch.bfloat16), 1e-6),
         F.rms_norm(q.float(), (96,), weight.to(torch.bfloat16).float(), 1e-6)),
    )  # fmt: skip
    return [
        {
            "case": [name, "bfloat16"],
            "dtype": str(got.dtype).removeprefix("torch."),
            "shape_ok": got.shape == want.shape,
            "max_abs_vs_fp32": (got.float() - want).abs().max().item(),
            "max_abs_fp32": want.abs().max().item(),
        }
        for name, got, want in runs
    ]


def whole_model() -> dict:
    """The tiny DiT's output with the blocks' slots set vs None, fp32 and bf16 weights."""
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        torch.manual_seed(0)
        model = WanDiT(WAN_TINY).to(dtype).eval()
        g = torch.Generator().manual_seed(1)
        x, t = torch.randn(1, 16, 3, 6, 10, generator=g), torch.tensor([700.0])
        context = torch.randn(1, 16, WAN_TINY.text_dim, generator=g)
        with torch.no_grad():
            torch_ops = model(x, t, context)
            fe.install(model.blocks)
            fused = model(x, t, context)
            fe.install(model.blocks, None)
            again = model(x, t, context)
        out[name] = {
            "rel_l2": ((fused - torch_ops).norm() / torch_ops.norm()).item(),
            "cleared_equal": bool(torch.equal(again, torch_ops)),
        }
    return out


if __name__ == "__main__":
    json.dump(
        {
            "layer_norm": layer_norm_cases(),
            "rope": rope_cases(),
            "plain": plain_cases(),
            "model": whole_model(),
            "smoke_test": fe.smoke_test("cpu"),
        },
        sys.stdout,
    )
