"""A tiny Wan2.1 text-to-video model folder, in the diffusers layout and the official release layout.

The diffusers folder is written by diffusers' own WanPipeline.save_pretrained; the official one is
converted from it with the test helpers' independent name conversions (not the project's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import tiny_dit, tiny_text, tiny_vae
from wanfit.models.vae import WAN21_VAE

# DiT sized to the tiny umT5 (d_model 32) and the VAE's 16 latent channels.
PIPELINE_DIT = dict(
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=16,
    out_channels=16,
    text_dim=tiny_text.TINY_UMT5["d_model"],
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
)


def make_diffusers_pipeline(tokenizer_dir: Path, seed: int = 0):
    """diffusers' WanPipeline of tiny random parts; norms, tables and the text path made to matter."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**PIPELINE_DIT).eval()
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "norm" in name or "scale_shift_table" in name:
                p.add_(0.3 * torch.randn_like(p))
            if "attn2" in name or "text_embedder" in name:  # a strong text path: the prompt must show
                p.mul_(3.0)
    # The official VAE file carries no latent statistics (the release's are fixed): use those.
    real = WAN21_VAE
    vae = tiny_vae.make_tiny_diffusers_vae(
        seed, latents_mean=list(real.latents_mean), latents_std=list(real.latents_std)
    )
    text_encoder = tiny_text.make_umt5(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )


def save_official_layout(pipe, tokenizer_dir: Path, root: Path) -> Path:
    """The same weights as an official release folder (config.json + DiT, VAE .pth, umT5 .pth, tokenizer)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dit_state = tiny_dit.to_official_names(pipe.transformer.state_dict())
    tiny_dit.save_official(dit_state, root / "diffusion_pytorch_model.safetensors")
    cfg = PIPELINE_DIT
    (root / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "WanModel",
                "model_type": "t2v",
                "dim": cfg["num_attention_heads"] * cfg["attention_head_dim"],
                "num_heads": cfg["num_attention_heads"],
                "ffn_dim": cfg["ffn_dim"],
                "freq_dim": cfg["freq_dim"],
                "num_layers": cfg["num_layers"],
                "in_dim": cfg["in_channels"],
                "out_dim": cfg["out_channels"],
                "text_dim": cfg["text_dim"],
                "text_len": 512,
            }
        )
    )
    tiny_vae.save_official_pth(pipe.vae, root / "Wan2.1_VAE.pth")
    tiny_text.save_official_layout(pipe.text_encoder, tokenizer_dir, root)
    return root


def diffusers_frames(pipe, **kwargs):
    """Run diffusers' WanPipeline and return uint8 frames [F, H, W, 3] rounded as wanfit rounds."""
    import numpy as np

    with torch.no_grad():
        video = pipe(output_type="np", **kwargs).frames[0]
    return (np.asarray(video) * 255).round().astype(np.uint8)
