"""wanfit: run Wan2.1 text-to-video on whatever machine you have.

Public API (imported lazily so `import wanfit` stays cheap):
    load_dit, load_vae, load_text_encoder, WanPipeline, save_video, plan_for, model_request, Constraints

    pipe = wanfit.WanPipeline.from_pretrained("builtin")  # or a model folder; "builtin" needs none
    wanfit.save_video(pipe("a fox", height=192, width=320, num_frames=17), "fox.mp4")
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
    "save_video": ("wanfit.video", "save_video"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'wanfit' has no attribute {name!r}")
