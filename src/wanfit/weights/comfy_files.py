"""The Wan2.1 files of a ComfyUI models/ folder, picked by what they hold (headers only).

ComfyUI keeps every model's files side by side (diffusion_models/, text_encoders/, vae/): a Wan2.1
text-to-video DiT sits next to image-to-video ones, umT5 next to Flux's T5 and CLIP, the Wan2.1 VAE
next to Wan2.2's. Each part is the one file of its folder that fits; none, or several, is one
sentence naming what was found and asking for --dit / --text-encoder / --vae.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from wanfit.errors import CheckpointError
from wanfit.weights.file_names import COMFY_DIT, COMFY_TEXT_ENCODER, COMFY_VAE
from wanfit.weights.io import WEIGHT_SUFFIXES, LazyStateDict, short_list


def dit_problem(path: Path) -> str | None:
    """Why `path` is no Wan2.1 text-to-video DiT, or None when it is one."""
    from wanfit.weights import dit_keys
    from wanfit.weights.dit_loader import inspect_dit

    try:
        checkpoint = inspect_dit(path)
    except CheckpointError:
        return "not a Wan2.1 DiT"
    other = dit_keys.describe_other_model([*checkpoint.keys, *checkpoint.unexpected])
    if other:
        return other
    in_dim = checkpoint.inferred_config().get("in_dim", 16)
    if in_dim != 16:
        return f"a DiT with {in_dim} input channels (image-to-video or Wan2.2)"
    return None


def text_encoder_problem(path: Path) -> str | None:
    """Why `path` is no umT5 encoder, or None when it is one."""
    from wanfit.weights import t5_keys
    from wanfit.weights.text_encoder_loader import weight_names

    try:
        names = weight_names(LazyStateDict([path]))
        t5_keys.detect_t5_format(names)
    except CheckpointError:
        return "not a umT5 text encoder"
    # umT5 gives every block its own relative position bias; T5 (Flux's t5xxl) only the first.
    if any(".block.1." in n for n in names) and not any(
        ".block.1." in n and "relative_attention_bias" in n for n in names
    ):
        return "a T5 encoder, not umT5"
    return None


def vae_problem(path: Path) -> str | None:
    """Why `path` is no Wan2.1 VAE, or None when it is one."""
    from wanfit.weights.vae_loader import inspect_vae, resolve_config

    try:
        resolve_config(inspect_vae(path), None)
    except CheckpointError as err:
        return "the Wan2.2 VAE" if "latent channels" in str(err) else "not a Wan2.1 VAE"
    return None


_PARTS: dict[str, tuple[tuple[str, ...], str, Callable[[Path], str | None]]] = {
    "dit": (COMFY_DIT, "Wan2.1 text-to-video DiT", dit_problem),
    "text_encoder": (COMFY_TEXT_ENCODER, "umT5 text encoder", text_encoder_problem),
    "vae": (COMFY_VAE, "Wan2.1 VAE", vae_problem),
}


def pick(folder: Path, part: str) -> Path:
    """The one file of `part` in the ComfyUI folder; CheckpointError naming what is there otherwise."""
    subfolders, what, problem = _PARTS[part]
    where = "/ or ".join(subfolders) + "/"
    files = [
        f
        for sub in subfolders
        if (folder / sub).is_dir()
        for f in sorted((folder / sub).iterdir())
        if f.is_file() and f.suffix in WEIGHT_SUFFIXES
    ]
    found = [(f, problem(f)) for f in files]
    fits = [f for f, why in found if why is None]
    flag = f"--{part.replace('_', '-')} FILE"
    if len(fits) == 1:
        return fits[0]
    if fits:
        names = short_list([f.name for f in fits], 4)
        raise CheckpointError(
            f"The ComfyUI folder {folder} has several {what} files in {where} ({names}); pass {flag} to pick one."
        )
    others = short_list([f"{f.name}: {why}" for f, why in found], 4)
    there = f" (it holds {others})" if found else ""
    raise CheckpointError(f"The ComfyUI folder {folder} has no {what} in {where}{there}; pass {flag}.")


def find(folder: Path, given: frozenset[str]):
    """The ModelFiles of a ComfyUI models/ folder; the `given` parts are not looked for."""
    from wanfit.weights.model_dir import COMPONENTS, ModelFiles

    parts = {part: folder if part in given else pick(folder, part) for part in COMPONENTS}
    return ModelFiles("comfyui", folder, tokenizer=None, **parts)
