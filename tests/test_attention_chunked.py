"""Chunked attention is exact: it matches SDPA's math path to 1e-5 in fp32 at any chunking."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wanfit.attention import chunk_sizes, chunked_attention, reference_attention


def _math(q, k, v, scale=None, attn_mask=None):
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
        )
    return out.transpose(1, 2)


def _qkv(b, lq, lk, h, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, h, d, generator=g) * 2 for n in (lq, lk, lk))


@pytest.mark.parametrize(
    "b, lq, lk, h, d", [(1, 97, 97, 2, 16), (2, 33, 131, 3, 8), (1, 129, 7, 1, 24), (2, 1, 65, 2, 4)]
)
@pytest.mark.parametrize("q_chunk, kv_chunk", [(13, 1), (1, 9), (7, 13), (None, 5), (1000, 1000)])
def test_chunked_matches_sdpa_math(b, lq, lk, h, d, q_chunk, kv_chunk):
    q, k, v = _qkv(b, lq, lk, h, d)
    out = chunked_attention(q, k, v, q_chunk=q_chunk, kv_chunk=kv_chunk)
    assert out.shape == (b, lq, h, d) and out.dtype == q.dtype
    torch.testing.assert_close(out, _math(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_chunk", [3, 16, None])
def test_chunked_with_masks_and_scale(kv_chunk):
    q, k, v = _qkv(2, 45, 38, 2, 8, seed=1)
    g = torch.Generator().manual_seed(2)
    keep = torch.rand(2, 1, 45, 38, generator=g) > 0.4
    keep[..., 5] = True  # no fully masked rows
    bias = torch.randn(1, 2, 45, 38, generator=g)
    for mask in (keep, bias, keep[0, 0]):
        out = chunked_attention(q, k, v, scale=0.3, attn_mask=mask, q_chunk=10, kv_chunk=kv_chunk)
        torch.testing.assert_close(out, _math(q, k, v, scale=0.3, attn_mask=mask), atol=1e-5, rtol=1e-5)


def test_chunked_on_an_inner_kernel_splits_queries():
    q, k, v = _qkv(1, 101, 40, 2, 8)
    seen = []

    def inner(q, k, v, *, scale=None, attn_mask=None):
        seen.append(q.shape[1])
        return _math(q, k, v, scale=scale, attn_mask=attn_mask)

    out = chunked_attention(q, k, v, inner=inner, q_chunk=32)
    assert seen == [32, 32, 32, 5]
    torch.testing.assert_close(out, _math(q, k, v), atol=1e-5, rtol=1e-5)


def test_chunked_keeps_low_precision_inputs_close_to_the_fp32_answer():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(1, 70, 50, 2, 16))
    out = chunked_attention(q, k, v, q_chunk=16, kv_chunk=16)
    assert out.dtype == torch.bfloat16
    ref = reference_attention(q.float(), k.float(), v.float())
    assert (out.float() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("budget_mib", [1, 16, 256])
def test_chunk_sizes_keep_the_score_block_within_budget(budget_mib):
    budget = budget_mib * 1024**2
    for b, h, lq, lk in [(1, 12, 32760, 32760), (2, 40, 32760, 512), (1, 1, 10, 10)]:
        qc, kc = chunk_sizes(b, h, lq, lk, budget)
        assert 1 <= qc <= lq and 1 <= kc <= lk
        assert b * h * qc * kc * 4 * 2 <= max(budget, b * h * 4 * 2)
    assert chunk_sizes(1, 12, 32760, 32760, 256 * 1024**2) == (85, 32760)  # whole key rows fit
    assert chunk_sizes(1, 12, 32760, 32760, 1024**2)[0] == 64  # else 64 query rows walk key blocks


def test_reference_matches_sdpa():
    q, k, v = _qkv(2, 19, 23, 2, 8)
    torch.testing.assert_close(reference_attention(q, k, v), _math(q, k, v), atol=1e-5, rtol=1e-5)
