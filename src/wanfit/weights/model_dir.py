"""Finding the parts of a model: an official release folder, a diffusers folder, a ComfyUI models/
folder, or component files named one by one (which also replace a folder's own)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from wanfit.errors import CheckpointError
from wanfit.paths import user_path
from wanfit.weights.file_names import (
    COMFY_DIT,
    COMFY_MODELS,
    COMFY_TEXT_ENCODER,
    COMFY_VAE,
    DIFFUSERS_DIT,
    DIFFUSERS_INDEX,
    DIFFUSERS_SCHEDULER_CONFIG,
    DIFFUSERS_TEXT_ENCODER,
    DIFFUSERS_TOKENIZER,
    DIFFUSERS_VAE,
    DIFFUSERS_WEIGHTS,
    OFFICIAL_T5,
    OFFICIAL_T5_SAFETENSORS,
    OFFICIAL_TOKENIZER,
    OFFICIAL_VAE,
    OFFICIAL_VAE_SAFETENSORS,
)

COMPONENTS = ("dit", "vae", "text_encoder")


@dataclass(frozen=True)
class ModelFiles:
    """Where each part of a text-to-video model lives."""

    layout: str  # "official", "diffusers", "comfyui", or "files" (components named one by one)
    root: Path
    dit: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path | None  # None: beside the text encoder's file, or inside it (ComfyUI)
    scheduler_config: Path | None = None
    given: frozenset[str] = frozenset()  # the parts named one by one (--dit, --vae, --text-encoder)


def find_model_files(
    root: str | Path | None = None,
    *,
    dit: str | Path | None = None,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> ModelFiles:
    """Detect the layout of a model folder and name its parts, or say what is missing.

    dit / vae / text_encoder / tokenizer: files (or folders) that replace the folder's own part; with
    all three of dit, vae and text_encoder no folder is needed.
    """
    given = {"dit": dit, "vae": vae, "text_encoder": text_encoder}
    given = {name: user_path(path) for name, path in given.items() if path is not None}
    for name, path in given.items():
        if not path.exists():
            raise CheckpointError(f"--{name.replace('_', '-')} {path} does not exist.")
    tok = user_path(tokenizer) if tokenizer is not None else None
    if tok is not None and not tok.is_dir():
        raise CheckpointError(f"--tokenizer must be a tokenizer folder, but {tok} is not one.")
    if root is None:
        missing = [f"--{n.replace('_', '-')}" for n in COMPONENTS if n not in given]
        if missing:
            raise CheckpointError(
                f"Without --model, name every part of the model: {', '.join(missing)} missing."
            )
        parent = given["dit"].parent
        return ModelFiles("files", parent, tokenizer=tok, given=frozenset(given), **given)
    files = _detect(user_path(root), frozenset(given))
    return replace(files, **given, tokenizer=tok or files.tokenizer, given=frozenset(given))


def _detect(root: Path, given: frozenset[str]) -> ModelFiles:
    """The folder's own parts; the `given` ones need not be there."""
    if not root.exists():
        raise CheckpointError(f"Model folder not found: {root}.")
    if not root.is_dir():
        raise CheckpointError(f"--model must be a model folder, but {root} is a file.")
    if (root / DIFFUSERS_DIT).is_dir() or (root / DIFFUSERS_INDEX).is_file():
        names = {"dit": DIFFUSERS_DIT, "vae": DIFFUSERS_VAE, "text_encoder": DIFFUSERS_TEXT_ENCODER}
        parts = {part: root / name for part, name in names.items()}
        missing = [
            f"{names[part]}/" for part, path in parts.items() if part not in given and not path.is_dir()
        ]
        if not (root / DIFFUSERS_TOKENIZER).is_dir() and "text_encoder" not in given:
            missing.append(f"{DIFFUSERS_TOKENIZER}/")
        if missing:
            raise CheckpointError(f"The diffusers-layout folder {root} lacks {', '.join(missing)}.")
        scheduler = root / DIFFUSERS_SCHEDULER_CONFIG
        tokenizer = root / DIFFUSERS_TOKENIZER
        return ModelFiles(
            "diffusers",
            root,
            tokenizer=tokenizer if tokenizer.is_dir() else None,
            scheduler_config=scheduler if scheduler.is_file() else None,
            **parts,
        )
    dit_files = f"{DIFFUSERS_WEIGHTS}*.safetensors"
    has_dit = any(root.glob(dit_files))
    vae = _either(root, OFFICIAL_VAE, OFFICIAL_VAE_SAFETENSORS)
    if has_dit or vae is not None:
        t5 = _either(root, OFFICIAL_T5, OFFICIAL_T5_SAFETENSORS)
        wanted = {
            dit_files: has_dit or "dit" in given,
            f"{OFFICIAL_VAE} (or {OFFICIAL_VAE_SAFETENSORS})": vae is not None or "vae" in given,
            f"{OFFICIAL_T5} (or {OFFICIAL_T5_SAFETENSORS})": t5 is not None or "text_encoder" in given,
            f"{OFFICIAL_TOKENIZER}/": (root / OFFICIAL_TOKENIZER).is_dir() or "text_encoder" in given,
        }
        missing = [name for name, ok in wanted.items() if not ok]
        if missing:
            raise CheckpointError(f"The official-layout folder {root} lacks {', '.join(missing)}.")
        tokenizer = root / OFFICIAL_TOKENIZER
        return ModelFiles(
            "official",
            root,
            dit=root,
            vae=vae or root / OFFICIAL_VAE,
            text_encoder=t5 or root / OFFICIAL_T5,
            tokenizer=tokenizer if tokenizer.is_dir() else None,
        )
    comfy = root / COMFY_MODELS if _is_comfy(root / COMFY_MODELS) else root
    if _is_comfy(comfy):
        from wanfit.weights import comfy_files

        return comfy_files.find(comfy, given)
    raise CheckpointError(
        f"{root} is neither an official Wan2.1 release folder ({DIFFUSERS_WEIGHTS}*.safetensors, "
        f"{OFFICIAL_VAE}, {OFFICIAL_T5}, {OFFICIAL_TOKENIZER}/), a diffusers-layout folder "
        f"({DIFFUSERS_DIT}/, {DIFFUSERS_VAE}/, {DIFFUSERS_TEXT_ENCODER}/, {DIFFUSERS_TOKENIZER}/) nor a "
        f"ComfyUI models/ folder ({COMFY_DIT[0]}/, {COMFY_TEXT_ENCODER[0]}/, {COMFY_VAE[0]}/)."
    )


def _is_comfy(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_dir() for name in (*COMFY_DIT, *COMFY_TEXT_ENCODER))


def _either(root: Path, *names: str) -> Path | None:
    """The first of `names` that is a file in root (the released pickle, then its safetensors twin)."""
    return next((root / name for name in names if (root / name).is_file()), None)
