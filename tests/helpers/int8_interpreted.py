"""Runs int8_triton's Triton kernels under Triton's interpreter and prints what tests/test_int8_attention.py
checks, as JSON. A process of its own: TRITON_INTERPRET must be set before Triton is first imported."""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from wanfit.attention import int8_attention as ia  # noqa: E402
from wanfit.attention.chunked import reference_attention  # noqa: E402

CASES = ((128, 128, 64), (150, 300, 64), (100, 70, 128))


def rel_l2(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def qkv(lq, lk, d, *, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, n, 2, d, generator=g).to(dtype) for n in (lq, lk, lk))


def exact(q, k, v, scale=None):
    return reference_attention(q.float(), k.float(), v.float(), scale=scale)


def quantisation() -> dict:
    q, k, v = qkv(150, 200, 64)
    got = ia.quantise(q, k, v, pv="fp16")
    tiles = ia.tile_config(64)
    q8, q_scale = ia._int8_blocks(q.transpose(1, 2).float() * ia._softmax_factor(64, None), tiles.block_m)
    kf = k.transpose(1, 2).float()
    k8, k_scale = ia._int8_blocks(kf - kf.mean(dim=2, keepdim=True), tiles.block_n)
    return {
        "dtype": str(got.q.dtype),
        "shape": list(got.q.shape),
        "max_step": max((got.q.float() - q8).abs().max().item(), (got.k.float() - k8).abs().max().item()),
        "mismatched": max(
            (got.q.float() != q8).float().mean().item(), (got.k.float() != k8).float().mean().item()
        ),
        "scale_rel": max(
            ((got.q_scale - q_scale).abs() / q_scale).max().item(),
            ((got.k_scale - k_scale).abs() / k_scale).max().item(),
        ),
        "padding_zero": bool((got.q[:, :, 150:] == 0).all()),
    }


def cases() -> list:
    out = []
    for lq, lk, d in CASES:
        q, k, v = qkv(lq, lk, d, seed=lq + lk)
        o = ia.int8_attention(q, k, v, pv="fp16")
        out.append({
            "case": [lq, lk, d],
            "shape_ok": o.shape == q.shape,
            "dtype_ok": o.dtype == q.dtype,
            "vs_reference": rel_l2(o, ia.int8_attention_reference(q, k, v, pv="fp16")),
            "vs_exact": rel_l2(o, exact(q, k, v)),
        })  # fmt: skip
    return out


def offset() -> dict:
    q, k, v = qkv(130, 190, 64, dtype=torch.float16, seed=3)
    k = k + 30.0
    truth = exact(q, k, v, scale=0.2)
    smoothed = ia.int8_attention(q, k, v, pv="fp16", scale=0.2)
    raw = ia.int8_attention(q, k, v, pv="fp16", scale=0.2, smooth_k=False)
    return {"dtype": str(smoothed.dtype), "smoothed": rel_l2(smoothed, truth), "raw": rel_l2(raw, truth)}


if __name__ == "__main__":
    json.dump({"quantisation": quantisation(), "cases": cases(), "offset": offset()}, sys.stdout)
