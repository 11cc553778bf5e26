"""What `wanfit generate` writes and what it may replace (issue 10 §1, §2, §5): --overwrite replaces only
what wanfit wrote, atomically; the message, sidecar and file metadata give what was really written;
the extension picks the format; `~` and $VARS are expanded; the Python API's save_video and "builtin".

Every run is the built-in tiny model in-process; each refusal is checked for its exit code, its one
sentence, no work done and every user file as it was.
"""

import errno
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import wanfit
from tests.test_cli_generate import (
    _isolated,  # noqa: F401  (autouse: no emulation, a fresh dispatcher)
    failing_mp4_writer,
    failing_png_writer,
    files_in,
    one_error_line,
)
from wanfit.cli import main
from wanfit.commands.generate import what_was_written
from wanfit.errors import ConfigError
from wanfit.video import FOLDER_MARKER, read_mp4_comment, read_video

RUN = ["generate", "--size", "48x32", "--frames", "5", "--steps", "1", "--no-progress"]


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `wanfit generate ...` (RUN plus argv)."""
    code = main([*RUN, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(folder):
    """Every file under `folder` with its bytes: to show that nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def refused(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "", (code, out, err)
    return one_error_line(err)


# --- §1: --overwrite never destroys a user's files ------------------------------------------------------


def test_overwrite_refuses_a_folder_holding_a_users_files(capsys, tmp_path, monkeypatch):
    # The reproduction: mkdir -p V/trip && echo x > V/trip/a.jpg && generate --out V --overwrite
    monkeypatch.chdir(tmp_path)
    (tmp_path / "V" / "trip").mkdir(parents=True)
    (tmp_path / "V" / "trip" / "a.jpg").write_text("x")
    (tmp_path / "W").mkdir()
    (tmp_path / "W" / "frame_0000.png").write_bytes(b"a user's own PNG")  # frames, but not wanfit's
    before = snapshot(tmp_path)
    line = refused(capsys, "--out", "V", "--overwrite")
    assert "V holds files wanfit did not write (trip/)" in line and "nothing was changed" in line
    line = refused(capsys, "--out", "W", "--overwrite")
    assert "W holds PNG frames without wanfit's marker" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "out,expected",
    [
        ("..", ".. holds the current folder"),
        (".", ". is the current folder"),
        ("../..", "../.. holds the current folder"),
        ("~", "is your home folder"),
        ("$HOME", "is your home folder"),
    ],
)
def test_the_current_folder_its_parents_and_home_are_never_an_output(
    capsys, tmp_path, monkeypatch, out, expected
):
    # cd parent/child && generate --out .. --overwrite used to empty parent, child included.
    child = tmp_path / "parent" / "child"
    child.mkdir(parents=True)
    (child / "notes.txt").write_text("mine")
    (tmp_path / "parent" / "photo.jpg").write_text("mine too")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".bashrc").write_text("mine as well")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(child)
    before = snapshot(tmp_path)
    for flags in (["--overwrite"], []):  # refused for what it is, not for "already exists"
        line = refused(capsys, "--out", out, *flags)
        assert expected in line and "never writes an output over" in line
    assert snapshot(tmp_path) == before


def test_the_model_folder_is_never_an_output(capsys, tmp_path):
    from tests.helpers.tiny_model_dir import save_demo_official_layout

    model = save_demo_official_layout(tmp_path / "model")
    before = snapshot(tmp_path)
    line = refused(capsys, "--model", str(model), "--out", str(model), "--overwrite")
    assert f"{model} is the model folder" in line
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_what_wanfit_wrote(capsys, tmp_path):
    frames, video = tmp_path / "frames", tmp_path / "v.mp4"
    assert run(capsys, "--out", str(frames), "--seed", "1")[0] == 0
    assert run(capsys, "--out", str(video), "--seed", "1")[0] == 0
    assert (frames / FOLDER_MARKER).is_file()
    first = read_video(frames)
    for out in (frames, video):
        code, stdout, _ = run(capsys, "--out", str(out), "--seed", "2", "--overwrite")
        assert code == 0 and f"wrote {out}" in stdout
        assert json.loads((tmp_path / (out.stem + ".json")).read_text())["seed"] == 2
    assert not np.array_equal(read_video(frames), first)
    # A folder of frames from before the marker existed is recognised by its sidecar; an empty one is harmless.
    (frames / FOLDER_MARKER).unlink()
    assert run(capsys, "--out", str(frames), "--overwrite")[0] == 0
    (tmp_path / "empty").mkdir()
    assert run(capsys, "--out", str(tmp_path / "empty"), "--overwrite")[0] == 0
    assert len(list((tmp_path / "empty").glob("frame_*.png"))) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary, no old copy left


@pytest.mark.parametrize("kind", ["mp4", "png"])
def test_a_failed_replacement_keeps_the_old_output(capsys, tmp_path, monkeypatch, kind):
    out = tmp_path / ("v.mp4" if kind == "mp4" else "v")
    assert run(capsys, "--out", str(out))[0] == 0
    before = snapshot(tmp_path)
    fail = failing_mp4_writer if kind == "mp4" else failing_png_writer
    fail(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    code, stdout, err = run(capsys, "--out", str(out), "--seed", "9", "--overwrite")
    assert code == 2 and "No space left on device" in one_error_line(err) and "wrote" not in stdout
    assert snapshot(tmp_path) == before  # the old output, its sidecar, and nothing else


def test_a_folder_that_gains_a_users_file_during_the_run_is_not_replaced(capsys, tmp_path, monkeypatch):
    out = tmp_path / "v"
    assert run(capsys, "--out", str(out))[0] == 0
    from wanfit import pipeline

    real = pipeline.WanPipeline.decode

    def decode(self, latents, **kwargs):  # the user drops a file in the folder while the run is under way
        (out / "holiday.jpg").write_text("mine")
        return real(self, latents, **kwargs)

    monkeypatch.setattr(pipeline.WanPipeline, "decode", decode)
    before_frames = {p.name: p.read_bytes() for p in out.glob("frame_*.png")}
    code, _, err = run(capsys, "--out", str(out), "--seed", "5", "--overwrite")
    assert code == 2 and "holds files wanfit did not write (holiday.jpg)" in one_error_line(err)
    assert (out / "holiday.jpg").read_text() == "mine"
    assert {p.name: p.read_bytes() for p in out.glob("frame_*.png")} == before_frames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v", "v.json"]


def test_a_sidecar_that_is_not_wanfits_is_never_replaced(capsys, tmp_path):
    (tmp_path / "v.json").write_text('{"my": "settings"}')
    before = snapshot(tmp_path)
    line = refused(capsys, "--out", str(tmp_path / "v.mp4"), "--overwrite")
    assert "v.json is not a metadata file wanfit wrote" in line
    assert snapshot(tmp_path) == before
    # Nor the sidecar of another output that shares its name (o.gif's o.json for o.webm).
    assert run(capsys, "--out", str(tmp_path / "o.gif"))[0] == 0
    line = refused(capsys, "--out", str(tmp_path / "o.webm"), "--overwrite")
    assert f"o.json holds the metadata of another output, {tmp_path / 'o.gif'}" in line
    assert json.loads((tmp_path / "o.json").read_text())["out"] == str(tmp_path / "o.gif")


# --- §2: say what was written; the format the extension names ---------------------------------------------


def test_a_downscaled_output_says_its_real_size_everywhere(capsys, tmp_path):
    out = tmp_path / "v.mp4"
    code, stdout, _ = run(capsys, "--out", str(out), "--set", "output_size=32x16x1")
    assert code == 0
    assert (
        f"wrote {out} (1 frame, 32x16; downscaled from 5 frames at 48x32: asked for with --set output_size)"
        in stdout
    )
    assert read_video(out).shape == (1, 16, 32, 3)
    for meta in (read_mp4_comment(out), json.loads((tmp_path / "v.json").read_text())):
        assert meta["size"] == "32x16" and meta["frames"] == 1
        assert meta["downscaled"] == {
            "from_size": "48x32",
            "from_frames": 5,
            "reason": "asked for with --set output_size",
        }


def test_allow_downscale_under_a_small_vram_says_the_real_size(capsys, tmp_path):
    # The case (--vram 30MiB --allow-downscale at 320x192 wrote 272x160 but said 320x192), on a
    # smaller job; the budget is the first the planner downscales under, found by asking it.
    from wanfit.errors import PlanError
    from wanfit.plan.planning import Constraints, model_request, plan_for

    request = model_request(None, width=96, height=64, frames=9)
    for mib in range(1, 64):
        try:
            result = plan_for(request, Constraints(vram=mib * 2**20, device="cpu", allow_downscale=True))
        except PlanError:
            continue
        break
    assert result.requested is not None, "the first budget that fits should be a downscaled one"
    width, height, frames = result.plan.output_size
    out = tmp_path / "v.mp4"
    code, stdout, err = run(capsys, "--size", "96x64", "--frames", "9", "--vram", f"{mib}MiB", "--allow-downscale",
                            "--out", str(out))  # fmt: skip
    assert code == 0 and "DOWNSCALED" in err
    assert f"wrote {out} ({frames} frames, {width}x{height}; downscaled from 9 frames at 96x64: " in stdout
    assert "does not fit the memory budget (--vram" in stdout
    assert read_video(out).shape == (frames, height, width, 3)
    for meta in (read_mp4_comment(out), json.loads((tmp_path / "v.json").read_text())):
        assert (meta["size"], meta["frames"]) == (f"{width}x{height}", frames)
        assert (
            meta["downscaled"]["from_size"] == "96x64" and "--allow-downscale" in meta["downscaled"]["reason"]
        )


def test_the_planners_downscale_names_the_budget():
    frames = np.zeros((5, 32, 48, 3), np.uint8)
    request = {"size": "96x64", "frames": 9}
    budget = SimpleNamespace(device_bytes=6 * 2**20, source="--vram 0.01 GiB")
    planned = SimpleNamespace(requested=object(), budget=budget)  # what plan_for returns after downscaling
    assert what_was_written(frames, request, planned)["downscaled"] == {
        "from_size": "96x64",
        "from_frames": 9,
        "reason": "the requested size does not fit the memory budget (--vram 0.01 GiB) and --allow-downscale was given",
    }
    assert what_was_written(frames, {"size": "48x32", "frames": 5}, planned) == {"size": "48x32", "frames": 5}


@pytest.mark.parametrize("name", ["o.gif", "o.webm", "o.mp4", "frames"])
def test_the_extension_picks_the_format(capsys, tmp_path, name):
    out = tmp_path / name
    code, stdout, _ = run(capsys, "--out", str(out))
    assert code == 0 and f"wrote {out} (5 frames, 48x32)" in stdout
    assert out.is_dir() == (name == "frames")
    frames = read_video(out)
    assert frames.shape == (5, 32, 48, 3)
    if name != "frames":
        magic = out.read_bytes()[:12]
        assert {"o.gif": magic[:6] == b"GIF89a", "o.webm": magic[:4] == b"\x1a\x45\xdf\xa3",
                "o.mp4": magic[4:8] == b"ftyp"}[name]  # fmt: skip
    if name in ("o.webm", "o.mp4"):
        assert read_mp4_comment(out)["frames"] == 5
    sidecar = json.loads((tmp_path / ((out.stem if name != "frames" else name) + ".json")).read_text())
    assert sidecar["size"] == "48x32" and sidecar["tool"] == "wanfit"


def test_an_unsupported_extension_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    from wanfit import pipeline

    monkeypatch.setattr(pipeline.WanPipeline, "__call__", lambda *a, **k: pytest.fail("work was done"))
    line = refused(capsys, "--out", str(tmp_path / "o.avi"))
    assert (
        "wanfit cannot write .avi files" in line
        and "mp4, webm and gif files, or a folder of PNG frames" in line
    )
    assert files_in(tmp_path) == []


def test_demo_outputs_are_ignored_by_git():
    from pathlib import Path

    ignored = (Path(__file__).parents[1] / ".gitignore").read_text().split()
    assert "/demo.json" in ignored and "*.mp4" in ignored


# --- §5: paths and the Python API -------------------------------------------------------------------------


def test_tilde_and_variables_are_expanded_in_cli_paths(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OUTDIR", str(tmp_path / "videos"))
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "--out", "~/v.mp4", "--checkpoint-every", "1")[0] == 0
    assert (tmp_path / "home" / "v.mp4").is_file() and not (tmp_path / "~").exists()
    assert run(capsys, "--out", "$OUTDIR/frames")[0] == 0
    assert (tmp_path / "videos" / "frames" / "frame_0004.png").is_file() and not (
        tmp_path / "$OUTDIR"
    ).exists()


def test_from_pretrained_expands_the_path_and_knows_builtin(tmp_path, monkeypatch):
    from tests.helpers.tiny_model_dir import save_demo_official_layout
    from wanfit.builtin import NAME, SAMPLING, builtin_pipeline

    folder = save_demo_official_layout(tmp_path / "models" / "tiny")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MODELS", str(tmp_path / "models"))
    kwargs = dict(height=32, width=48, num_frames=5, num_inference_steps=1, progress=False)
    expected = wanfit.WanPipeline.from_pretrained(folder, device="cpu")("a fox", **kwargs)
    for name in ("~/models/tiny", "$MODELS/tiny"):
        pipe = wanfit.WanPipeline.from_pretrained(name, device="cpu")
        assert pipe.name == str(folder) and np.array_equal(pipe("a fox", **kwargs), expected)
    builtin = wanfit.WanPipeline.from_pretrained("builtin", device="cpu", progress=False)
    assert builtin.name == NAME and builtin.defaults == SAMPLING  # the shipped model, its own defaults
    assert np.array_equal(builtin("a fox", **kwargs), builtin_pipeline(device="cpu")("a fox", **kwargs))
    assert wanfit.load_vae("~/models/tiny", device="cpu") is not None
    assert wanfit.load_dit("$MODELS/tiny", device="cpu").config.dim == pipe.dit.config.dim


def test_the_python_api_refuses_the_seeds_the_cli_refuses(capsys, tmp_path):
    pipe = wanfit.WanPipeline.from_pretrained("builtin", device="cpu", progress=False)
    for seed in (-1, 2**63, 1.5):
        with pytest.raises(ConfigError) as err:
            pipe("a fox", height=32, width=48, num_frames=5, num_inference_steps=1, seed=seed, progress=False)
        assert str(err.value) == f"The seed must be a whole number from 0 to 2**63-1, got {seed!r}."
    kwargs = dict(height=32, width=48, num_frames=5, num_inference_steps=1, progress=False)
    assert np.array_equal(pipe("a fox", seed=np.int64(3), **kwargs), pipe("a fox", seed=3, **kwargs))
    line = refused(capsys, "--seed", "-1", "--out", str(tmp_path / "v.mp4"))
    assert line == "wanfit: error: The seed must be a whole number from 0 to 2**63-1, got -1."
    assert files_in(tmp_path) == []


def test_save_video_writes_every_format_and_refuses_what_generate_refuses(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    frames = wanfit.WanPipeline.from_pretrained("builtin", device="cpu")(
        "a fox", height=32, width=48, num_frames=5, num_inference_steps=1, progress=False
    )
    for name in ("~/v.mp4", "~/w.webm", "~/g.gif", "~/frames"):
        path = wanfit.save_video(frames, name, metadata={"prompt": "a fox"})
        assert path == home / name[2:] and read_video(path).shape == frames.shape
    assert np.array_equal(read_video(home / "frames"), frames)  # PNG: lossless
    assert json.loads((home / "frames.json").read_text()) == {"prompt": "a fox", "tool": "wanfit"}
    with pytest.raises(ConfigError, match=r"already exists; pass overwrite=True to replace it"):
        wanfit.save_video(frames, home / "v.mp4")
    wanfit.save_video(frames[:1], home / "v.mp4", overwrite=True)
    assert read_video(home / "v.mp4").shape[0] == 1
    (work / "mine").mkdir()
    (work / "mine" / "a.jpg").write_text("x")
    for path, expected in (
        ("mine", "holds files wanfit did not write (a.jpg)"),
        (".", "is the current folder"),
        ("~", "is your home folder"),
        ("v.avi", "wanfit cannot write .avi files"),
    ):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            wanfit.save_video(frames, path, overwrite=True)
    assert files_in(work) == ["mine", "mine/a.jpg"]
    with pytest.raises(ConfigError, match=re.escape("uint8 frames [F, H, W, 3]")):
        wanfit.save_video(torch.zeros(5, 32, 48, 3), "f.mp4")
