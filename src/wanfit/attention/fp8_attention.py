"""Lossy attention on FlashAttention-3's float8 e4m3 forward (Hopper's fp8 tensor cores).

FA3's fp8 kernel takes q, k and v in e4m3 with one fp32 "descale" per (batch, head) each, and
computes softmax(q k^T * scale * dq * dk) (v * dv) with P rounded to e4m3 inside the kernel. This
module makes those operands from bf16/fp16 tensors:
- K is smoothed first: its mean over the tokens is subtracted per (batch, head, channel). That adds
  the same value q·mean to every score of a query row, which softmax ignores, and it removes the
  common offset that would otherwise set the scale and eat e4m3's range (SageAttention's idea).
- Each of q, smoothed k and v is scaled so its largest magnitude per (batch, head) lands on 448
  (e4m3's largest finite value) and cast; the descale is that factor's inverse.

What is lossy: every q, k, v element rounded to e4m3 (3 mantissa bits, a relative step of 1/16 at
the most), and P rounded to e4m3 in the kernel. `reference` is the same quantised q, k, v through
exact fp32 attention: the kernel's result differs from it only by P's rounding and accumulation.
"""

from __future__ import annotations

import torch

from wanfit.precision import FP8_MAX, FP8_STORAGE_DTYPE

HEAD_DIMS = (64, 96, 128, 192, 256)  # FA3's fp8 forward head dims


def quantize_per_head(x: torch.Tensor, *, smooth: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> (e4m3 [B, L, H, D], descale [B, H] fp32) with x (minus its token mean when
    smooth) ~= e4m3 * descale.

    The product is taken in x's dtype (one pass, no fp32 copy): bf16 keeps 8 mantissa bits, e4m3 3.
    The factor is rounded to x's dtype first and the descale is that rounded factor's inverse, so the
    two agree exactly and the rounding only moves the largest value off 448 by a part in 256."""
    if smooth:
        x = x - x.mean(dim=1, keepdim=True, dtype=torch.float32).to(x.dtype)
    # One reading pass for the largest magnitude (the inf-norm over tokens and channels).
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=(1, 3), dtype=torch.float32)
    factor = (FP8_MAX / amax.clamp_min(1e-12)).clamp_max(torch.finfo(x.dtype).max).to(x.dtype)
    descale = 1.0 / factor.float()
    # Clamped: a product can round just past 448, and e4m3fn has no infinity.
    quantised = (x * factor[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_STORAGE_DTYPE)
    return quantised, descale


def quantize_qkv(q, k, v):
    """The kernel's operands: ((q8, k8, v8), (dq, dk, dv)), k smoothed."""
    (q8, dq), (k8, dk), (v8, dv) = quantize_per_head(q), quantize_per_head(k, smooth=True), quantize_per_head(v)
    return (q8, k8, v8), (dq, dk, dv)


def fp8_attention(q, k, v, *, scale: float | None = None, kernel) -> torch.Tensor:
    """Attention of q [B, Lq, H, D], k/v [B, Lk, H, D] through an FA3-style fp8 `kernel`
    (flash_attn_interface.flash_attn_func), in q's dtype."""
    (q8, k8, v8), (dq, dk, dv) = quantize_qkv(q, k, v)
    out = kernel(q8, k8, v8, softmax_scale=scale, q_descale=dq, k_descale=dk, v_descale=dv)
    out = out[0] if isinstance(out, tuple) else out  # some FA3 releases return (out, lse)
    return out.to(q.dtype)


def reference(q, k, v, *, scale: float | None = None, rows: int | None = None) -> torch.Tensor:
    """The quantised q, k, v dequantised and put through exact fp32 attention (no P rounding); of
    the first `rows` queries only, where given (q's scale still from all of them)."""
    (q8, k8, v8), descales = quantize_qkv(q, k, v)
    q8 = q8 if rows is None else q8[:, :rows]
    q32, k32, v32 = (t.float() * d[:, None, :, None] for t, d in zip((q8, k8, v8), descales, strict=True))
    out = torch.nn.functional.scaled_dot_product_attention(
        q32.transpose(1, 2), k32.transpose(1, 2), v32.transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2).to(q.dtype)
