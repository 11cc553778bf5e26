"""Whether the FFN's GELU may run inside ffn.0's GEMM here (Plan.ffn_gelu_epilogue): a smoke test.

The blocks compute it by wanfit.models.dit.gelu_linear: `torch._addmm_activation(..., use_gelu=True)`,
which on CUDA runs cuBLASLt's GELU_BIAS epilogue (the tanh GELU applied to the fp32 accumulator as
each tile is written), or, where cuBLASLt cannot take the call, the GEMM and then the tanh GELU in
place: the same function either way. On the CPU the op applies the erf GELU instead, which is not
Wan's: the planner asks for the epilogue on CUDA only, and this test checks the function on the device
before the blocks use it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from wanfit.errors import one_line
from wanfit.models.dit import gelu_linear


@functools.cache
def smoke_test(device: str) -> str | None:
    """None when gelu_linear on `device` gives the tanh GELU of its GEMM's product (once per process);
    else what is wrong. In fp32 against the device's own product, so only the activation is compared
    (tanh and erf GELU differ by up to 5e-4 there); in bf16 within its rounding."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 64, generator=gen)
    weight = 0.3 * torch.randn(160, 64, generator=gen)
    bias = torch.randn(160, generator=gen)
    try:
        for dtype, tolerance in ((torch.float32, 5e-5), (torch.bfloat16, 2e-2)):
            args = [t.to(device, dtype) for t in (x, weight, bias)]
            with torch.no_grad():
                product = F.linear(*[a.float() for a in args]).double().cpu()
                got = gelu_linear(*args).double().cpu()
            want = F.gelu(product, approximate="tanh")
            err = ((got - want).abs() / (1 + want.abs())).max().item()
            if not err <= tolerance:
                return f"its {dtype} output is {err:.2g} from the tanh GELU of the product"
    except Exception as err:  # noqa: BLE001 - any failure means: keep the separate GELU
        return one_line(err)
    return None
