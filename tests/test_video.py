import numpy as np
import pytest

from wanfit.errors import ConfigError
from wanfit.video import (
    atomic_path,
    check_writable,
    output_format,
    read_mp4_comment,
    read_video,
    safe_filename,
    sidecar_path,
    write_video,
)


def smooth_frames(f=9, h=48, w=80):
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 3 + t * 10) % 256, (y * 5) % 256, np.full_like(x, 128)], -1) for t in range(f)]
    return np.asarray(frames, dtype=np.uint8)


def test_mp4_round_trip_keeps_count_size_and_metadata(tmp_path):
    frames = smooth_frames()
    path = write_video(frames, tmp_path / "v.mp4", metadata={"prompt": "a fox; x=1 #2", "seed": 7})
    back = read_video(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 6  # lossy H.264, smooth content
    assert read_mp4_comment(path) == {"prompt": "a fox; x=1 #2", "seed": 7, "tool": "wanfit"}
    assert (tmp_path / "v.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json", "v.mp4"]  # no temporary left


def test_png_folder_is_lossless(tmp_path):
    frames = smooth_frames(5)
    write_video(frames, tmp_path / "pngs")
    assert np.array_equal(read_video(tmp_path / "pngs"), frames)


def test_a_crash_while_writing_leaves_nothing(tmp_path):
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a video")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_and_unwritable_folders(tmp_path):
    existing = tmp_path / "a.mp4"
    existing.write_bytes(b"x")
    with pytest.raises(ConfigError, match="--overwrite"):
        check_writable(existing, overwrite=False)
    check_writable(existing, overwrite=True)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="(?i)cannot"):
        check_writable(blocker / "sub" / "v.mp4", overwrite=False)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A cat, on a mat!", "A_cat_on_a_mat"),
        ("../../etc/passwd", "etc_passwd"),
        ("日本", "video"),
        ("", "video"),
    ],
)
def test_file_names_from_prompts_are_sanitised(text, expected):
    assert safe_filename(text) == expected


def test_temporaries_are_hidden_and_never_look_finished(tmp_path):
    for name, is_dir in (("v.mp4", False), ("frames", True), ("v.json", False)):
        with atomic_path(tmp_path / name, is_dir=is_dir) as tmp:
            assert (
                tmp.parent == tmp_path and tmp.name.startswith(f".{name}.") and tmp.name.endswith(".partial")
            )
            assert tmp.is_dir() == is_dir and not (tmp_path / name).exists()
        assert (tmp_path / name).exists() and (tmp_path / name).is_dir() == is_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "v.json", "v.mp4"]


def test_a_missing_ffmpeg_is_said_before_any_work(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="imageio-ffmpeg"):
        check_writable(tmp_path / "v.mp4", overwrite=False)
    check_writable(tmp_path / "frames", overwrite=False)  # PNG frames need no ffmpeg


def test_the_extension_names_the_format_and_the_sidecar(tmp_path):
    for name, fmt, sidecar in (("v.mp4", "mp4", "v.json"), ("v.WEBM", "webm", "v.json"), ("g.gif", "gif", "g.json"),
                               ("frames", "png", "frames.json")):  # fmt: skip
        assert output_format(tmp_path / name) == fmt and sidecar_path(tmp_path / name) == tmp_path / sidecar
    for name in ("v.avi", "v.png", "run.v2"):
        with pytest.raises(
            ConfigError, match="wanfit cannot write .* files .*; it writes mp4, webm and gif files"
        ):
            output_format(name)


def test_webm_and_gif_round_trip(tmp_path):
    frames = smooth_frames(5)
    webm = write_video(frames, tmp_path / "v.webm", metadata={"seed": 1})
    gif = write_video(frames, tmp_path / "g.gif")
    assert read_video(webm).shape == frames.shape and read_mp4_comment(webm) == {"seed": 1, "tool": "wanfit"}
    assert np.abs(read_video(webm).astype(int) - frames).mean() < 8  # lossy VP9, smooth content
    back = read_video(gif).astype(float)  # 256 colours, dithered: right on average, not per pixel
    assert back.shape == frames.shape and np.abs(back.mean((1, 2)) - frames.mean((1, 2))).max() < 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.gif", "v.json", "v.webm"]  # no temporary left
