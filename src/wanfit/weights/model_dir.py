"""Finding the parts of a model folder: the official release layout or the diffusers layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wanfit.errors import CheckpointError
from wanfit.paths import user_path
from wanfit.weights.file_names import (
    DIFFUSERS_DIT,
    DIFFUSERS_INDEX,
    DIFFUSERS_SCHEDULER_CONFIG,
    DIFFUSERS_TEXT_ENCODER,
    DIFFUSERS_TOKENIZER,
    DIFFUSERS_VAE,
    DIFFUSERS_WEIGHTS,
    OFFICIAL_T5,
    OFFICIAL_TOKENIZER,
    OFFICIAL_VAE,
)


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
    root = user_path(root)
    if not root.exists():
        raise CheckpointError(f"Model folder not found: {root}.")
    if not root.is_dir():
        raise CheckpointError(f"--model must be a model folder, but {root} is a file.")
    if (root / DIFFUSERS_DIT).is_dir() or (root / DIFFUSERS_INDEX).is_file():
        names = (DIFFUSERS_DIT, DIFFUSERS_VAE, DIFFUSERS_TEXT_ENCODER, DIFFUSERS_TOKENIZER)
        parts = {name: root / name for name in names}
        missing = [f"{name}/" for name, path in parts.items() if not path.is_dir()]
        if missing:
            raise CheckpointError(f"The diffusers-layout folder {root} lacks {', '.join(missing)}.")
        scheduler = root / DIFFUSERS_SCHEDULER_CONFIG
        return ModelFiles(
            layout="diffusers",
            root=root,
            dit=parts[DIFFUSERS_DIT],
            vae=parts[DIFFUSERS_VAE],
            text_encoder=parts[DIFFUSERS_TEXT_ENCODER],
            tokenizer=parts[DIFFUSERS_TOKENIZER],
            scheduler_config=scheduler if scheduler.is_file() else None,
        )
    dit_files = f"{DIFFUSERS_WEIGHTS}*.safetensors"
    has_dit = any(root.glob(dit_files))
    if has_dit or (root / OFFICIAL_VAE).exists():
        wanted = {
            dit_files: has_dit,
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
        f"{root} is neither an official Wan2.1 release folder ({DIFFUSERS_WEIGHTS}*.safetensors, "
        f"{OFFICIAL_VAE}, {OFFICIAL_T5}, {OFFICIAL_TOKENIZER}/) nor a diffusers-layout folder "
        f"({DIFFUSERS_DIT}/, {DIFFUSERS_VAE}/, {DIFFUSERS_TEXT_ENCODER}/, {DIFFUSERS_TOKENIZER}/)."
    )
