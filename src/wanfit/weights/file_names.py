"""The file and folder names Wan2.1 is shipped under: the one table the loaders and the folder finder read.

Official release folder (Wan-AI/Wan2.1-T2V-*):
    diffusion_pytorch_model.safetensors (or -0000N-of-0000M shards + .index.json), config.json,
    Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (the tokenizer)
diffusers folder (Wan-AI/Wan2.1-T2V-*-Diffusers):
    model_index.json, transformer/, vae/ (diffusion_pytorch_model.*), text_encoder/ (model.*),
    tokenizer/, scheduler/scheduler_config.json
ComfyUI models/ folder (Comfy-Org/Wan_2.1_ComfyUI_repackaged's split_files):
    diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors, text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors
    (or umt5_xxl_fp16; the tokenizer inside), vae/wan_2.1_vae.safetensors
"""

from __future__ import annotations

from pathlib import Path

# Official release files.
OFFICIAL_VAE = "Wan2.1_VAE.pth"
OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_TOKENIZER = Path("google") / "umt5-xxl"
# The two pickles' safetensors twins (also read in an official folder; the built-in model ships them).
OFFICIAL_VAE_SAFETENSORS = str(Path(OFFICIAL_VAE).with_suffix(".safetensors"))
OFFICIAL_T5_SAFETENSORS = str(Path(OFFICIAL_T5).with_suffix(".safetensors"))

# Stems of safetensors weight files: <stem>.safetensors, <stem>.safetensors.index.json, <stem>-*-of-*.
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # the official DiT, and diffusers' transformer/ and vae/
TRANSFORMERS_WEIGHTS = "model"  # transformers' models: diffusers' text_encoder/

# diffusers-layout parts.
DIFFUSERS_INDEX = "model_index.json"
DIFFUSERS_DIT = "transformer"
DIFFUSERS_VAE = "vae"
DIFFUSERS_TEXT_ENCODER = "text_encoder"
DIFFUSERS_TOKENIZER = "tokenizer"
DIFFUSERS_SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"

# A ComfyUI `models/` folder (or the ComfyUI folder above it): one subfolder per kind of file,
# each holding any number of single-file weights (the first name is ComfyUI's current one).
COMFY_MODELS = "models"
COMFY_DIT = ("diffusion_models", "unet")
COMFY_TEXT_ENCODER = ("text_encoders", "clip")
COMFY_VAE = ("vae",)

# A tokenizer folder holds at least one of these.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")

# The built-in model's folder (wanfit/builtin/model): the official layout, in safetensors throughout.
BUILTIN_FILES = {
    "dit": f"{DIFFUSERS_WEIGHTS}.safetensors",
    "dit_config": "config.json",
    "vae": OFFICIAL_VAE_SAFETENSORS,
    "text_encoder": OFFICIAL_T5_SAFETENSORS,
    "tokenizer": OFFICIAL_TOKENIZER,
}
