"""The FFN's runtime LoRA branches inside its GELU pass (Plan.lora_fused_ffn): one Triton kernel.

A block's FFN is ffn.2(GELU(ffn.0(h))). With a runtime branch on both Linears, composed of separate
GEMMs (wanfit.runtime.lora.LowRankBranch), three passes over the [tokens, ffn_dim] hidden tensor come
on top of the GELU's read and write: ffn.0's up-projection writes it, its base GEMM reads it back, and
ffn.2's down-projection reads the GELU's output again (587 MB each per block on the 1.3B at 480p).
This kernel takes ffn.0's base product y = h W0^T + b0 and, per block
of rows, in the one pass the GELU needs anyway:
    g  = GELU_tanh(y + h0 U0^T)     (h0 = h D0^T, the down-projection; U0: the up factor)  -> written
    h2 = g D2^T                     (ffn.2's down-projection, accumulated across ffn_dim)  -> returned
so the branch's extra traffic over the hidden tensor is gone; ffn.2 then runs y2 = b2 + h2 U2^T + g W2^T
as LowRankBranch does. fp32 inside; g and h2 are rounded to the activations' dtype, as the separate
GEMMs round theirs.

Measured (H200, 2026-12-03, docs/benchmarks.md): one 1.3B FFN at 32,760 tokens, rank 64, took 2.99-3.03
ms against the separate GEMMs' 3.18-3.20 ms (no LoRA: 2.59-2.66 ms); a 14B FFN 14.31 against 14.29 ms.
The kernel runs at about half its memory bound (its two small dots per tile are not hidden under the
loads), and over whole forwards the difference stayed within the run-to-run noise: off unless set.

`gelu_low_rank(hidden, h0, up0, down2, in_place)`: the kernel on CUDA (Triton), the same math in torch ops
elsewhere; g over hidden (in place, Plan.ffn_gelu_in_place) or in a new tensor. Traced by
torch.compile it runs as opaque ops (in place: one that mutates `hidden`).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

from wanfit.errors import one_line

# Stacked LoRA ranks up to this run in the kernel (the factors' tiles live in registers); larger sets
# take the separate GEMMs.
MAX_RANK = 256

try:  # Triton is optional (CI and CPU installs have none): the torch ops run instead
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None


def _padded(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


if triton is not None:

    @triton.jit
    def _gelu_low_rank_kernel(
        hidden_ptr, out_ptr, h0_ptr, up_ptr, down_ptr, h2_ptr, rows, width, rank0, rank2,
        BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, R0: tl.constexpr, R2: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_M rows, walking ffn_dim in BLOCK_F columns; R0/R2: the ranks padded to
        # powers of two (masked), so the dots have the 16-wide tiles they need.
        rows_at = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows_at < rows
        r0 = tl.arange(0, R0)
        r2 = tl.arange(0, R2)
        h0 = tl.load(
            h0_ptr + rows_at[:, None] * rank0 + r0[None, :],
            mask=row_ok[:, None] & (r0[None, :] < rank0), other=0.0,
        )  # fmt: skip
        acc = tl.zeros((BLOCK_M, R2), dtype=tl.float32)
        for start in range(0, width, BLOCK_F):
            cols = start + tl.arange(0, BLOCK_F)
            col_ok = cols < width
            tile = row_ok[:, None] & col_ok[None, :]
            at = rows_at[:, None] * width + cols[None, :]
            # U0 is [width, rank0] row-major: its transposed tile [R0, BLOCK_F].
            up_t = tl.load(up_ptr + cols[None, :] * rank0 + r0[:, None],
                           mask=(r0[:, None] < rank0) & col_ok[None, :], other=0.0)  # fmt: skip
            y = tl.load(hidden_ptr + at, mask=tile, other=0.0).to(tl.float32) + tl.dot(h0, up_t)
            # GELU, tanh form: 0.5 y (1 + tanh(z)) = y sigmoid(2z), z = sqrt(2/pi) (y + 0.044715 y^3).
            z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            g = (y * tl.sigmoid(2.0 * z)).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + at, g, mask=tile)
            # D2 is [rank2, width] row-major: its transposed tile [BLOCK_F, R2].
            down_t = tl.load(down_ptr + r2[None, :] * width + cols[:, None],
                             mask=col_ok[:, None] & (r2[None, :] < rank2), other=0.0)  # fmt: skip
            acc += tl.dot(g, down_t)
        tl.store(
            h2_ptr + rows_at[:, None] * rank2 + r2[None, :],
            acc.to(h2_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (r2[None, :] < rank2),
        )


# (rows per program, columns per step, warps, pipeline stages): the fastest of the first 1.3B sweep on an
# H200 (benchmarks/bench_lora.py --ffn-tiles); later sweeps ranked others first, within 0.1 ms.
TILES = (64, 32, 4, 3)


def gelu_low_rank_triton(
    hidden: torch.Tensor,
    h0: torch.Tensor,
    up0: torch.Tensor,
    down2: torch.Tensor,
    out: torch.Tensor,
    tiles: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """The kernel: writes GELU(hidden + h0 up0^T) into `out` (hidden itself or a tensor like it) and
    returns h2 = out down2^T. hidden, out [..., F] contiguous; h0 [..., R0]; up0 [F, R0]; down2 [R2, F];
    tiles: (rows per program, columns per step, warps, stages), default TILES."""
    block_m, block_f, warps, stages = tiles or TILES
    width, rank0, rank2 = hidden.shape[-1], up0.shape[1], down2.shape[0]
    rows = hidden.numel() // width
    h0 = h0.reshape(rows, rank0).contiguous()
    h2 = torch.empty(*hidden.shape[:-1], rank2, device=hidden.device, dtype=hidden.dtype)
    grid = (triton.cdiv(rows, block_m),)
    with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():
        _gelu_low_rank_kernel[grid](
            hidden, out, h0, up0.contiguous(), down2.contiguous(), h2, rows, width, rank0, rank2,
            BLOCK_M=block_m, BLOCK_F=block_f, R0=_padded(rank0), R2=_padded(rank2),
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return h2


def gelu_low_rank_torch(
    hidden: torch.Tensor, h0: torch.Tensor, up0: torch.Tensor, down2: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """The kernel's math in torch ops (CPU, and where Triton is absent): fp32 inside, rounded as it rounds."""
    g = F.gelu(hidden.float() + F.linear(h0.float(), up0.float()), approximate="tanh").to(hidden.dtype)
    out.copy_(g)
    return F.linear(out.float(), down2.float()).to(hidden.dtype)


# Triton's interpreter (tests: TRITON_INTERPRET=1, set before Triton is imported) runs it on the CPU.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_runs(hidden: torch.Tensor) -> bool:
    return triton is not None and (hidden.is_cuda or _INTERPRETED)


def _gelu_low_rank(hidden, h0, up0, down2, out):
    run = gelu_low_rank_triton if _kernel_runs(hidden) else gelu_low_rank_torch
    return run(hidden, h0, up0, down2, out)


@torch.library.custom_op("wanfit::gelu_low_rank_", mutates_args=("hidden",))
def _gelu_low_rank_in_place_op(
    hidden: torch.Tensor, h0: torch.Tensor, up0: torch.Tensor, down2: torch.Tensor
) -> torch.Tensor:
    return _gelu_low_rank(hidden, h0, up0, down2, hidden)


@_gelu_low_rank_in_place_op.register_fake
def _(hidden, h0, up0, down2):
    return hidden.new_empty(*hidden.shape[:-1], down2.shape[0])


@torch.library.custom_op("wanfit::gelu_low_rank", mutates_args=())
def _gelu_low_rank_op(
    hidden: torch.Tensor, h0: torch.Tensor, up0: torch.Tensor, down2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(hidden)
    return out, _gelu_low_rank(hidden, h0, up0, down2, out)


@_gelu_low_rank_op.register_fake
def _(hidden, h0, up0, down2):
    return torch.empty_like(hidden), hidden.new_empty(*hidden.shape[:-1], down2.shape[0])


def gelu_low_rank(
    hidden: torch.Tensor, h0: torch.Tensor, up0: torch.Tensor, down2: torch.Tensor, in_place: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, h2): g = GELU_tanh(hidden + h0 up0^T), over hidden when in_place; h2 = g down2^T."""
    if torch.compiler.is_compiling():
        if in_place:
            return hidden, _gelu_low_rank_in_place_op(hidden, h0, up0, down2)
        return _gelu_low_rank_op(hidden, h0, up0, down2)
    out = hidden if in_place else torch.empty_like(hidden)
    return out, _gelu_low_rank(hidden, h0, up0, down2, out)


@functools.cache
def smoke_test(device: str) -> str | None:
    """None when the kernel on `device` matches the torch ops on small inputs (once per process);
    else what went wrong."""
    if triton is None:
        return "the fused LoRA FFN kernel needs Triton, which is not installed"
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 96, generator=gen).to(torch.bfloat16)
    h0 = torch.randn(2, 37, 8, generator=gen).to(torch.bfloat16)
    up0 = (0.1 * torch.randn(96, 8, generator=gen)).to(torch.bfloat16)
    down2 = (0.1 * torch.randn(24, 96, generator=gen)).to(torch.bfloat16)
    want_g = hidden.clone()
    want_h2 = gelu_low_rank_torch(hidden, h0, up0, down2, want_g)
    try:
        with torch.no_grad():
            args = [t.to(device) for t in (hidden, h0, up0, down2)]
            got_g = torch.empty_like(args[0])
            got_h2 = gelu_low_rank_triton(*args, got_g)
            got_g, got_h2 = got_g.cpu().float(), got_h2.cpu().float()
    except Exception as err:  # noqa: BLE001 - any failure means: do not use the kernel
        return one_line(err)
    g_err = (got_g - want_g.float()).abs().max().item()
    h2_err = (got_h2 - want_h2.float()).abs().max().item() / max(want_h2.float().abs().max().item(), 1e-6)
    if not (g_err <= 0.05 and h2_err <= 0.02):
        return f"its output differs from the torch ops (GELU max {g_err:.3g}, down-projection {h2_err:.3g} relative)"
    return None
