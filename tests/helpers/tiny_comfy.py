"""Tiny models saved as ComfyUI users keep them: a models/ folder of single files (the DiT in fp16
under ComfyUI's prefix, the VAE in fp16, umT5 as a scaled-fp8 or fp16 file with its tokenizer inside),
plus files of other models beside them, as a real ComfyUI folder has."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.helpers import tiny_text
from tests.helpers.tiny_dit import COMFY_PREFIX
from wanfit.models.configs import WAN_TINY

DIT_NAME = "wan2.1_t2v_tiny_fp16.safetensors"
# Heads of 128, as every released DiT has: a file without a config.json tells its shape by itself.
COMFY_TINY = WAN_TINY.with_overrides(dim=128, num_heads=1, ffn_dim=128, text_len=512)
VAE_NAME = "wan_2.1_vae.safetensors"
TE_FP8_NAME = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
TE_FP16_NAME = "umt5_xxl_fp16.safetensors"


def text_encoder_state(model, spiece: bytes | None, *, fp8: bool) -> tuple[dict, dict]:
    """(file state in transformers names, the fp32 weights it decodes to), ComfyUI's conventions:
    fp8 matrices with a `.scale_weight` each and a `scaled_fp8` marker, the rest in fp16, and the
    sentencepiece model as a uint8 `spiece_model`."""
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    stored, decoded = {}, {}
    for key, value in model.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight: ComfyUI files keep one
        if fp8 and key in linear:
            scale = value.abs().max().float() / 448.0
            q = (value.float() / scale).to(torch.float8_e4m3fn)
            stored[key] = q
            stored[key.removesuffix("weight") + "scale_weight"] = scale.reshape(1)
            decoded[key] = q.float() * scale
        else:
            stored[key] = value.to(torch.float16).contiguous()
            decoded[key] = stored[key].float()
    if fp8:
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if spiece is not None:
        stored["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    return stored, decoded


def save_comfy_models(root: Path, *, te_fp8: bool = True, seed: int = 0, others: bool = True) -> Path:
    """root/models/{diffusion_models,text_encoders,vae}/ with the tiny DiT and VAE (wanfit.demo's) and
    a tiny umT5 of the DiT's text width; returns the models/ folder."""
    from wanfit.demo import tiny_pipeline
    from wanfit.models.dit import WanDiT

    models = Path(root) / "models"
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    pipe = tiny_pipeline(device="cpu", seed=seed)
    torch.manual_seed(seed)
    state = WanDiT(COMFY_TINY).state_dict()
    dit = {COMFY_PREFIX + k: v.to(torch.float16).contiguous() for k, v in state.items()}
    save_file(dit, str(models / "diffusion_models" / DIT_NAME))
    save_file(
        {k: v.to(torch.float16).contiguous() for k, v in pipe.vae.state_dict().items()},
        str(models / "vae" / VAE_NAME),
    )
    tokenizer = tiny_text.train_tokenizer(Path(root) / "spm")
    spiece = (tokenizer / "spiece.model").read_bytes()
    text, _ = text_encoder_state(tiny_text.make_umt5(seed), spiece, fp8=te_fp8)
    save_file(text, str(models / "text_encoders" / (TE_FP8_NAME if te_fp8 else TE_FP16_NAME)))
    if others:  # what else a ComfyUI folder holds: an image-to-video DiT, a CLIP text encoder
        i2v = {**dit, COMFY_PREFIX + "img_emb.proj.0.weight": torch.ones(4)}
        save_file(i2v, str(models / "diffusion_models" / "wan2.1_i2v_tiny_fp16.safetensors"))
        clip = {"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 4)}
        save_file(clip, str(models / "text_encoders" / "clip_l.safetensors"))
    return models
