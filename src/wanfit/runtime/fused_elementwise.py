"""Hand-fused Triton kernels for the DiT blocks' elementwise work in eager mode (Plan.fused_elementwise).

Eager, a block's norms, modulation, RoPE and casts are several passes over fp32 activations each;
torch.compile fuses them but costs seconds cold. These kernels do the same math in one pass per token
row, fp32 inside, writing the dtype the next Linear reads:
    layer_norm_modulate(x, shift, scale, eps, out_dtype)   LayerNorm (no affine), shift/scale, cast: norm1, norm2
    layer_norm_affine(x, weight, bias, eps, out_dtype)     LayerNorm with its affine, cast: norm3
    rms_norm_rope(x, weight, rope, num_heads, eps)         RMSNorm over all heads, RoPE: self-attention q, k
    rms_norm(x, weight, eps)                               RMSNorm: cross-attention q
The runtime installs them (as GuardedKernels) on the blocks' `elementwise` slots (`install`); the blocks use them only
eagerly and without autograd (wanfit.models.dit). Results match the torch ops to fp32 rounding (the
reductions run in another order), then the cast.
"""

from __future__ import annotations

import functools
import importlib.util
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_CAPABILITY = (8, 0)  # Ampere: the GPUs these kernels were written and measured for

try:  # Triton is optional (CI and CPU installs have none): the torch ops run instead
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None


def available() -> bool:
    return triton is not None


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4 if block >= 512 else 2


if triton is not None:

    @triton.jit
    def _layer_norm_modulate_kernel(
        x_ptr, shift_ptr, scale_ptr, out_ptr, length, channels, mod_stride, eps,
        ONE_PLUS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # ONE_PLUS: the modulation's (1 + scale); else scale is an affine LayerNorm's weight.
        row = tl.program_id(0).to(tl.int64)
        batch = row // length
        cols = tl.arange(0, BLOCK)
        mask = cols < channels
        x = tl.load(x_ptr + row * channels + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / channels
        centred = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / channels + eps)
        shift = tl.load(shift_ptr + batch * mod_stride + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + batch * mod_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if ONE_PLUS:
            scale = 1.0 + scale
        y = centred * rstd * scale + shift
        tl.store(out_ptr + row * channels + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_rope_kernel(
        x_ptr, w_ptr, rope_ptr, out_ptr, length, channels, rope_stride, eps,
        ROTATE: tl.constexpr, HALF_HEAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # ROTATE False: RMSNorm alone (rope_ptr unused).
        row = tl.program_id(0).to(tl.int64)
        token = row % length
        pair = tl.arange(0, BLOCK)  # channel pairs (2j, 2j + 1) of the row
        mask = pair < channels // 2
        base = row * channels + 2 * pair
        even = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
        odd = tl.load(x_ptr + base + 1, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(even * even + odd * odd, axis=0) / channels + eps)
        even = even * rstd * tl.load(w_ptr + 2 * pair, mask=mask, other=0.0).to(tl.float32)
        odd = odd * rstd * tl.load(w_ptr + 2 * pair + 1, mask=mask, other=0.0).to(tl.float32)
        if ROTATE:
            angle = token * rope_stride + 2 * (pair % HALF_HEAD)  # the pair's rotation within its head
            cos = tl.load(rope_ptr + angle, mask=mask, other=1.0)
            sin = tl.load(rope_ptr + angle + 1, mask=mask, other=0.0)
            even, odd = even * cos - odd * sin, even * sin + odd * cos
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + base, even.to(dtype), mask=mask)
        tl.store(out_ptr + base + 1, odd.to(dtype), mask=mask)


def layer_norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """(LayerNorm_no_affine(x) * (1 + scale) + shift).to(out_dtype) in one pass.

    x [B, L, C] fp32; shift, scale [B, C] fp32 (rows may be strided, as `unbind` gives them)."""
    x = x.float().contiguous()
    batch, length, channels = x.shape
    shift, scale = (t.float().expand(batch, channels) for t in (shift, scale))
    if shift.stride() != scale.stride() or shift.stride(-1) != 1:
        shift, scale = shift.contiguous(), scale.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    block = _block(channels)
    _layer_norm_modulate_kernel[(batch * length,)](
        x, shift, scale, out, length, channels, shift.stride(0), eps,
        ONE_PLUS=True, BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return out


def layer_norm_affine(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """F.layer_norm(x, weight, bias) in fp32, then cast to out_dtype, in one pass. x [B, L, C]."""
    x = x.float().contiguous()
    batch, length, channels = x.shape
    weight = weight.float().contiguous()
    bias = weight.new_zeros(channels) if bias is None else bias.float().contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    block = _block(channels)
    _layer_norm_modulate_kernel[(batch * length,)](
        x, bias, weight, out, length, channels, 0, eps,
        ONE_PLUS=False, BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return out


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, rope: torch.Tensor, num_heads: int, eps: float
) -> torch.Tensor:
    """apply_rope(RMSNorm(x).unflatten(-1, (num_heads, -1)), rope).to(x.dtype) in one pass.

    x [B, L, C] (a Linear's output); weight [C]; rope complex64 [L, 1, head_dim / 2] -> [B, L, H, D]."""
    x = x.contiguous()
    batch, length, channels = x.shape
    half_head = channels // num_heads // 2
    if rope.shape[0] != length or 2 * half_head * num_heads != channels:
        raise ValueError(
            f"rms_norm_rope: x {tuple(x.shape)} does not match {num_heads} heads and rope {tuple(rope.shape)}."
        )
    angles = torch.view_as_real(rope).reshape(rope.shape[0], half_head * 2)
    if angles.stride(-1) != 1:
        angles = angles.contiguous()
    out = torch.empty_like(x)
    block = _block(channels // 2)
    _rms_norm_rope_kernel[(batch * length,)](
        x, weight.contiguous(), angles, out, length, channels, angles.stride(0), eps,
        ROTATE=True, HALF_HEAD=half_head, BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return out.unflatten(-1, (num_heads, -1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, weight) in fp32, then cast to x.dtype, in one pass. x [B, L, C], C even."""
    x = x.contiguous()
    batch, length, channels = x.shape
    out = torch.empty_like(x)
    block = _block(channels // 2)
    _rms_norm_rope_kernel[(batch * length,)](
        x, weight.contiguous(), x, out, length, channels, 0, eps,
        ROTATE=False, HALF_HEAD=1, BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return out


# The same math in torch ops, what a call runs once the kernels were given up (GuardedKernels).
def layer_norm_modulate_torch(x, shift, scale, eps, out_dtype):
    from wanfit.models.dit import modulate

    return modulate(F.layer_norm(x.float(), (x.shape[-1],), eps=eps), shift.float(), scale.float()).to(out_dtype)


def layer_norm_affine_torch(x, weight, bias, eps, out_dtype):
    bias = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias, eps).to(out_dtype)


def rms_norm_rope_torch(x, weight, rope, num_heads, eps):
    from wanfit.models.dit import apply_rope

    normed = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).unflatten(-1, (num_heads, -1))
    return apply_rope(normed, rope).to(x.dtype)


def rms_norm_torch(x, weight, eps):
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


KERNELS = types.SimpleNamespace(
    layer_norm_modulate=layer_norm_modulate,
    layer_norm_affine=layer_norm_affine,
    rms_norm_rope=rms_norm_rope,
    rms_norm=rms_norm,
)
TORCH_OPS = types.SimpleNamespace(
    layer_norm_modulate=layer_norm_modulate_torch,
    layer_norm_affine=layer_norm_affine_torch,
    rms_norm_rope=rms_norm_rope_torch,
    rms_norm=rms_norm_torch,
)


class GuardedKernels:
    """What the blocks' `elementwise` slot holds (wanfit.models.dit calls these four names): the
    kernels, until one raises (other than out of memory, which the runtime's guard handles). Then, as
    an attention backend that raises is, they are given up for the rest of the process:
    `on_failure(why)` is told once (the placement warns and records it), and that call and every later
    one run the torch ops."""

    def __init__(self, kernels=KERNELS, fallback=TORCH_OPS, on_failure=None):
        self.kernels, self.fallback, self.on_failure = kernels, fallback, on_failure
        self.failure: str | None = None

    def __getattr__(self, name: str):
        if name.startswith("_") or not hasattr(TORCH_OPS, name):
            raise AttributeError(name)

        def call(*args):
            if self.failure is None:
                try:
                    return getattr(self.kernels, name)(*args)
                except torch.OutOfMemoryError:
                    raise
                except Exception as err:
                    lines = str(err).strip().splitlines()
                    self.failure = f"the fused {name} kernel raised {type(err).__name__}: {lines[0][:200] if lines else ''}"
                    if self.on_failure is not None:
                        self.on_failure(self.failure)
            return getattr(self.fallback, name)(*args)

        return call


def install(blocks: nn.ModuleList, kernels=KERNELS) -> None:
    """Set (kernels) or clear (None) the `elementwise` slot of every block and its attentions."""
    for block in blocks:
        for module in (block, getattr(block, "self_attn", None), getattr(block, "cross_attn", None)):
            if module is not None and hasattr(module, "elementwise"):
                module.elementwise = kernels


def unavailable_reason(
    kind: str, capability: tuple[int, int] | None, *, need_triton: bool = True
) -> str | None:
    """Why the kernels cannot run on a device of this kind and capability (None: they can)."""
    if kind != "cuda":
        return "the fused elementwise kernels run on CUDA GPUs only"
    if capability is None or tuple(capability) < MIN_CAPABILITY:
        sm = f"sm_{capability[0]}{capability[1]}" if capability else "of unknown compute capability"
        return f"the fused elementwise kernels need compute capability 8.0 or newer, and this GPU is {sm}"
    if need_triton and importlib.util.find_spec("triton") is None:
        return "the fused elementwise kernels need Triton, which is not installed"
    return None


def status(hw) -> str | None:
    """Why the kernels cannot run on the probed device, None: they can. A real CUDA device runs the
    smoke test (once per process); an emulated or absent card is judged by its declared capability
    alone, so plans made under emulation stay the same on any machine."""
    if hw.emulated or not hw.device_present:
        return unavailable_reason(hw.device_type, hw.compute_capability, need_triton=False)
    return unavailable_reason(hw.device_type, hw.compute_capability) or _smoke_reason(hw.device_index or 0)


def runtime_failure(device: str) -> str | None:
    """Why the kernels cannot run on `device` in this process (None: they passed the smoke test)."""
    device = torch.device(device)
    if device.type != "cuda":
        return unavailable_reason(device.type, None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return unavailable_reason("cuda", torch.cuda.get_device_capability(index)) or _smoke_reason(index)


def _smoke_reason(index: int) -> str | None:
    failure = smoke_test(f"cuda:{index}")
    return None if failure is None else f"the fused elementwise kernels failed their smoke test ({failure})"


@functools.cache
def smoke_test(device: str) -> str | None:
    """None when the kernels on `device` match the torch ops on small inputs; else what went wrong
    (once per process)."""
    from wanfit.models.dit import rope_frequencies

    if triton is None:
        return "the fused elementwise kernels need Triton, which is not installed"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 128, generator=gen)
    shift, scale = torch.randn(2, 2, 128, generator=gen).unbind(1)
    q = torch.randn(2, 37, 128, generator=gen).to(torch.bfloat16)
    weight = torch.rand(128, generator=gen) + 0.5
    rope = rope_frequencies((1, 37, 1), 64)
    try:
        with torch.no_grad():
            ln = layer_norm_modulate(*(t.to(device) for t in (x, shift, scale)), 1e-6, torch.bfloat16)
            rr = rms_norm_rope(q.to(device), weight.to(device), rope.to(device), 2, 1e-6)
            la = layer_norm_affine(x.to(device), weight.to(device), shift[0].to(device), 1e-6, torch.bfloat16)
            rn = rms_norm(q.to(device), weight.to(device), 1e-6)
            ln, rr, la, rn = (t.float().cpu() for t in (ln, rr, la, rn))
    except Exception as err:  # no kernel for this card, a Triton that cannot compile here
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"
    ops = TORCH_OPS  # fp32 results, to compare each kernel's rounded output with
    wanted = {
        "layer_norm_modulate": (ln, ops.layer_norm_modulate(x, shift, scale, 1e-6, torch.float32)),
        "rms_norm_rope": (rr, ops.rms_norm_rope(q.float(), weight, rope, 2, 1e-6)),
        "layer_norm_affine": (la, ops.layer_norm_affine(x, weight, shift[0], 1e-6, torch.float32)),
        "rms_norm": (rn, ops.rms_norm(q.float(), weight, 1e-6)),
    }
    # bf16 outputs: a rounding step (at most 2^-7 relative) apart, where the fp32 values straddle one.
    errors = {
        name: ((got - want).abs() / (want.abs() + 1e-3)).max().item() for name, (got, want) in wanted.items()
    }
    bad = [f"{name} is off by {err:.2g}" for name, err in errors.items() if not err < 1e-2]
    return "; ".join(bad) or None
