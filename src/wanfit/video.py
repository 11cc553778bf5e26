"""Writing frames: mp4 (H.264), webm (VP9), gif or a folder of PNGs, atomically, with metadata.

Every writer goes to a temporary name in the destination folder and renames it when complete, so a
crash or Ctrl-C never leaves a file that looks finished, and an output being replaced survives
until the new one is in place. `--overwrite` replaces only what wanfit wrote: a file of the output's
format, a JSON sidecar holding wanfit's metadata, or a PNG folder holding wanfit's marker and frames.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wanfit.errors import ConfigError

FPS = 16
PNG = "png"  # a folder of frame_0000.png, frame_0001.png, ... (lossless): an --out name without extension
FOLDER_MARKER = ".wanfit"  # in every PNG folder wanfit writes: what --overwrite recognises as its own
FRAME_FILE = re.compile(r"frame_\d{4,}\.png")
TOOL = "wanfit"  # metadata["tool"]: a sidecar with it is one wanfit wrote


@dataclass(frozen=True)
class VideoFormat:
    """How ffmpeg writes one container. `comment`: the container keeps the metadata as a comment tag."""

    codec: str
    pix_fmt: str | None
    quality: float | None  # imageio-ffmpeg's 1-10 scale, None: the codec's own settings in `params`
    params: tuple[str, ...]
    comment: bool


# The file formats --out may name by its extension.
VIDEO_FORMATS = {
    # yuv420p for players; +faststart so the file streams.
    "mp4": VideoFormat("libx264", "yuv420p", 8, ("-movflags", "+faststart"), comment=True),
    "webm": VideoFormat(
        "libvpx-vp9",
        "yuv420p",
        None,
        ("-crf", "32", "-b:v", "0", "-deadline", "good", "-cpu-used", "5", "-row-mt", "1"),
        comment=True,
    ),
    # One palette for the whole clip (palettegen), so colours do not flicker from frame to frame.
    "gif": VideoFormat(
        "gif", None, None, ("-vf", "split[a][b];[a]palettegen[p];[b][p]paletteuse", "-loop", "0"), False
    ),
}
SUPPORTED = "mp4, webm and gif files, or a folder of PNG frames (a name without an extension)"


def safe_filename(text: str, *, max_len: int = 60, default: str = "video") -> str:
    """A file name stem derived from free text (a prompt): letters, digits, '-' and '_' only."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:max_len].strip("_")
    return stem or default


def output_format(path: str | Path) -> str:
    """'mp4', 'webm' or 'gif' from the extension, PNG for a name without one; ConfigError for others."""
    suffix = Path(path).suffix.lower()
    if not suffix:
        return PNG
    if suffix[1:] in VIDEO_FORMATS:
        return suffix[1:]
    raise ConfigError(f"wanfit cannot write {suffix} files ({path}); it writes {SUPPORTED}.")


def sidecar_path(path: Path) -> Path:
    """Where write_video puts the JSON metadata of `path`: x.mp4 -> x.json, a PNG folder x -> x.json."""
    path = Path(path)
    return path.with_name(path.name + ".json") if output_format(path) == PNG else path.with_suffix(".json")


def check_writable(
    path: Path, *, overwrite: bool, protected: Sequence[Path] = (), option: str = "--overwrite"
) -> None:
    """Fail early, before any work, if `path` (and its JSON sidecar) cannot be written. Creates nothing.

    `protected`: folders never to be replaced (the model folder), besides the current folder, its
    parents and the home folder. `option`: how the caller says "overwrite" (a flag or an argument).
    """
    path = Path(path)
    fmt = output_format(path)
    _refuse_protected(path, protected)
    sidecar = sidecar_path(path)
    owner = _sidecar_owner(sidecar)
    if owner is not None and Path(owner).resolve() != path.resolve():
        raise ConfigError(
            f"{sidecar} holds the metadata of another output, {owner}; choose another output name so "
            "that each keeps its own."
        )
    for target in (path, sidecar):
        if _exists(target) and not overwrite:
            raise ConfigError(f"{target} already exists; pass {option} to replace it.")
    if _exists(path):
        check_replaceable(path)
    if _exists(sidecar) and not _is_wanfit_sidecar(sidecar):
        raise ConfigError(
            f"{sidecar} is not a metadata file wanfit wrote, and the output's metadata would replace it; "
            "choose another output name."
        )
    # The nearest folder that exists must be a folder we can write (the rest is created on write).
    parent = _parent(path)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"Cannot create the output folder {_parent(path)}: {parent} is a file.")
    if fmt != PNG:
        _check_ffmpeg(fmt)
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise ConfigError(f"The output folder {parent} cannot be written: {err.strerror}.") from err


def check_replaceable(path: Path) -> None:
    """ConfigError unless the existing `path` is an output wanfit may replace: a file of the output's
    format, or a folder holding only wanfit's marker and PNG frames (or nothing)."""
    path = Path(path)
    want_dir = output_format(path) == PNG
    if path.is_dir() != want_dir:
        what = "a folder" if path.is_dir() else "a file"
        fmt = output_format(path)
        needs = "a folder of PNG frames" if want_dir else f"{'an' if fmt == 'mp4' else 'a'} {fmt} file"
        raise ConfigError(f"{path} is {what}, but the output would be {needs}; choose another --out.")
    if not want_dir:
        return
    from wanfit.weights.io import short_list

    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    foreign = [
        e.name + ("/" if e.is_dir() else "")
        for e in entries
        if not (
            e.is_file(follow_symlinks=False) and (e.name == FOLDER_MARKER or FRAME_FILE.fullmatch(e.name))
        )
    ]
    if foreign:
        raise ConfigError(
            f"{path} holds files wanfit did not write ({short_list(foreign, 3)}), and --overwrite replaces "
            "only a folder of frames wanfit wrote; nothing was changed: choose another --out."
        )
    marked = any(e.name == FOLDER_MARKER for e in entries) or _is_wanfit_sidecar(sidecar_path(path))
    if entries and not marked:
        raise ConfigError(
            f"{path} holds PNG frames without wanfit's marker ({FOLDER_MARKER}) or metadata file, so it is "
            "not known to be a wanfit output; nothing was changed: choose another --out."
        )


def _refuse_protected(path: Path, protected: Sequence[Path]) -> None:
    """The current folder, its parents, the home folder and `protected` are never an output."""
    where = path.resolve()
    cwd = Path.cwd().resolve()
    what = None
    if where == cwd:
        what = "is the current folder"
    elif where in cwd.parents:
        what = "holds the current folder"
    elif where == _home():
        what = "is your home folder"
    elif any(where == Path(p).resolve() for p in protected):
        what = "is the model folder"
    if what is not None:
        raise ConfigError(
            f"{path} {what}, which wanfit never writes an output over; give the output a name of its own "
            "(e.g. frames or video.mp4)."
        )


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError):  # no home folder known (HOME unset, no passwd entry)
        return None


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _read_sidecar(path: Path) -> dict | None:
    """The metadata in a sidecar wanfit wrote; None for anything else (or nothing)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("tool") == TOOL else None


def finished_output_metadata(path: Path) -> dict | None:
    """The metadata of `path` if it is a finished wanfit output; None otherwise. write_video puts the
    output in place before its sidecar, each by an atomic rename, so a sidecar naming this output
    means the output is complete (a write cut short leaves no sidecar, or only a hidden .partial)."""
    path = Path(path)
    meta = _read_sidecar(sidecar_path(path))
    if meta is None or not _exists(path) or not isinstance(meta.get("out"), str):
        return None
    return meta if Path(meta["out"]).resolve() == path.resolve() else None


def _is_wanfit_sidecar(path: Path) -> bool:
    return _read_sidecar(path) is not None


def _sidecar_owner(path: Path) -> str | None:
    """The output a wanfit sidecar describes (`wanfit generate` records it), if it says."""
    owner = (_read_sidecar(path) or {}).get("out")
    return owner if isinstance(owner, str) else None


def _check_ffmpeg(fmt: str) -> None:
    """mp4, webm and gif need imageio-ffmpeg (which carries ffmpeg): say so before the work, not after it."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise ConfigError(
            f"Writing {fmt} needs the imageio-ffmpeg package (pip install imageio-ffmpeg); "
            f"or give --out a name without an extension to write PNG frames ({err})."
        ) from err


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


@contextlib.contextmanager
def atomic_path(path: Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success rename it to `path`, on failure remove it.

    The temporary is hidden and ends in `.partial` (never in the final suffix), so a process killed
    mid-write leaves nothing that looks like a finished output. The result gets the usual permissions
    (umask), not the private ones of a temporary. An existing `path` stays until the new one is complete.
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
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _replace(new: Path, path: Path) -> None:
    """Rename `new` to `path`. A folder cannot be renamed over atomically, so an existing one is moved
    aside first and removed only once `new` is in its place (put back if that fails)."""
    if not (new.is_dir() and _exists(path)):
        os.replace(new, path)  # atomic for files
        return
    check_replaceable(path)  # again: the folder may have gained files while the frames were made
    aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old.partial")
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_video(
    frames: np.ndarray, path: str | Path, *, metadata: dict | None = None, fps: int = FPS
) -> Path:
    """Write uint8 frames [F, H, W, 3] in the format `path` names (output_format): an mp4, webm or gif
    file, or a folder of PNG frames. Replaces an existing output; save_video checks first.

    `metadata` goes into a JSON sidecar (sidecar_path) and, for mp4 and webm, the file's comment tag.
    Each file appears complete or not at all; the video before its sidecar.
    """
    path = Path(path)
    fmt = output_format(path)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    if metadata is not None:
        metadata = {"tool": TOOL, **metadata}
    if fmt == PNG:
        import imageio.v2 as imageio

        with atomic_path(path, is_dir=True) as tmp:
            for i, frame in enumerate(frames):
                imageio.imwrite(tmp / f"frame_{i:04d}.png", frame)
            (tmp / FOLDER_MARKER).write_text(
                "PNG frames written by wanfit; `wanfit generate --overwrite` may replace this folder.\n"
            )
    else:
        with atomic_path(path) as tmp:
            _write_ffmpeg(frames, tmp, VIDEO_FORMATS[fmt], fmt, metadata, fps)
    if metadata is not None:
        with atomic_path(sidecar_path(path)) as tmp:
            # ensure_ascii=False: prompts in any script stay readable in the sidecar.
            tmp.write_text(
                json.dumps(metadata, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n",
                encoding="utf-8",
            )
    return path


def _write_ffmpeg(frames: np.ndarray, tmp: Path, video: VideoFormat, fmt: str, metadata, fps: int) -> None:
    import imageio_ffmpeg

    # -f: the temporary's name does not end in the format's extension.
    params = ["-f", fmt, *video.params]
    if video.comment and metadata is not None:
        params += ["-metadata", "comment=" + json.dumps(metadata, sort_keys=True, default=str)]
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(tmp),
        (width, height),
        fps=fps,
        codec=video.codec,
        quality=video.quality,
        pix_fmt_out=video.pix_fmt,
        macro_block_size=1,
        ffmpeg_log_level="error",
        output_params=params,
    )
    writer.send(None)
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def save_video(
    frames, path: str | os.PathLike, *, metadata: dict | None = None, fps: int = FPS, overwrite: bool = False
) -> Path:
    """Write frames (uint8 [F, H, W, 3], what WanPipeline returns) to `path`, as `wanfit generate` does.

    The extension picks the format: .mp4 (H.264), .webm (VP9), .gif, or none for a folder of PNG
    frames. `metadata` (a dict) goes to a JSON sidecar (x.mp4 -> x.json) and the file's comment tag.
    An existing output is refused unless `overwrite`, and even then only one wanfit wrote is replaced.
    """
    from wanfit.paths import user_path

    path = user_path(path)
    frames = np.asarray(frames)
    if not isinstance(fps, int) or fps < 1:
        raise ConfigError(f"fps must be a positive whole number, got {fps!r}.")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ConfigError(
            f"save_video takes uint8 frames [F, H, W, 3] (what WanPipeline returns), got {frames.dtype} "
            f"{list(frames.shape)}."
        )
    check_writable(path, overwrite=overwrite, option="overwrite=True")
    return write_video(frames, path, metadata=metadata, fps=fps)


def read_video(path: str | Path) -> np.ndarray:
    """Read back an output of write_video (mp4, webm, gif or PNG folder) as uint8 [F, H, W, 3]."""
    import imageio.v2 as imageio

    path = Path(path)
    if path.is_dir():
        return np.stack([imageio.imread(p) for p in sorted(path.glob("frame_*.png"))])
    if output_format(path) == "gif":
        import imageio.v3 as iio

        return iio.imread(path, index=None, plugin="pillow", mode="RGB")
    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()


def read_mp4_comment(path: str | Path) -> dict:
    """The JSON metadata stored in an mp4's (or webm's) comment tag by write_video; {} when none."""
    import subprocess

    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    out = subprocess.run([ffmpeg, "-i", str(path), "-f", "ffmetadata", "-"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.lower() == "comment":  # webm (Matroska) spells its tags in capitals
            return json.loads(value.replace("\\=", "=").replace("\\;", ";").replace("\\#", "#"))
    return {}
