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


def check_writable(path: Path, *, overwrite: bool) -> None:
    """Fail early, before any work, if `path` cannot be written."""
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; pass --overwrite to replace it.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"Cannot create the output folder {parent}: {err.strerror}.") from err
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"The output folder {parent} cannot be written.")


@contextlib.contextmanager
def atomic_path(path: Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success rename it to `path`, on failure remove it."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_video(
    frames: np.ndarray, path: str | Path, *, metadata: dict | None = None, fps: int = FPS
) -> Path:
    """Write uint8 frames [F, H, W, 3] to an mp4 (H.264) or, for a path without .mp4, a PNG folder.

    `metadata` goes into the mp4's comment tag and a JSON sidecar (`<name>.json`).
    """
    path = Path(path)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    text = json.dumps(metadata or {}, sort_keys=True, default=str)
    if path.suffix.lower() == ".mp4":
        import imageio.v2 as imageio

        with atomic_path(path) as tmp:
            # yuv420p for players; -movflags +faststart so the file streams; the comment carries the settings.
            writer = imageio.get_writer(
                str(tmp),
                format="FFMPEG",
                fps=fps,
                codec="libx264",
                quality=8,
                pixelformat="yuv420p",
                macro_block_size=1,
                output_params=["-movflags", "+faststart", "-metadata", f"comment={text}"],
                ffmpeg_log_level="error",
            )
            try:
                for frame in frames:
                    writer.append_data(frame)
            finally:
                writer.close()
    else:
        import imageio.v2 as imageio

        with atomic_path(path, is_dir=True) as tmp:
            for i, frame in enumerate(frames):
                imageio.imwrite(tmp / f"frame_{i:04d}.png", frame)
    if metadata is not None:
        sidecar = (
            path.with_name(path.name + ".json")
            if path.suffix.lower() != ".mp4"
            else path.with_suffix(".json")
        )
        with atomic_path(sidecar) as tmp:
            tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
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
