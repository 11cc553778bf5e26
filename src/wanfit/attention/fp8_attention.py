"""Lossy attention on FlashAttention-3's float8 e4m3 forward (Hopper's fp8 tensor cores).

FA3's fp8 kernel takes q, k and v in e4m3 with one fp32 "descale" per (batch, head) each, and
computes softmax(q k^T * scale * dq * dk) (v * dv) with P rounded to e4m3 inside the kernel. This
module makes those operands from bf16/fp16 tensors:
- K is smoothed first: its mean over the tokens is subtracted per (batch, head, channel). That adds
  the same value q·mean to every score of a query row, which softmax ignores, and it removes the
  common offset that would otherwise set the scale and eat e4m3's range (SageAttention's idea).
- Each of q, smoothed k and v is scaled so its largest magnitude per (batch, head) lands on 448
  (e4m3's largest finite value) and cast; the descale is that factor's inverse. On CUDA two small
  Triton kernels do it (wanfit.attention.fp8_kernels: one reading pass for the channel statistics,
  one for the cast); elsewhere, and at head dims that are no power of two, plain torch.

What is lossy: every q, k, v element rounded to e4m3 (3 mantissa bits, a relative step of 1/16 at
the most), and P rounded to e4m3 in the kernel. `reference` is the same quantised q, k, v through
exact fp32 attention: the kernel's result differs from it only by P's rounding and accumulation.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from wanfit.precision import FP8_MAX, FP8_STORAGE_DTYPE

HEAD_DIMS = (64, 96, 128, 192, 256)  # FA3's fp8 forward head dims
BLOCK = 128  # tokens per program of the Triton kernels


@functools.cache
def _triton_kernels():
    """wanfit.attention.fp8_kernels, or None without Triton (imported on first use)."""
    if importlib.util.find_spec("triton") is None:
        return None
    from wanfit.attention import fp8_kernels

    return fp8_kernels


def _uses_kernels(x: torch.Tensor) -> bool:
    """The Triton kernels run on CUDA at power-of-two head dims (64, 128, 256); else plain torch."""
    d = x.shape[-1]
    return x.is_cuda and d & (d - 1) == 0 and _triton_kernels() is not None


def channel_stats(
    x: torch.Tensor, *, kernels: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each (batch, head, channel)'s mean, min and max over the tokens of x [B, L, H, D], fp32 [B, H, D]:
    one reading pass in the kernel (per-block partials, then a small reduction). kernels: None
    decides by the tensor (_uses_kernels); True runs the Triton kernels (under its interpreter on
    the CPU), False plain torch."""
    b, n, h, d = x.shape
    if not (_uses_kernels(x) if kernels is None else kernels):
        xf = x.float()
        return xf.mean(dim=1), xf.amin(dim=1), xf.amax(dim=1)
    blocks = -(-n // BLOCK)
    sums, mins, maxs = (torch.empty(b * h, blocks, d, dtype=torch.float32, device=x.device) for _ in range(3))
    _triton_kernels().channel_stats[(blocks, b * h)](
        x, sums, mins, maxs, *x.stride(), h, n, blocks, BLOCK=BLOCK, HEAD_DIM=d
    )
    return (sums.sum(dim=1) / n).view(b, h, d), mins.amin(dim=1).view(b, h, d), maxs.amax(dim=1).view(b, h, d)


def quantize_per_head(
    x: torch.Tensor, *, smooth: bool = False, kernels: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> (e4m3 [B, L, H, D] contiguous, descale [B, H] fp32) with x (minus its token
    mean per channel when smooth) ~= e4m3 * descale, in fp32 arithmetic. Two reading passes on CUDA:
    the channel statistics (the smoothed range follows from each channel's min, max and mean), then
    the quantisation. kernels: as channel_stats takes it."""
    b, n, h, d = x.shape
    kernels = _uses_kernels(x) if kernels is None else kernels
    mean, low, high = channel_stats(x, kernels=kernels)
    if smooth:
        amax = torch.maximum(high - mean, mean - low).amax(dim=-1)
    else:
        amax = torch.maximum(high, -low).amax(dim=-1)
    factor = FP8_MAX / amax.clamp_min(1e-12)  # [B, H]
    descale = 1.0 / factor
    if not kernels:
        shifted = x.float() - mean[:, None] if smooth else x.float()
        # Clamped: a value can round just past 448, and e4m3fn has no infinity.
        quantised = (shifted * factor[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_STORAGE_DTYPE)
        return quantised, descale
    quantised = torch.empty(b, n, h, d, dtype=FP8_STORAGE_DTYPE, device=x.device)
    blocks = -(-n // BLOCK)
    _triton_kernels().quantize[(blocks, b * h)](
        x, mean.contiguous(), factor.contiguous(), quantised, *x.stride(), h, n,
        BLOCK=BLOCK, HEAD_DIM=d, SMOOTH=smooth,
    )  # fmt: skip
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
