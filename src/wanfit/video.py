"""Writing frames: H.264 mp4 (imageio-ffmpeg) or a folder of PNGs, atomically, with metadata.

Every writer goes to a temporary name in the destination folder and renames when complete, so a
crash or Ctrl-C never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from wanfit.errors import ConfigError

FPS = 16


def safe_filename(text: str, *, max_len: int = 60, default: str = "video") -> str:
    """A file name stem derived from free text (a prompt): letters, digits, '-' and '_' only."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:max_len].strip("_")
    return stem or default


def sidecar_path(path: Path) -> Path:
    """Where write_video puts the JSON metadata of `path`: x.mp4 -> x.json, a PNG folder x -> x.json."""
    path = Path(path)
    return path.with_suffix(".json") if path.suffix.lower() == ".mp4" else path.with_name(path.name + ".json")


def is_png_folder(path: Path) -> bool:
    """write_video writes an mp4 for a .mp4 path and a folder of PNG frames for any other."""
    return Path(path).suffix.lower() != ".mp4"


def check_writable(path: Path, *, overwrite: bool) -> None:
    """Fail early, before any work, if `path` (and its JSON sidecar) cannot be written. Creates nothing."""
    path = Path(path)
    for target in (path, sidecar_path(path)):
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise ConfigError(f"{target} already exists; pass --overwrite to replace it.")
    if path.exists():
        want_dir = is_png_folder(path)
        if path.is_dir() != want_dir:
            what = "a folder" if path.is_dir() else "a file"
            needs = "a folder of PNG frames" if want_dir else "an mp4 file"
            raise ConfigError(f"{path} is {what}, but the output would be {needs}; choose another --out.")
    # The nearest folder that exists must be a folder we can write (the rest is created on write).
    parent = _parent(path)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"Cannot create the output folder {_parent(path)}: {parent} is a file.")
    if not is_png_folder(path):
        _check_ffmpeg()
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise ConfigError(f"The output folder {parent} cannot be written: {err.strerror}.") from err


def _check_ffmpeg() -> None:
    """mp4 needs imageio-ffmpeg (which carries ffmpeg): say so before the work, not after it."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise ConfigError(
            "Writing an mp4 needs the imageio-ffmpeg package (pip install imageio-ffmpeg); "
            f"or give --out a folder name to write PNG frames ({err})."
        ) from err


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


@contextlib.contextmanager
def atomic_path(path: Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success rename it to `path`, on failure remove it.

    The temporary is hidden and ends in `.partial` (never in the final suffix), so a process killed
    mid-write leaves nothing that looks like a finished output. The result gets the usual permissions
    (umask), not the private ones of a temporary.
    """
    path = Path(path)
    parent = _parent(path)
    parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{path.name}.", ".partial"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_video(
    frames: np.ndarray, path: str | Path, *, metadata: dict | None = None, fps: int = FPS
) -> Path:
    """Write uint8 frames [F, H, W, 3] to an mp4 (H.264) or, for a path without .mp4, a PNG folder.

    `metadata` goes into the mp4's comment tag and a JSON sidecar (sidecar_path). Each file appears
    complete or not at all; the video before its sidecar.
    """
    path = Path(path)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    text = json.dumps(metadata or {}, sort_keys=True, default=str)
    if not is_png_folder(path):
        import imageio_ffmpeg

        with atomic_path(path) as tmp:
            # -f mp4: the temporary's name does not end in .mp4. yuv420p for players; +faststart so
            # the file streams; the comment carries the settings.
            height, width = frames.shape[1:3]
            writer = imageio_ffmpeg.write_frames(
                str(tmp),
                (width, height),
                fps=fps,
                codec="libx264",
                quality=8,
                pix_fmt_out="yuv420p",
                macro_block_size=1,
                ffmpeg_log_level="error",
                output_params=["-f", "mp4", "-movflags", "+faststart", "-metadata", f"comment={text}"],
            )
            writer.send(None)
            try:
                for frame in frames:
                    writer.send(np.ascontiguousarray(frame))
            finally:
                writer.close()
    else:
        import imageio.v2 as imageio

        with atomic_path(path, is_dir=True) as tmp:
            for i, frame in enumerate(frames):
                imageio.imwrite(tmp / f"frame_{i:04d}.png", frame)
    if metadata is not None:
        with atomic_path(sidecar_path(path)) as tmp:
            # ensure_ascii=False: prompts in any script stay readable in the sidecar.
            tmp.write_text(
                json.dumps(metadata, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n",
                encoding="utf-8",
            )
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Read back an mp4 or PNG folder written by write_video as uint8 [F, H, W, 3]."""
    import imageio.v2 as imageio

    path = Path(path)
    if path.is_dir():
        return np.stack([imageio.imread(p) for p in sorted(path.glob("frame_*.png"))])
    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()


def read_mp4_comment(path: str | Path) -> dict:
    """The JSON metadata stored in an mp4's comment tag by write_video."""
    import subprocess

    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    out = subprocess.run([ffmpeg, "-i", str(path), "-f", "ffmetadata", "-"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("comment="):
            return json.loads(
                line[len("comment=") :].replace("\\=", "=").replace("\\;", ";").replace("\\#", "#")
            )
    return {}
