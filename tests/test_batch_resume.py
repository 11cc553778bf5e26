"""`generate --prompts FILE --resume-batch`: a batch cut short is finished without making again what
it wrote (the frames equal an uninterrupted batch's), a finished output made with other settings is
that video's error (the others still run), and what was skipped is in the summary."""

import json

import numpy as np

from tests.test_cli_generate import CountingDiT
from tests.test_cli_lora import lora_file  # noqa: F401  (the fixture)
from wanfit.cli import main
from wanfit.video import read_video

# One prompt per pass, so that each video is written before the next one is denoised.
RUN = ["generate", "--size", "48x32", "--frames", "5", "--steps", "2", "--no-progress"]
RUN += ["--set", "prompts_per_pass=1"]
NAMES = ["001_a_red_fox_0.mp4", "002_two_dogs_0.mp4", "003_a_cat_0.mp4"]


def _prompts(tmp_path, lines=("a red fox", "two dogs", "a cat")):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _summary(stdout: str) -> list[dict]:
    return json.loads(stdout.strip().splitlines()[-1])["batch"]


def test_an_interrupted_batch_resumes_where_it_stopped(tmp_path, capsys, monkeypatch):
    path = _prompts(tmp_path)
    whole = tmp_path / "whole"
    assert main([*RUN, "--prompts", str(path), "--out", str(whole)]) == 0
    capsys.readouterr()

    out = tmp_path / "out"

    def interrupt_after_the_first_video(n):
        if (out / "001_a_red_fox_0.json").exists():
            (out / ".002_two_dogs_0.mp4.abc.partial").write_bytes(b"half")  # what a kill leaves
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        CountingDiT(patch, at=interrupt_after_the_first_video)
        assert main([*RUN, "--prompts", str(path), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "--resume-batch makes the rest" in err and "line 1: wrote" in err
    assert sorted(p.name for p in out.glob("*.mp4")) == [NAMES[0]]
    first = out / NAMES[0]
    before = (first.read_bytes(), first.stat().st_mtime_ns)

    dit = CountingDiT(monkeypatch)
    assert main([*RUN, "--prompts", str(path), "--out", str(out), "--resume-batch"]) == 0
    stdout = capsys.readouterr().out
    assert dit.calls > 0 and (first.read_bytes(), first.stat().st_mtime_ns) == before  # untouched
    for name in NAMES:
        assert np.array_equal(read_video(out / name), read_video(whole / name))
    assert "batch: 2 of 3 videos written, 1 skipped as done before" in stdout
    assert f"line 1: done before: {first} (skipped)" in stdout
    assert [r["skipped"] for r in _summary(stdout)] == [True, False, False]

    # Everything done: nothing is denoised again.
    dit = CountingDiT(monkeypatch)
    assert main([*RUN, "--prompts", str(path), "--out", str(out), "--resume-batch"]) == 0
    assert dit.calls == 0 and "0 of 3 videos written, 3 skipped" in capsys.readouterr().out


def test_a_finished_output_made_otherwise_is_that_videos_error(tmp_path, capsys):
    out = tmp_path / "out"
    lines = ['{"prompt": "a red fox", "out": "fox.mp4"}', "two dogs", "a cat"]
    assert main([*RUN, "--prompts", str(_prompts(tmp_path, lines)), "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "003_a_cat_0.json").unlink()  # a video whose sidecar never came: not done
    fox = (out / "fox.mp4").read_bytes()

    lines[0] = '{"prompt": "a red fox", "out": "fox.mp4", "seed": 5}'
    path = _prompts(tmp_path, lines)
    assert main([*RUN, "--prompts", str(path), "--out", str(out), "--resume-batch"]) == 2
    summary = _summary(capsys.readouterr().out)
    assert summary[0]["error"] == (
        f"{out / 'fox.mp4'} was made with seed 0, not 5 as asked now; pass --overwrite to make it again."
    )
    assert (out / "fox.mp4").read_bytes() == fox
    assert summary[1]["skipped"] and "already exists" in summary[2]["error"]

    # --overwrite makes again what differs or is unfinished, and still skips what is done.
    assert main([*RUN, "--prompts", str(path), "--out", str(out), "--resume-batch", "--overwrite"]) == 0
    summary = _summary(capsys.readouterr().out)
    assert [r["skipped"] for r in summary] == [False, True, False]
    assert json.loads((out / "fox.json").read_text())["seed"] == 5
    assert (out / "003_a_cat_0.json").is_file()


def test_another_model_is_a_difference(tmp_path, capsys):
    out = tmp_path / "out"
    path = _prompts(tmp_path, ["a cat"])
    assert main([*RUN, "--prompts", str(path), "--out", str(out)]) == 0
    capsys.readouterr()
    sidecar = out / "001_a_cat_0.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "model": str(tmp_path / "wan")}))
    assert main([*RUN, "--prompts", str(path), "--out", str(out), "--resume-batch"]) == 2
    assert (
        f"was made with model {str(tmp_path / 'wan')!r}, not None"
        in _summary(capsys.readouterr().out)[0]["error"]
    )


def test_other_loras_are_a_difference(tmp_path, capsys, lora_file):  # noqa: F811  (the fixture)
    out = tmp_path / "out"
    path = _prompts(tmp_path, ["a cat", "two dogs"])
    assert main([*RUN, "--prompts", str(path), "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "002_two_dogs_0.json").unlink()
    asked = [*RUN, "--prompts", str(path), "--out", str(out), "--resume-batch", "--lora", f"{lora_file}:0.8"]
    assert main(asked) == 2
    summary = _summary(capsys.readouterr().out)
    assert summary[0]["error"] == (
        f"{out / '001_a_cat_0.mp4'} was made with no LoRA, not LoRAs style.safetensors:0.8; pass --overwrite to make it again."
    )
    assert "already exists" in summary[1]["error"]
    assert main([*asked, "--overwrite"]) == 0
    capsys.readouterr()
    assert json.loads((out / "001_a_cat_0.json").read_text())["loras"][0]["strength"] == 0.8
    assert main(asked) == 0 and "0 of 2 videos written, 2 skipped" in capsys.readouterr().out


def test_resume_batch_needs_prompts(capsys):
    assert main([*RUN, "--resume-batch"]) == 2
    assert "--resume-batch continues a batch" in capsys.readouterr().err
