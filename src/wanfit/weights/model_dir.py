"""Finding the parts of a model folder: the official release layout or the diffusers layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wanfit.errors import CheckpointError

OFFICIAL_VAE = "Wan2.1_VAE.pth"
OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_TOKENIZER = Path("google") / "umt5-xxl"


@dataclass(frozen=True)
class ModelFiles:
    """Where each part of a text-to-video model lives."""

    layout: str  # "official" or "diffusers"
    root: Path
    dit: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path
    scheduler_config: Path | None = None


def find_model_files(root: str | Path) -> ModelFiles:
    """Detect the layout of a downloaded model folder and name its parts, or say what is missing."""
    root = Path(root)
    if not root.exists():
        raise CheckpointError(f"Model folder not found: {root}.")
    if not root.is_dir():
        raise CheckpointError(f"--model must be a model folder, but {root} is a file.")
    if (root / "transformer").is_dir() or (root / "model_index.json").is_file():
        parts = {name: root / name for name in ("transformer", "vae", "text_encoder", "tokenizer")}
        missing = [f"{name}/" for name, path in parts.items() if not path.is_dir()]
        if missing:
            raise CheckpointError(f"The diffusers-layout folder {root} lacks {', '.join(missing)}.")
        scheduler = root / "scheduler" / "scheduler_config.json"
        return ModelFiles(
            layout="diffusers",
            root=root,
            dit=parts["transformer"],
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            tokenizer=parts["tokenizer"],
            scheduler_config=scheduler if scheduler.is_file() else None,
        )
    has_dit = any(root.glob("diffusion_pytorch_model*.safetensors"))
    if has_dit or (root / OFFICIAL_VAE).exists():
        wanted = {
            "diffusion_pytorch_model*.safetensors": has_dit,
            OFFICIAL_VAE: (root / OFFICIAL_VAE).is_file(),
            OFFICIAL_T5: (root / OFFICIAL_T5).is_file(),
            f"{OFFICIAL_TOKENIZER}/": (root / OFFICIAL_TOKENIZER).is_dir(),
        }
        missing = [name for name, ok in wanted.items() if not ok]
        if missing:
            raise CheckpointError(f"The official-layout folder {root} lacks {', '.join(missing)}.")
        return ModelFiles(
            layout="official",
            root=root,
            dit=root,
            vae=root / OFFICIAL_VAE,
            text_encoder=root / OFFICIAL_T5,
            tokenizer=root / OFFICIAL_TOKENIZER,
        )
    raise CheckpointError(
        f"{root} is neither an official Wan2.1 release folder (diffusion_pytorch_model*.safetensors, "
        f"{OFFICIAL_VAE}, {OFFICIAL_T5}, {OFFICIAL_TOKENIZER}/) nor a diffusers-layout folder "
        "(transformer/, vae/, text_encoder/, tokenizer/)."
    )
