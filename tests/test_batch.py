"""Batches: the prompts file (plain and JSON lines, bad lines by number), `generate --prompts` (one
load, each prompt encoded once, each video written when done, per-line errors, a summary, exit 2 if
any failed) and `pipe([...])` (one video per prompt)."""

import json

import numpy as np
import pytest

from wanfit.cli import main
from wanfit.errors import ConfigError
from wanfit.models.text_encoder import WanTextEncoder
from wanfit.prompts_file import BatchItem, LineError, read_prompts_file

RUN = ["generate", "--size", "48x32", "--frames", "5", "--steps", "2", "--no-progress"]


def test_the_prompts_file_reads_plain_and_json_lines_and_names_bad_ones(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text(
        "a red fox\n\n# a comment\n"
        '{"prompt": "two dogs", "seed": 7, "size": "64x48"}\n'
        "{oops\n"
        '{"prompt": "x", "colour": "red"}\n'
        '{"seed": 1}\n'
        "[1, 2]\n"
    )
    items = read_prompts_file(path)
    assert items[0] == BatchItem(1, "a red fox") and items[1] == BatchItem(
        4, "two dogs", {"seed": 7, "size": "64x48"}
    )
    assert [type(i) for i in items[2:]] == [LineError] * 3 + [BatchItem]  # "[1, 2]" is a plain prompt
    assert items[2].message.startswith("line 5 is not valid JSON")
    assert "unknown settings colour" in items[3].message and 'needs a "prompt"' in items[4].message


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"", "holds no prompt"), (b"# only a comment\n\n", "holds no prompt"),
     (b"fine\n\xff\xfe bad\n", "is not UTF-8 text (line 2)")],
)  # fmt: skip
def test_an_unusable_prompts_file_is_one_sentence_and_nothing_runs(tmp_path, capsys, content, message):
    path = tmp_path / "p.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_prompts_file(path)
    out = tmp_path / "out"
    assert main([*RUN, "--prompts", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wanfit: error:") and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [(["--prompt", "x"], "--prompt and --prompts"), (["--out", "v.mp4"], "names the folder"),
     (["--videos-per-prompt", "0"], "at least 1"), (["--checkpoint-every", "2"], "--checkpoint-every")],
)  # fmt: skip
def test_batch_options_that_do_not_fit(tmp_path, capsys, extra, message):
    path = tmp_path / "p.txt"
    path.write_text("a fox\n")
    assert main([*RUN, "--prompts", str(path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert main([*RUN, "--videos-per-prompt", "2", "--out", str(tmp_path / "v.mp4")]) == 2
    assert "--prompts FILE" in capsys.readouterr().err


def test_a_batch_writes_each_video_reports_each_error_and_encodes_each_prompt_once(
    tmp_path, capsys, monkeypatch
):
    encoded = []
    original = WanTextEncoder.encode

    def counting(self, prompts, *args, **kwargs):
        encoded.append(list(prompts) if not isinstance(prompts, str) else [prompts])
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(WanTextEncoder, "encode", counting)
    path = tmp_path / "p.txt"
    path.write_text(
        "a red fox\n"
        '{"prompt": "bad", "frames": 6}\n'
        '{"prompt": "two dogs", "seed": 7, "size": "64x48", "out": "dogs.mp4"}\n'
        '{"prompt": "huge", "size": "1280x720"}\n'
    )
    out = tmp_path / "out"
    code = main(
        [*RUN, "--prompts", str(path), "--videos-per-prompt", "2", "--out", str(out), "--vram", "80MiB"]
    )
    captured = capsys.readouterr()
    assert code == 2  # two lines failed
    written = sorted(p.name for p in out.glob("*.mp4"))
    assert written == ["001_a_red_fox_0.mp4", "001_a_red_fox_1.mp4", "dogs.mp4", "dogs_2.mp4"]
    meta = json.loads((out / "dogs_2.json").read_text())
    assert meta["seed"] == 8 and meta["size"] == "64x48" and meta["batch"]["line"] == 3
    assert meta["batch"]["video"] == 2
    # Each prompt went through the encoder once, for both its videos.
    assert [batch[0] for batch in encoded] == ["a red fox", "two dogs"]
    summary = json.loads(captured.out.strip().splitlines()[-1])["batch"]
    errors = {r["line"]: r["error"] for r in summary if r["error"]}
    assert set(errors) == {2, 4} and "4k+1" in errors[2] and "No plan fits" in errors[4]
    assert "batch: 4 of 7 videos written" in captured.out
    assert not list(out.glob("*huge*")) and not list(out.glob("*.part*"))


def test_a_list_of_prompts_gives_one_video_per_prompt():
    from wanfit.pipeline import WanPipeline

    pipe = WanPipeline.from_pretrained("builtin")
    job = dict(height=32, width=48, num_frames=5, num_inference_steps=2, seed=1, progress=False)
    videos = pipe(["a fox", "a dog"], **job)
    assert isinstance(videos, list) and len(videos) == 2
    assert np.array_equal(videos[1], pipe("a dog", **job)) and not np.array_equal(videos[0], videos[1])


def test_one_videos_existing_output_fails_that_video_only(tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_text("a fox\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "001_a_fox_0.mp4").write_bytes(b"someone else's video")
    assert main([*RUN, "--prompts", str(path), "--videos-per-prompt", "2", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert (out / "001_a_fox_0.mp4").read_bytes() == b"someone else's video"
    assert (out / "001_a_fox_1.mp4").is_file()
    assert "line 1: error:" in captured.out and "already exists" in captured.out
