"""The fast tier's fp8 GEMMs: the DiT blocks' linears in float8 e4m3 with per-row scales (lossy).

y = (x / s_x) (W / s_w)^T * s_x s_w^T + b, with one fp32 scale per activation row (s_x, [M, 1]) and
one per output channel of the weight (s_w, [1, N]), each the row's largest magnitude over 448 (the
largest finite e4m3 value). The weights are quantised once, when the placement puts the fast tier in
place; the activations at every call. The product runs on the fp8 tensor cores through
`torch._scaled_mm` (sm_89 and newer) with fp32 accumulation and a bf16 result. Under torch.compile
(the fast tier compiles the blocks) Inductor fuses each activation's quantisation into the op that
produced it; eagerly it is five extra passes per linear, which cost more than the GEMM saves.

`emulated_scaled_mm` is the same arithmetic in fp32 on any device: the tests' reference, and the
statement of what the kernel computes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from wanfit.precision import FP8_MAX
from wanfit.runtime.offload import FP8

MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have fp8 tensor cores
PADDED_ROW_MULTIPLE = 16  # the row counts tried when a kernel refuses others (probe_kernel)
SMOKE_TOLERANCE = 0.1  # relative L2 error of one fp8 GEMM on unit-scale random data (~0.03 expected)


def fp8_gemm_reason(hw) -> str | None:
    """Why the fast tier cannot run on the probed device (None: it can, by declarations)."""
    what = (
        "the fast tier (fp8 GEMMs) needs a CUDA GPU with fp8 tensor cores (compute capability 8.9 or newer)"
    )
    if hw.device_type != "cuda":
        return f"{what}; this machine runs on the {hw.device_type.upper() if hw.device_type != 'cpu' else 'CPU'}."
    cc = hw.compute_capability
    if cc is None or tuple(cc) < MIN_CAPABILITY:
        sm = f"sm_{cc[0]}{cc[1]}" if cc else "of unknown compute capability"
        return f"{what}; the {hw.device_name} is {sm}."
    if FP8 is None or not hasattr(torch, "_scaled_mm"):
        return f"{what} and a PyTorch with torch._scaled_mm; this PyTorch {torch.__version__} has none."
    return None


def fast_tier_status(hw, compute: torch.dtype) -> tuple[str | None, str | None]:
    """(why this card or dtype cannot have the fast tier, why its kernel failed its smoke test on the
    real device): both None when it runs here; a card emulated and absent is judged by declarations."""
    reason = fp8_gemm_reason(hw)
    if reason is None and compute != torch.bfloat16:
        reason = f"the fast tier computes in bfloat16, and this run computes in {str(compute).removeprefix('torch.')}."
    if reason is not None or not hw.device_present:
        return reason, None
    return None, smoke_test(f"cuda:{hw.device_index or 0}")


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 with one scale per row (the last dim is the row): t ~= q.float() * scale, scale [..., 1] fp32.

    The clamp keeps a value that rounds just past 448 finite (e4m3fn has no infinity)."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    q = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def emulated_scaled_mm(
    q_x: torch.Tensor, scale_x: torch.Tensor, q_w_t: torch.Tensor, scale_w: torch.Tensor, out_dtype
) -> torch.Tensor:
    """What `torch._scaled_mm` computes, in fp32: (q_x * s_x) @ (q_w_t * s_w), rounded to out_dtype."""
    return ((q_x.float() * scale_x) @ (q_w_t.float() * scale_w)).to(out_dtype)


def _scaled_mm(q_x, scale_x, q_w_t, scale_w, out_dtype) -> torch.Tensor:
    # Fast accumulation: Hopper's fp8 MMA accumulates in reduced precision between the fp32
    # promotions; its error is far below the quantisation's (DESIGN.md: 3.7e-2 per GEMM overall).
    return torch._scaled_mm(
        q_x, q_w_t, scale_a=scale_x, scale_b=scale_w, out_dtype=out_dtype, use_fast_accum=True
    )


MATMULS = {"scaled_mm": _scaled_mm, "emulated": emulated_scaled_mm}


class Fp8Gemm:
    """One Linear's product in fp8: holds the quantised weight; `gemm(x)` -> x W^T + b in out_dtype.

    row_multiple: pad the activation rows to a multiple of this (zero rows, sliced off the result)
    for a kernel that takes only such counts (the smoke test finds out; 1: no padding)."""

    def __init__(
        self,
        layer: nn.Linear,
        *,
        matmul: str = "scaled_mm",
        out_dtype: torch.dtype | None = None,
        row_multiple: int = 1,
    ):
        weight = layer.weight.detach()
        q_w, scale_w = quantize_rows(weight)  # [N, K]: a scale per output channel
        self.weight_t = q_w.t()  # [K, N] column-major, as _scaled_mm takes its second operand
        self.scale_w = scale_w.t().contiguous()  # [1, N]
        self.bias = None if layer.bias is None else layer.bias.detach()
        self.out_dtype = out_dtype or weight.dtype
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.matmul = MATMULS[matmul]
        self.row_multiple = row_multiple

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        if count % self.row_multiple:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, self.row_multiple - count % self.row_multiple))
        q_x, scale_x = quantize_rows(rows)
        # _scaled_mm takes a row-major first operand; an elementwise result keeps its input's strides.
        out = self.matmul(q_x.contiguous(), scale_x, self.weight_t, self.scale_w, self.out_dtype)[:count]
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        """What this GEMM keeps beside its layer's own weights: the fp8 weight and its scales (the
        bias is the layer's)."""
        return sum(t.numel() * t.element_size() for t in (self.weight_t, self.scale_w))


def quantize_peak_bytes(rows: int, cols: int) -> int:
    """The most bytes quantize_rows holds at once for a [rows, cols] input (the input not counted):
    the fp32 copy and its quotient by the scales, then the quotient and its clamp (8 bytes an
    element), beside the fp32 scales [rows, 1]; the 1-byte result comes once the copy is freed."""
    return 8 * rows * cols + 4 * rows


def call_peak_bytes(
    in_features: int,
    out_features: int,
    rows: int,
    *,
    dtype_bytes: int,
    bias: bool = True,
    compiled: bool = False,
    row_multiple: int = 1,
) -> int:
    """The most bytes one Fp8Gemm call holds at once, its output included and its (contiguous) input
    not, for `rows` activation rows in a dtype of `dtype_bytes` (the output's too).

    Eagerly: the rows' padded copy (when padded), beside the larger of the quantisation
    (quantize_peak_bytes) and the product's moment: the fp8 rows and their scales, the product, and
    with a bias the biased output made beside it. Compiled, Inductor fuses the padding and the
    quantisation into the op that made the input: the product's moment alone (the bias add counted
    as eagerly, an upper bound where Inductor fuses it into the next op)."""
    padded = -(-rows // row_multiple) * row_multiple
    product = padded * out_features * dtype_bytes
    biased = rows * out_features * dtype_bytes if bias else 0  # the product itself without a bias
    product_moment = padded * in_features + 4 * padded + product + biased  # e4m3: one byte each
    if compiled:
        return product_moment
    copy = padded * in_features * dtype_bytes if padded != rows else 0
    return copy + max(quantize_peak_bytes(padded, in_features), product_moment)


def block_linears(blocks: nn.ModuleList) -> list[nn.Module]:
    """Every Linear of the blocks whose product the runtime may replace (wanfit.models.dit.Linear)."""
    from wanfit.models.dit import Linear

    return [m for block in blocks for m in block.modules() if isinstance(m, Linear)]


def install(blocks: nn.ModuleList, *, matmul: str = "scaled_mm", row_multiple: int = 1) -> int:
    """Quantise every block Linear and route its forward through its Fp8Gemm; returns the fp8 bytes."""
    total = 0
    for layer in block_linears(blocks):
        layer.gemm = Fp8Gemm(layer, matmul=matmul, row_multiple=row_multiple)
        total += layer.gemm.nbytes
    return total


def uninstall(blocks: nn.ModuleList) -> None:
    """Every block Linear back on its own weight (the bf16 weights were never changed)."""
    for layer in block_linears(blocks):
        layer.gemm = None


def smoke_test(device: str) -> str | None:
    """None when `torch._scaled_mm` on `device` matches the fp32 emulation of the same fp8 operands
    on a small GEMM and lands near the exact product; else what went wrong (once per process)."""
    return probe_kernel(str(device))[0]


def row_multiple(device: str) -> int:
    """The activation row counts the kernel takes on `device`: 1 (any), else PADDED_ROW_MULTIPLE."""
    return probe_kernel(str(device))[1]


@functools.cache
def probe_kernel(device: str) -> tuple[str | None, int]:
    """(failure or None, row multiple): any row count first (a video's 32,760 tokens are not a
    multiple of 16), then a multiple of 16 if a kernel refused the first."""
    failure = _check_gemm(device, rows=40)
    if failure is None:
        return None, 1
    if _check_gemm(device, rows=48, row_multiple=PADDED_ROW_MULTIPLE) is None:
        return None, PADDED_ROW_MULTIPLE
    return failure, 1


def _check_gemm(
    device: str, rows: int, row_multiple: int = 1, dtype: torch.dtype = torch.bfloat16
) -> str | None:
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 48).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 64, generator=gen))
        layer.bias.copy_(torch.randn(48, generator=gen))
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    try:
        layer, x = layer.to(device), x.to(device)
        with torch.no_grad():
            out = Fp8Gemm(layer, matmul="scaled_mm", row_multiple=row_multiple)(x).float().cpu()
            emulated = Fp8Gemm(layer, matmul="emulated")(x).float().cpu()
            exact = layer(x).float().cpu()
    except Exception as err:  # a missing kernel, an unsupported layout or card
        lines = str(err).strip().splitlines()
        return f"torch._scaled_mm raised {type(err).__name__}: {lines[0][:200] if lines else ''}"
    if not torch.isfinite(out).all():
        return "torch._scaled_mm returned non-finite values"
    to_emulated = ((out - emulated).norm() / emulated.norm()).item()
    to_exact = ((out - exact).norm() / exact.norm()).item()
    if to_emulated > 2e-2 or to_exact > SMOKE_TOLERANCE:
        return (
            f"torch._scaled_mm is off by {to_emulated:.2g} from the fp32 emulation and {to_exact:.2g} "
            "from the exact product"
        )
    return None
