"""The built-in model: a tiny Wan2.1 (DiT, VAE, umT5) trained to draw what its prompt says.

It was trained on synthetic clips of one shape moving over a plain background (see
wanfit.builtin.language for what it can draw, training/ for how, docs/builtin_model.md for the
record). Its files in `MODEL_DIR` are an official-layout release folder in safetensors, read by
the same loaders and checks as a downloaded model. `wanfit generate` runs it when no --model is
given; in Python, `builtin_pipeline()`.
"""

from __future__ import annotations

from pathlib import Path

from wanfit.builtin.language import Scene, prompt
from wanfit.models.configs import DiTConfig, TextEncoderConfig
from wanfit.models.vae import VAEConfig
from wanfit.pipeline import SamplingDefaults

MODEL_DIR = Path(__file__).with_name("model")
NAME = "built-in shapes model"

# The model's shape (what training builds and the shipped files hold; a test checks they agree).
BUILTIN_DIT = DiTConfig(
    dim=192, ffn_dim=768, freq_dim=64, num_heads=6, num_layers=6, text_dim=128, text_len=32
)
BUILTIN_VAE = VAEConfig(
    base_dim=8, num_res_blocks=1
)  # the release's latent statistics: see training/export.py
# The umT5 encoder: umT5-XXL's design (gated GELU, 32 relative buckets), smaller.
BUILTIN_TEXT_ENCODER = TextEncoderConfig(
    vocab_size=256, d_model=BUILTIN_DIT.text_dim, d_kv=32, d_ff=256, num_layers=2, num_heads=4
)
BUILTIN_TEXT = BUILTIN_TEXT_ENCODER.umt5_kwargs()  # transformers' UMT5Config arguments

# Its defaults (the attribute grid's scores for these and others: docs/builtin_model.md). Guidance
# off scores higher there, but guidance stays on so that the default path, which the tests measure,
# runs classifier-free guidance. Its unconditional caption in training was the empty one, so that
# is its negative prompt.
SAMPLING = SamplingDefaults(guidance_scale=4.0, shift=3.0, num_inference_steps=10, negative_prompt="")
# The video `wanfit generate` makes without --model: a few seconds on a CPU.
VIDEO_SIZE = (64, 64)  # width, height: the size it was trained at
VIDEO_FRAMES = 17
DEFAULT_PROMPT = prompt(Scene("circle", "red", "right"))


def builtin_pipeline(device: str | None = None, plan="auto", model_dir: str | Path = MODEL_DIR, **kwargs):
    """The built-in model as a WanPipeline (what WanPipeline.from_pretrained("builtin") returns),
    loaded from MODEL_DIR like any release folder, with its own sampling defaults.

    plan and kwargs: as WanPipeline.from_pretrained takes them ("auto" plans this machine for the
    default video). model_dir: another folder of the same model (a freshly trained one, say).
    """
    from dataclasses import asdict

    from wanfit.pipeline import WanPipeline

    size = {"width": VIDEO_SIZE[0], "height": VIDEO_SIZE[1], "num_frames": VIDEO_FRAMES}
    pipe = WanPipeline.from_pretrained(
        model_dir, device=device, plan=plan, **{**size, **asdict(SAMPLING), **kwargs}
    )
    if pipe.text_encoder is not None:  # a few hundred kilobytes: encoding beats a prompt-cache lookup
        pipe.text_encoder.cache = None
    pipe.name = NAME
    return pipe
