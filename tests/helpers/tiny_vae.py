"""A tiny random diffusers AutoencoderKLWan, saved in every layout wanfit reads.

The official names are produced here by walking the diffusers module tree (by module type), not
with wanfit's key converter, so tests that compare the two check the converter independently.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Same topology as the released VAE (4 levels, 2 residual blocks, temporal down at levels 2 and 3)
# at 1/12 of the width. RMS norms and the single-head attention accept any width.
TINY_VAE_KWARGS = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
)


def make_tiny_diffusers_vae(seed: int = 0, **overrides):
    """A diffusers AutoencoderKLWan with random weights, norm gains and biases included."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    kwargs = {**TINY_VAE_KWARGS, **overrides}
    z_dim = kwargs["z_dim"]
    kwargs.setdefault("latents_mean", torch.randn(z_dim).mul(0.5).tolist())
    kwargs.setdefault("latents_std", torch.rand(z_dim).add(0.5).tolist())
    model = AutoencoderKLWan(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # ones by default: randomise so a mix-up shows
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def make_tiny_wanfit_vae(seed: int = 0, **overrides):
    """(diffusers reference, wanfit WanVAE) with the same random weights and latent statistics."""
    from wanfit.models.vae import VAEConfig, WanVAE

    ref = make_tiny_diffusers_vae(seed, **overrides)
    fields = (
        "base_dim",
        "z_dim",
        "dim_mult",
        "num_res_blocks",
        "temperal_downsample",
        "latents_mean",
        "latents_std",
    )
    cfg = VAEConfig.from_dict({k: ref.config[k] for k in fields})
    ours = WanVAE(cfg).eval()
    ours.load_state_dict(official_state_dict(ref), strict=True)
    return ref, ours.requires_grad_(False)


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under the names of the official Wan2.1_VAE.pth."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock

    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, module) -> None:
        if isinstance(module, WanResidualBlock):
            parts = {
                "residual.0": module.norm1,
                "residual.2": module.conv1,
                "residual.3": module.norm2,
                "residual.6": module.conv2,
            }
            if not isinstance(module.conv_shortcut, torch.nn.Identity):
                parts["shortcut"] = module.conv_shortcut
            for name, sub in parts.items():
                put(f"{prefix}.{name}", sub)
            return
        for name, tensor in module.state_dict().items():  # attention, resample, conv, norm: same leaves
            out[f"{prefix}.{name}"] = tensor.detach().clone()

    for side in ("encoder", "decoder"):
        part = getattr(model, side)
        put(f"{side}.conv1", part.conv_in)
        mid = part.mid_block
        put(f"{side}.middle.0", mid.resnets[0])
        put(f"{side}.middle.1", mid.attentions[0])
        put(f"{side}.middle.2", mid.resnets[1])
        put(f"{side}.head.0", part.norm_out)
        put(f"{side}.head.2", part.conv_out)
    for i, block in enumerate(model.encoder.down_blocks):
        put(f"encoder.downsamples.{i}", block)
    flat = [m for up in model.decoder.up_blocks for m in [*up.resnets, *(up.upsamplers or [])]]
    for i, block in enumerate(flat):
        put(f"decoder.upsamples.{i}", block)
    put("conv1", model.quant_conv)
    put("conv2", model.post_quant_conv)
    return out


def save_diffusers_layout(model, folder: Path) -> Path:
    """A diffusers `vae/` folder: config.json + diffusion_pytorch_model.safetensors."""
    model.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def save_official_pth(model, path: Path) -> Path:
    torch.save(official_state_dict(model), str(path))
    return Path(path)


def save_single_safetensors(model, path: Path, naming: str = "official", prefix: str = "") -> Path:
    from safetensors.torch import save_file

    state = official_state_dict(model) if naming == "official" else model.state_dict()
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
