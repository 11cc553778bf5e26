"""The one attention entry point of the models, and its configuration.

`attention(q, k, v)` runs through a process-wide Dispatcher. The runtime sets it up once with
`configure(probe, forced=...)`; until then the first call configures it from the real machine
(and WANFIT_EMULATE / WANFIT_ATTENTION). Tests build their own Dispatcher objects.
"""

from __future__ import annotations

import os

import torch

from wanfit.attention.backends import (
    BACKEND_NAMES,
    AttentionBackend,
    AttentionCall,
    Registry,
    builtin_backends,
    default_registry,
)
from wanfit.attention.chunked import chunk_sizes, chunked_attention, reference_attention
from wanfit.attention.dispatch import (
    MATH_BUDGET_BYTES,
    AttentionFallbackWarning,
    Candidate,
    Dispatcher,
    Selection,
    live_dispatcher,
)
from wanfit.hardware.probe import HardwareProbe

ATTENTION_ENV = "WANFIT_ATTENTION"

__all__ = [
    "ATTENTION_ENV",
    "BACKEND_NAMES",
    "MATH_BUDGET_BYTES",
    "AttentionBackend",
    "AttentionCall",
    "AttentionFallbackWarning",
    "Candidate",
    "Dispatcher",
    "Registry",
    "Selection",
    "attention",
    "builtin_backends",
    "chunk_sizes",
    "chunked_attention",
    "configure",
    "default_registry",
    "explain",
    "get_dispatcher",
    "reference_attention",
    "reset",
]

_dispatcher: Dispatcher | None = None


def configure(
    hw: HardwareProbe | None = None, forced: str | None = None, *, allow_lossy: bool = False, **options
) -> Dispatcher:
    """Set up the process-wide dispatcher. `forced` (else WANFIT_ATTENTION) names a backend to use.

    options go to Dispatcher (math_budget_bytes, chunk_budget_bytes, registry, measured_ms, ...).
    """
    global _dispatcher
    if hw is None:
        from wanfit.hardware.probe import probe

        hw = probe()
    if forced is None:
        forced = os.environ.get(ATTENTION_ENV) or None
    _dispatcher = Dispatcher(hw, forced=forced, allow_lossy=allow_lossy, **options)
    return _dispatcher


def get_dispatcher() -> Dispatcher:
    """The process-wide dispatcher, configured from the real machine on first use."""
    return _dispatcher if _dispatcher is not None else configure()


def reset() -> None:
    """Forget the process-wide dispatcher (tests; a new probe)."""
    global _dispatcher
    _dispatcher = None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    dispatcher: Dispatcher | None = None,
) -> torch.Tensor:
    """Exact softmax attention. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype.

    scale defaults to D**-0.5; attn_mask is SDPA's (bool True = attend, or additive), broadcastable
    to [B, H, Lq, Lk]. dispatcher: the one a pipeline gave the model (from its Plan); None: the
    process-wide one, for a bare model.
    """
    if q.device.type == "meta":  # shape propagation only (models built on the meta device)
        return q.new_empty(*q.shape[:-1], v.shape[-1])
    if not torch.compiler.is_compiling():
        return _dispatch(q, k, v, scale, attn_mask, dispatcher)
    key = 0 if dispatcher is None else getattr(dispatcher, "key", None)
    if key is None:  # a dispatcher that is no Dispatcher (Ulysses' wrapper, test doubles): outside the graph
        # Wrapped here, not at import: torch.compiler.disable imports torch._dynamo (about 2 s of a
        # fresh `import wanfit.pipeline` on a 2-core CPU). transformers' umT5 modules import it too,
        # so a job that loads or sizes umT5 still pays it; the commands that do not, no longer do.
        return torch.compiler.disable(_dispatch)(q, k, v, scale, attn_mask, dispatcher)
    return _dispatch_op(q, k, v, scale, attn_mask, key)


def _dispatch(q, k, v, scale, attn_mask, dispatcher):
    return (dispatcher or get_dispatcher())(q, k, v, scale=scale, attn_mask=attn_mask)


# Traced by torch.compile, attention is one opaque op of the block's graph: the dispatcher's caches,
# smoke tests and fallbacks are Python state that dynamo must not trace, and a graph break there
# (torch.compiler.disable, before) split every block into three graphs, each compiled and guarded on
# its own (the H200's cold compile took 2.3x diffusers' one graph per block). The model's dispatcher
# travels as its key (Dispatcher.key; 0: the process-wide one).
@torch.library.custom_op("wanfit::attention", mutates_args=())
def _dispatch_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    attn_mask: torch.Tensor | None,
    dispatcher_key: int,
) -> torch.Tensor:
    dispatcher = live_dispatcher(dispatcher_key) if dispatcher_key else None
    out = _dispatch(q, k, v, scale, attn_mask, dispatcher)
    # Contiguous, as the fake below says: compiled code indexes the result by the fake's strides.
    return out.contiguous()


@_dispatch_op.register_fake
def _(q, k, v, scale, attn_mask, dispatcher_key):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def explain(call: AttentionCall | None = None) -> dict:
    """What the process-wide dispatcher selects for `call` (default: the default job's shape) and why."""
    d = get_dispatcher()
    if call is None:
        from wanfit.precision import default_compute_dtype

        call = d.call_on_probe(default_compute_dtype(d.hw), q_len=32760)
    return d.explain(call)
