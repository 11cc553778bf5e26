"""Write a trained checkpoint as the built-in model's release folder (official layout, safetensors).

    python -m training.export runs/builtin/checkpoint src/wanfit/builtin/model

File names come from wanfit.weights.file_names.BUILTIN_FILES. The DiT and the text encoder are the
EMA weights; the DiT and VAE are stored in fp16, the text encoder in bf16 (as its name says).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from wanfit.builtin import BUILTIN_DIT, BUILTIN_TEXT
from wanfit.models.vae import WanVAE
from wanfit.weights import t5_keys
from wanfit.weights.file_names import BUILTIN_FILES


@torch.no_grad()
def fold_latent_stats(vae: WanVAE, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Rescale the VAE so its raw latents have the release's per-channel mean and std.

    The loaders give every Wan2.1 VAE file the release's latent statistics, and the pipeline
    normalises with them; a VAE trained here has its own (`mean`, `std`, measured). The encoder's
    last 1x1 conv (conv1, mean half) and the decoder's first (conv2) are linear, so the change
    z' = (z - mean) / std * S + M folds into their weights exactly, and normalize(z') = (z - mean) / std.
    """
    z_dim = vae.config.z_dim
    target_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float64)
    target_std = torch.tensor(vae.config.latents_std, dtype=torch.float64)
    mean, std = mean.double().cpu(), std.double().cpu()
    scale = target_std / std  # z' = z * scale + offset
    offset = target_mean - mean * scale
    w1, b1 = vae.conv1.weight, vae.conv1.bias  # [2z, 2z, 1, 1, 1]: mean rows, then log-variance rows
    w1_new, b1_new = w1.double().cpu().clone(), b1.double().cpu().clone()
    w1_new[:z_dim] *= scale.view(-1, 1, 1, 1, 1)
    b1_new[:z_dim] = b1_new[:z_dim] * scale + offset
    b1_new[z_dim:] += 2 * scale.log()  # the variance scales with the mean
    w2, b2 = vae.conv2.weight, vae.conv2.bias  # [z, z, 1, 1, 1] reads z = (z' - offset) / scale
    w2d = w2.double().cpu()
    b2_new = b2.double().cpu() - (w2d[:, :, 0, 0, 0] @ (offset / scale))
    w2_new = w2d / scale.view(1, -1, 1, 1, 1)
    for param, value in ((w1, w1_new), (b1, b1_new), (w2, w2_new), (b2, b2_new)):
        param.copy_(value.to(param))


def export(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """The checkpoint's VAE, EMA DiT and EMA text encoder, and its tokenizer, as a model folder."""
    from training import checkpoint
    from training.train import build_models

    state = checkpoint.load(checkpoint_path)
    if state["phase"] == "vae":
        raise SystemExit(f"{checkpoint_path} is still in the VAE phase: there is no DiT to export yet.")
    tokenizer_files = state["tokenizer_files"]
    vocab = BUILTIN_TEXT["vocab_size"]
    vae, dit, text = build_models(0, vocab)
    vae.load_state_dict(state["vae"])
    dit.load_state_dict(state["dit"])
    text.load_state_dict(state["text"])
    if state["ema"] is not None:  # DiT parameters first, then the text encoder's (train.Run._trainable)
        params = list(dit.parameters()) + list(text.parameters())
        with torch.no_grad():
            for p, shadow in zip(params, state["ema"]):
                p.copy_(shadow)
    return write_model_folder(vae, dit, text, tokenizer_files, out_dir)


def write_model_folder(vae, dit, text, tokenizer_files: dict[str, bytes], out_dir: str | Path) -> Path:
    """Write the folder next to `out_dir`, then swap it in: never a half-written model."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in dit.state_dict().items()}
    save_file(half, str(staging / BUILTIN_FILES["dit"]))
    config = {"_class_name": "WanModel", "model_type": "t2v", **BUILTIN_DIT.to_dict()}
    (staging / BUILTIN_FILES["dit_config"]).write_text(json.dumps(config, indent=2) + "\n")
    vae_half = {k: v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()}
    save_file(vae_half, str(staging / BUILTIN_FILES["vae"]))
    official = {}
    for name, tensor in text.state_dict().items():
        target = t5_keys.transformers_to_official_name(name)
        if target is not None:
            official[target] = tensor.detach().to(torch.bfloat16).contiguous()
    save_file(official, str(staging / BUILTIN_FILES["text_encoder"]))
    tokenizer_dir = staging / BUILTIN_FILES["tokenizer"]
    tokenizer_dir.mkdir(parents=True)
    for name, data in tokenizer_files.items():
        (tokenizer_dir / name).write_bytes(data)
    for path in [staging, *staging.rglob("*")]:  # mkdtemp made the folder private
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="OUT/checkpoint (without the .NNN)")
    p.add_argument("out", type=Path, help="the model folder to write")
    args = p.parse_args()
    print(export(args.checkpoint, args.out))


if __name__ == "__main__":
    main()
