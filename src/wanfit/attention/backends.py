"""Attention backends: what each kernel needs, whether it can serve a call (and why not), how to run it.

Every backend takes q [B, Lq, H, D], k/v [B, Lk, H, D] in its kernel dtype and returns [B, Lq, H, D].
A mask, where supported, is SDPA's: boolean (True = attend) or additive, broadcastable to
[B, H, Lq, Lk]. The dispatcher (wanfit.attention.dispatch) picks among them.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wanfit.attention.chunked import chunked_attention
from wanfit.attention.fp8_attention import HEAD_DIMS as FP8_HEAD_DIMS
from wanfit.attention.fp8_attention import fp8_attention
from wanfit.attention.int8_attention import HEAD_DIMS as INT8_HEAD_DIMS
from wanfit.attention.int8_attention import int8_attention

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ARCH_NAMES = {
    (5, 0): "Maxwell",
    (6, 0): "Pascal",
    (7, 0): "Volta",
    (7, 5): "Turing",
    (8, 0): "Ampere",
    (9, 0): "Hopper",
}


@dataclass(frozen=True)
class AttentionCall:
    """What the dispatcher needs to know about one attention call (or the job's typical call)."""

    device_type: str  # "cuda" | "cpu" | "mps"
    compute_capability: tuple[int, int] | None
    dtype: torch.dtype  # the model's dtype of q/k/v
    head_dim: int
    q_len: int
    kv_len: int
    batch: int = 1
    heads: int = 1
    has_mask: bool = False
    device_name: str = ""
    # False for an emulated card absent here: this torch build's features (cuDNN, ...) then say
    # nothing about the build the real card would have, so only declarations are checked.
    device_present: bool = True

    @property
    def score_bytes(self) -> int:
        """Bytes of one fp32 score matrix, what full-length math attention materialises."""
        return self.batch * self.heads * self.q_len * self.kv_len * 4

    @property
    def flops(self) -> int:
        """Multiply-adds of QK^T and PV, counted as 2 FLOP each."""
        return 4 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim

    def where(self) -> str:
        if self.device_type != "cuda" or self.compute_capability is None:
            return f"this {self.device_type} device"
        sm = f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"
        return f"{self.device_name} ({sm})" if self.device_name else sm

    def to_dict(self) -> dict:
        return {
            "device_type": self.device_type,
            "compute_capability": list(self.compute_capability) if self.compute_capability else None,
            "dtype": str(self.dtype).removeprefix("torch."),
            "head_dim": self.head_dim,
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "batch": self.batch,
            "heads": self.heads,
            "has_mask": self.has_mask,
        }


RunFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """One kernel and its declared requirements. `reason_*` methods return None when satisfied."""

    name: str
    run: RunFn  # run(q, k, v, *, scale=None, attn_mask=None)
    summary: str
    package: str | None = None  # module that must import
    pip_name: str | None = None
    devices: tuple[str, ...] = ("cuda",)
    min_capability: tuple[int, int] | None = None
    max_capability: tuple[int, int] | None = None  # inclusive
    dtypes: tuple[torch.dtype, ...] = (FP16, BF16)
    # Dtypes that need a newer card than the backend itself, e.g. bf16 on sm_80+.
    dtype_min_capability: tuple[tuple[torch.dtype, tuple[int, int]], ...] = ()
    head_dims: tuple[int, ...] | None = None  # exactly these, or
    max_head_dim: int | None = None
    head_dim_multiple: int | None = None
    supports_mask: bool = False
    exact: bool = True
    torch_check: Callable[[], str | None] | None = None  # does this torch build have the kernel?
    default_ms: float = math.inf  # default-table speed at the job's shape (lower ranks higher)
    # (major version, ms): from that major version of its package on, its default-table speed (a
    # package whose kernels changed in kind between versions, as SageAttention's did).
    default_ms_by_version: tuple[tuple[int, float], ...] = ()
    # Scratch memory beyond q, k, v: "linear" O(L) (fused kernels), "quadratic" (the L x L score
    # matrix is materialised), "bounded" (a fixed budget); the planner's estimates read it.
    memory: str = "linear"
    # Scratch beyond its class's, as a multiple of the call's q + k + v bytes: the quantised copies
    # (and scales, smoothed K) a lossy kernel makes before its main kernel.
    scratch_per_qkv: float = 0.0
    # "kernel": ranked by speed; "fallback": keeps its place at the end of the ranking whatever was
    # measured (math, then chunked), the dispatcher's last resorts.
    role: str = "kernel"
    # Why the ranking never chooses it, though it may run where named (--attention NAME, --set
    # self_attention=NAME); None: the ranking may. For a lossy kernel whose error on some inputs
    # is well over its peers' at a like speed.
    named_only: str | None = None
    dist_names: tuple[str, ...] = ()  # distributions to ask importlib.metadata for the package version

    def default_ms_for(self, version: str | None) -> float:
        """The default-table speed with `version` of its package installed (None: unknown)."""
        major = _major_version(version)
        ms = self.default_ms
        for since, figure in sorted(self.default_ms_by_version):
            if major is not None and major >= since:
                ms = figure
        return ms

    def device_reason(
        self, device_type: str, cc: tuple[int, int] | None, where: str = "", check_build: bool = True
    ) -> str | None:
        """Why this backend cannot run on the device at all (None: it can)."""
        where = where or f"this {device_type} device"
        if device_type not in self.devices:
            return f"needs a {' or '.join(d.upper() for d in self.devices)} device; {where} is not one."
        if device_type == "cuda" and cc is not None:
            if self.min_capability and cc < self.min_capability:
                return f"needs compute capability {_cc_text(self.min_capability)} or newer; {where} is older."
            if self.max_capability and cc > self.max_capability:
                return (
                    f"runs only up to compute capability {_cc_text(self.max_capability)}; {where} is newer."
                )
        if self.torch_check is not None and check_build:
            reason = self.torch_check()
            if reason:
                return reason
        if self.package is not None:
            return import_reason(self.package, self.pip_name or self.package)
        return None

    def supported_dtypes(self, cc: tuple[int, int] | None) -> tuple[torch.dtype, ...]:
        needs = dict(self.dtype_min_capability)
        return tuple(d for d in self.dtypes if cc is None or d not in needs or cc >= needs[d])

    def kernel_dtype(self, call: AttentionCall) -> tuple[torch.dtype | None, str | None]:
        """(dtype the kernel runs in, None) or (None, why not). bf16 may run as fp16 on cards without bf16."""
        cc = call.compute_capability if call.device_type == "cuda" else None
        ok = self.supported_dtypes(cc)
        if call.dtype in ok:
            return call.dtype, None
        if call.dtype == BF16 and FP16 in ok:
            return FP16, None
        names = ", ".join(_dtype_text(d) for d in ok)
        return None, f"has no {_dtype_text(call.dtype)} kernel on {call.where()} (it runs {names})."

    def call_reason(self, call: AttentionCall) -> str | None:
        """Why this backend cannot serve this call's head dim or mask (None: it can)."""
        d = call.head_dim
        if self.head_dims is not None and d not in self.head_dims:
            return f"supports head dims {', '.join(map(str, self.head_dims))} only, not {d}."
        if self.max_head_dim is not None and d > self.max_head_dim:
            return f"supports head dims up to {self.max_head_dim}, not {d}."
        if self.head_dim_multiple is not None and d % self.head_dim_multiple:
            return f"needs a head dim that is a multiple of {self.head_dim_multiple}, not {d}."
        if call.has_mask and not self.supports_mask:
            return "does not take an attention mask."
        return None

    def check(self, call: AttentionCall) -> tuple[torch.dtype | None, str | None]:
        """(kernel dtype, None) when this backend can serve `call` by its declarations, else (None, why)."""
        reason = self.device_reason(
            call.device_type, call.compute_capability, call.where(), call.device_present
        )
        reason = reason or self.call_reason(call)
        if reason:
            return None, reason
        return self.kernel_dtype(call)


def _major_version(version: str | None) -> int | None:
    """2 for "2.2.0" or "2.0.1+cu128"; None when unknown or unreadable."""
    head = (version or "").split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _cc_text(cc: tuple[int, int]) -> str:
    arch = ARCH_NAMES.get(cc)
    return f"{cc[0]}.{cc[1]} ({arch})" if arch else f"{cc[0]}.{cc[1]}"


def _dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def _import(module: str):
    if module in _BEFORE_IMPORT and module not in sys.modules:
        _BEFORE_IMPORT[module]()
    return importlib.import_module(module)


# flash-attn-4 reads these once, when flash_attn.cute is imported.
FA4_CACHE_ENABLED = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
FA4_CACHE_DIR = "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"


def _flash_attn4_disk_cache() -> None:
    """Turn on flash-attn-4's on-disk cache of compiled kernels in wanfit's cache dir, so a fresh process
    loads them instead of compiling them again (its entries are keyed by its sources' fingerprint and
    the card's arch). Either variable set by the user wins; a dir that cannot be written leaves FA4's
    default (no disk cache): a missing cache costs a compile, never the backend."""
    if FA4_CACHE_ENABLED in os.environ or FA4_CACHE_DIR in os.environ:
        return
    from wanfit.attention.ranking import cache_dir  # ranking imports this module

    try:
        path = cache_dir() / "flash_attn4"
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # FA4 writes lock files here even to read an entry
            pass
    except (OSError, RuntimeError):  # read-only or unwritable home; RuntimeError: no home at all
        return
    os.environ[FA4_CACHE_DIR] = str(path)
    os.environ[FA4_CACHE_ENABLED] = "1"


# What a package needs done before its first import (its one home: the import every runner and
# availability check goes through).
_BEFORE_IMPORT: dict[str, Callable[[], None]] = {"flash_attn.cute": _flash_attn4_disk_cache}


def namespace_only(spec) -> bool:
    """Whether a module spec is a bare namespace (no __init__): what another distribution's subpackage
    leaves behind (flash-attn-4 leaves a `flash_attn` one, without FlashAttention-2), not the package."""
    return spec is not None and spec.origin in (None, "namespace")


@functools.cache
def import_reason(module: str, pip_name: str) -> str | None:
    """None when `module` imports; else why not, in one sentence (cached per process)."""
    try:
        imported = _import(module)
        if namespace_only(getattr(imported, "__spec__", None)):
            return (
                f"the {module} package is not installed (pip install {pip_name}); only an empty {module} "
                "namespace is, another package's part of it."
            )
        return None
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):
            return f"the {module} package is not installed (pip install {pip_name})."
        return f"the {module} package failed to import: {_first_line(err)}."
    except Exception as err:  # broken builds raise OSError, RuntimeError, undefined symbols...
        return f"the {module} package failed to import: {_first_line(err)}."


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


# --- kernels ------------------------------------------------------------------------------------


def _sdpa_runner(backend_name: str) -> RunFn:
    def run(q, k, v, *, scale=None, attn_mask=None):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
            )
        return out.transpose(1, 2)

    return run


def _run_flash_attn2(q, k, v, *, scale=None, attn_mask=None):
    return _import("flash_attn").flash_attn_func(q, k, v, softmax_scale=scale)


def _run_flash_attn3(q, k, v, *, scale=None, attn_mask=None):
    out = _import("flash_attn_interface").flash_attn_func(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out  # early FA3 releases return (out, lse)


def _run_flash_attn3_fp8(q, k, v, *, scale=None, attn_mask=None):
    if attn_mask is not None:
        raise ValueError("flash_attn3_fp8 takes no attention mask.")
    return fp8_attention(q, k, v, scale=scale, kernel=_import("flash_attn_interface").flash_attn_func)


def _run_flash_attn4(q, k, v, *, scale=None, attn_mask=None):
    fa4 = _import("flash_attn.cute")
    with warnings.catch_warnings():
        # Its CuTe DSL warns on every kernel compile about an argument it treats as a constant.
        warnings.filterwarnings("ignore", ".*cannot be converted to a JitArgument", UserWarning)
        out = fa4.flash_attn_func(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out  # (out, lse)


def _run_sage(q, k, v, *, scale=None, attn_mask=None):
    return _import("sageattention").sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)


def _run_int8_triton(q, k, v, *, scale=None, attn_mask=None):
    if attn_mask is not None:
        raise ValueError("int8_triton takes no attention mask.")
    return int8_attention(q, k, v, scale=scale)


def _run_xformers(q, k, v, *, scale=None, attn_mask=None):
    return _import("xformers.ops").memory_efficient_attention(q, k, v, scale=scale)


def _run_chunked(q, k, v, *, scale=None, attn_mask=None):
    return chunked_attention(q, k, v, scale=scale, attn_mask=attn_mask)


def _sdpa_backend_check(attr: str, since: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            from torch.nn.attention import SDPBackend
        except ImportError:
            return f"this PyTorch {torch.__version__} has no torch.nn.attention (needs 2.3+)."
        if not hasattr(SDPBackend, attr):
            return f"this PyTorch {torch.__version__} has no {attr} SDPA kernel (needs {since}+)."
        return None

    return check


def _cudnn_check() -> str | None:
    reason = _sdpa_backend_check("CUDNN_ATTENTION", "2.5")()
    if reason:
        return reason
    if not torch.backends.cudnn.is_available():
        return "this PyTorch build has no cuDNN."
    return None


# What both FlashAttention-3 entries (bf16 and e4m3) need: its package, on Hopper.
FA3_PACKAGE = dict(
    package="flash_attn_interface",
    pip_name="flash-attn-3 (built from flash-attention/hopper: benchmarks/build_fa3.sh)",
    dist_names=("flash_attn_3", "flash-attn-3", "flashattn-hopper"),
    min_capability=(9, 0),
    max_capability=(9, 9),
)


def builtin_backends() -> list[AttentionBackend]:
    """The shipped backends. default_ms: the design notes' H200 numbers at 32,760 tokens, 12 heads
    of 128, bf16 (flash_attn3, flash_attn2 and xformers are estimates placed by published ratios)."""
    sdpa = "SDPA"
    return [
        AttentionBackend(
            "sdpa_cudnn",
            _sdpa_runner("CUDNN_ATTENTION"),
            "PyTorch SDPA, cuDNN fused attention",
            min_capability=(8, 0),
            max_head_dim=128,
            head_dim_multiple=8,
            torch_check=_cudnn_check,
            default_ms=11.4,
        ),
        AttentionBackend(
            "flash_attn3",
            _run_flash_attn3,
            "FlashAttention-3 (Hopper)",
            **FA3_PACKAGE,
            max_head_dim=256,
            head_dim_multiple=8,
            # Measured (H200, 2026-12-06, built by benchmarks/build_fa3.sh: 9.57 ms per 1.3B call, its
            # build check; flash_attn4 8.87 on the H200 in an earlier run). On an H100 8.9 ms, cuDNN's 11.3.
            default_ms=9.6,
        ),
        AttentionBackend(
            "flash_attn3_fp8",
            _run_flash_attn3_fp8,
            "FlashAttention-3's float8 e4m3 forward (Hopper; q, k, v quantised per head, K smoothed: lossy)",
            **FA3_PACKAGE,
            head_dims=FP8_HEAD_DIMS,
            exact=False,
            # Fourteenth run (H100): 7.88 ms per 1.3B call, its quantisation included, against sage 2's
            # 7.95, so placed at sage 2's figure; peak 529 MiB against flash_attn3's 385 (q + k + v: 288).
            # But with outlier channels in q and k (what smoothing K cannot fix) e4m3's 3 mantissa
            # bits lose the large scores that int8 keeps: named only.
            default_ms=7.8,
            scratch_per_qkv=0.5,
            named_only=(
                "its e4m3 q and k lose the large scores of outlier channels (0.35 relative L2 against exact "
                "attention on such inputs, sage 0.05)"
            ),
        ),
        AttentionBackend(
            "flash_attn4",
            _run_flash_attn4,
            "FlashAttention-4 (CuTe DSL kernels, compiled at first use, cached on disk)",
            package="flash_attn.cute",
            pip_name="flash-attn-4",
            dist_names=("flash-attn-4", "flash_attn_4"),
            min_capability=(8, 0),  # its interface takes sm_8x to sm_12x
            max_head_dim=128,  # sm_90 takes up to 256, sm_100 128: the common bound
            head_dim_multiple=8,
            # Measured (benchmarks/bench_int8_attention.py, H200, 2026-12-02, 4.0.0b36): 8.87 ms against
            # cuDNN's 11.24 in the same run, placed at that ratio to this table's cuDNN figure.
            default_ms=9.0,
        ),
        AttentionBackend(
            "flash_attn2",
            _run_flash_attn2,
            "FlashAttention-2 package",
            package="flash_attn",
            pip_name="flash-attn",
            dist_names=("flash-attn", "flash_attn"),
            min_capability=(8, 0),
            max_head_dim=256,
            default_ms=17.5,
        ),
        AttentionBackend(
            "sdpa_flash",
            _sdpa_runner("FLASH_ATTENTION"),
            f"PyTorch {sdpa}, FlashAttention-2 kernel",
            min_capability=(8, 0),
            max_head_dim=256,
            default_ms=18.3,
        ),
        AttentionBackend(
            "sage",
            _run_sage,
            "SageAttention (q, k quantised to int8: lossy)",
            package="sageattention",
            pip_name="sageattention",
            dist_names=("sageattention",),
            min_capability=(8, 0),
            head_dims=(64, 96, 128),
            exact=False,
            default_ms=15.5,  # 1.x: Triton kernels (H200, fifth run: 15.6 ms)
            # 2.x: CUDA kernels per card (on sm_90 int8 Q.K^T, fp8 P.V): 0.867x flash_attn4 on an H100
            # (thirteenth run, 8.07 against 9.31 ms), placed at that ratio to flash_attn4's 9.0 here.
            default_ms_by_version=((2, 7.8),),
            # 2.2.0 on an H100 (thirteenth run, `wanfit bench attention`): 721 MiB at its peak against
            # flash_attn4's 384 at 32,760 tokens, 12 heads (q + k + v 288 MiB): 337 MiB more.
            scratch_per_qkv=1.17,
        ),
        AttentionBackend(
            "int8_triton",
            _run_int8_triton,
            "int8 Q·K^T (K smoothed), fp8 P·V, in Triton (SageAttention2's method: lossy)",
            package="triton",
            pip_name="triton",
            dist_names=("triton",),
            min_capability=(8, 9),  # fp8 tensor cores (Ada, Hopper)
            head_dims=INT8_HEAD_DIMS,
            exact=False,
            # Measured (benchmarks/bench_int8_attention.py, H200, 2026-12-02): 12.44 ms against
            # cuDNN's 10.50 in the same run, so placed at that ratio to this table's cuDNN figure:
            # slower than the exact kernel, it wins only where a card's own measurement says so.
            default_ms=13.5,
            scratch_per_qkv=0.5,  # H100, thirteenth run: 528 MiB at its peak against flash_attn4's 384
        ),
        AttentionBackend(
            "xformers",
            _run_xformers,
            "xFormers memory_efficient_attention",
            package="xformers",
            pip_name="xformers",
            dist_names=("xformers",),
            min_capability=(5, 0),
            dtypes=(FP16, BF16, FP32),
            dtype_min_capability=((BF16, (8, 0)),),
            max_head_dim=256,
            default_ms=25.0,
        ),
        AttentionBackend(
            "sdpa_efficient",
            _sdpa_runner("EFFICIENT_ATTENTION"),
            f"PyTorch {sdpa}, memory-efficient kernel",
            min_capability=(5, 0),
            dtypes=(FP16, BF16, FP32),
            dtype_min_capability=((BF16, (8, 0)),),
            supports_mask=True,
            default_ms=36.8,
        ),
        AttentionBackend(
            "sdpa_math",
            _sdpa_runner("MATH"),
            f"PyTorch {sdpa}, math (materialises the score matrix)",
            devices=("cuda", "cpu", "mps"),
            dtypes=(FP32, FP16, BF16, FP64),
            supports_mask=True,
            torch_check=_sdpa_backend_check("MATH", "2.3"),
            default_ms=278.0,
            memory="quadratic",
            role="fallback",
        ),
        AttentionBackend(
            "chunked",
            _run_chunked,
            "exact attention in bounded memory (query blocks, online softmax over key blocks)",
            devices=("cuda", "cpu", "mps"),
            dtypes=(FP32, FP16, BF16, FP64),
            supports_mask=True,
            memory="bounded",
            role="fallback",
        ),
    ]


class Registry:
    """Backends by name, in registration order."""

    def __init__(self, backends: Iterable[AttentionBackend] = ()):
        self._backends: dict[str, AttentionBackend] = {}
        for b in backends:
            self.register(b)

    def register(self, backend: AttentionBackend, *, replace: bool = False) -> None:
        if backend.name in self._backends and not replace:
            raise ValueError(f"attention backend {backend.name!r} is already registered")
        self._backends[backend.name] = backend

    def __getitem__(self, name: str) -> AttentionBackend:
        return self._backends[name]

    def __contains__(self, name: object) -> bool:
        return name in self._backends

    def __iter__(self) -> Iterator[AttentionBackend]:
        return iter(self._backends.values())

    def names(self) -> list[str]:
        return list(self._backends)

    def copy(self) -> Registry:
        return Registry(self._backends.values())

    def scratch_per_qkv(self, name: str) -> float:
        """The backend's extra scratch per byte of q + k + v (unknown names: none)."""
        return self._backends[name].scratch_per_qkv if name in self._backends else 0.0

    def memory_class(self, name: str) -> str:
        """The backend's workspace class ("linear", "quadratic", "bounded"); unknown names: quadratic."""
        return self._backends[name].memory if name in self._backends else "quadratic"

    def packages(self) -> list[tuple[str, tuple[str, ...]]]:
        """(module, distribution names) of every optional package a backend needs, once each."""
        seen: dict[str, tuple[str, ...]] = {}
        for b in self:
            if b.package is not None and b.package not in seen:
                seen[b.package] = b.dist_names or (b.pip_name or b.package,)
        return list(seen.items())


BACKEND_NAMES = tuple(b.name for b in builtin_backends())
_DEFAULT_REGISTRY = Registry(builtin_backends())


def default_registry() -> Registry:
    """The process-wide registry (built-ins plus anything registered at run time)."""
    return _DEFAULT_REGISTRY
