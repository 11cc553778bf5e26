"""Runs flash_attn3_fp8's quantisation kernels (wanfit.attention.fp8_kernels) under Triton's interpreter
and prints what tests/test_fp8_attention.py checks against the plain-torch path, as JSON. A process of
its own: TRITON_INTERPRET must be set before Triton is first imported."""

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from wanfit.attention.fp8_attention import channel_stats, quantize_per_head  # noqa: E402


def main() -> dict:
    g = torch.Generator().manual_seed(0)
    # 300 tokens: two whole blocks of 128 and a tail; strided as the DiT's q comes ([B, H, L, D] storage).
    x = torch.randn(2, 3, 300, 64, generator=g).to(torch.bfloat16).transpose(1, 2)
    x = x + (3.0 * torch.randn(64, generator=g)).to(torch.bfloat16)  # a channel offset, for smoothing
    out = {}
    for name, a, b in zip(("mean", "min", "max"), channel_stats(x, kernels=True), channel_stats(x, kernels=False)):
        out[f"{name}_max_diff"] = (a - b).abs().max().item()
    for smooth in (False, True):
        (q_kernel, d_kernel), (q_torch, d_torch) = (
            quantize_per_head(x, smooth=smooth, kernels=k) for k in (True, False)
        )
        tag = "smooth" if smooth else "plain"
        out[f"{tag}_dtype"] = str(q_kernel.dtype)
        out[f"{tag}_contiguous"] = q_kernel.is_contiguous() and list(q_kernel.shape) == list(x.shape)
        out[f"{tag}_descale_rel"] = ((d_kernel - d_torch).abs() / d_torch).max().item()
        # The interpreter's fp8 cast is not the GPU's (it can drop a carry into the next binade, and
        # it rounds some ties the other way): the elements where the two paths differ must be few,
        # each within one e4m3 step of the torch value or such a carry (half of it).
        a, b = q_kernel.float(), q_torch.float()
        differ = a != b
        step = torch.exp2(torch.floor(torch.log2(b[differ].abs().clamp_min(2.0**-6))) - 3)
        near = ((a[differ] - b[differ]).abs() <= step) | (a[differ] * 2 == b[differ])
        out[f"{tag}_mismatched"] = differ.float().mean().item()
        out[f"{tag}_mismatches_within_a_step"] = bool(near.all())
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
