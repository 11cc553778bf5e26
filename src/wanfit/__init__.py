"""wanfit: run Wan2.1 text-to-video on whatever machine you have.

Public API (imported lazily so `import wanfit` stays cheap):
    load_dit, load_vae, load_text_encoder, WanPipeline, plan_for, model_request, Constraints
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_dit": ("wanfit.weights.dit_loader", "load_dit"),
    "load_vae": ("wanfit.weights.vae_loader", "load_vae"),
    "load_text_encoder": ("wanfit.weights.text_encoder_loader", "load_text_encoder"),
    "WanPipeline": ("wanfit.pipeline", "WanPipeline"),
    "plan_for": ("wanfit.plan.planning", "plan_for"),
    "model_request": ("wanfit.plan.planning", "model_request"),
    "Constraints": ("wanfit.plan.planning", "Constraints"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'wanfit' has no attribute {name!r}")
