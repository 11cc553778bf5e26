"""The tiny random test model (wanfit.demo) saved as an official Wan2.1 release folder.

Cheaper than tests/helpers/tiny_pipeline.py (no diffusers, no tokenizer training): for tests that
need a loadable model folder to break (truncate, corrupt, swap files), not agreement with diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.helpers import tiny_text
from wanfit.weights.file_names import OFFICIAL_T5, OFFICIAL_TOKENIZER, OFFICIAL_VAE

DIT_FILE = "diffusion_pytorch_model.safetensors"


def save_demo_official_layout(root: Path, seed: int = 0) -> Path:
    """root/{diffusion_pytorch_model.safetensors, config.json, Wan2.1_VAE.pth, umT5 .pth, google/umt5-xxl/}."""
    from wanfit.demo import tiny_pipeline

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pipe = tiny_pipeline(device="cpu", seed=seed)
    dit_state = {k: v.contiguous() for k, v in pipe.dit.state_dict().items()}  # official names already
    save_file(dit_state, str(root / DIT_FILE))
    config = {"_class_name": "WanModel", "model_type": "t2v", **pipe.dit.config.to_dict()}
    (root / "config.json").write_text(json.dumps(config))
    torch.save(pipe.vae.state_dict(), root / OFFICIAL_VAE)
    torch.save(tiny_text.official_state_dict(pipe.text_encoder.model), root / OFFICIAL_T5)
    pipe.text_encoder.tokenizer.save_pretrained(str(root / OFFICIAL_TOKENIZER))
    return root
