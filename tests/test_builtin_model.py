"""The shipped built-in model (issue 16): a release folder read by the release loaders and checks, what
`wanfit generate` makes with it by default, and `wanfit demo prompts`."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.test_cli_model_files import RUN, _isolated, refused, truncate  # noqa: F401  (the release checks)
from wanfit.builtin import (
    BUILTIN_DIT,
    BUILTIN_TEXT,
    BUILTIN_VAE,
    DEFAULT_PROMPT,
    MODEL_DIR,
    SAMPLING,
    VIDEO_FRAMES,
    VIDEO_SIZE,
    builtin_pipeline,
)
from wanfit.builtin.language import BACKGROUNDS, COLOURS, SHAPES
from wanfit.cli import main
from wanfit.quality import detect
from wanfit.video import read_mp4_comment, read_video
from wanfit.weights.file_names import BUILTIN_FILES
from wanfit.weights.model_dir import find_model_files

MIB = 2**20


def test_the_folder_is_an_official_release_in_safetensors_and_small():
    files = find_model_files(MODEL_DIR)
    assert files.layout == "official"
    assert (
        files.vae == MODEL_DIR / BUILTIN_FILES["vae"]
        and files.text_encoder == MODEL_DIR / BUILTIN_FILES["text_encoder"]
    )
    weights = {part: MODEL_DIR / BUILTIN_FILES[part] for part in ("dit", "vae", "text_encoder")}
    stored = {}
    for part, path in weights.items():
        with safe_open(str(path), "pt") as f:
            stored[part] = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored == {"dit": {"F16"}, "vae": {"F16"}, "text_encoder": {"BF16"}}
    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert total < 25 * MIB, f"{total / MIB:.1f} MiB"
    assert sorted(p.name for p in MODEL_DIR.iterdir()) == sorted(
        str(BUILTIN_FILES[k]).split("/")[0] for k in BUILTIN_FILES
    )  # nothing else ships


def test_the_loaders_read_the_configs_training_used():
    pipe = builtin_pipeline(device="cpu")
    assert pipe.dit.config == BUILTIN_DIT
    assert pipe.vae.config == BUILTIN_VAE
    text = pipe.text_encoder.model.config
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
        assert getattr(text, key) == BUILTIN_TEXT[key], key
    assert len(pipe.text_encoder.tokenizer) == BUILTIN_TEXT["vocab_size"]
    assert pipe.defaults == SAMPLING


def test_generate_without_a_model_draws_its_default_prompt(capsys, tmp_path):
    out = tmp_path / "demo.mp4"
    assert main(["generate", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "demo prompts" in printed
    frames = read_video(out)
    width, height = VIDEO_SIZE
    assert frames.shape == (VIDEO_FRAMES, height, width, 3)
    meta = read_mp4_comment(out)
    assert meta["prompt"] == DEFAULT_PROMPT and meta["model"] is None
    assert (meta["guidance"], meta["shift"], meta["steps"]) == (
        SAMPLING.guidance_scale,
        SAMPLING.shift,
        SAMPLING.num_inference_steps,
    )
    seen = detect(frames)  # mp4 compression included
    assert (seen.colour, seen.shape, seen.direction) == ("red", "circle", "right")


def test_demo_prompts_lists_what_it_can_draw(capsys):
    assert main(["demo", "prompts"]) == 0
    out = capsys.readouterr().out
    for word in (*SHAPES, *COLOURS, *BACKGROUNDS, "left", "right", "up", "down", "still"):
        assert word in out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "demo prompts" in capsys.readouterr().out


# -- a broken copy fails as a broken release does (tests/test_cli_model_files.py) --------------------


@pytest.fixture
def broken(tmp_path):
    return shutil.copytree(MODEL_DIR, tmp_path / "model")


def test_an_intact_copy_runs_as_a_model_folder(capsys, broken, tmp_path):
    out = tmp_path / "v.mp4"
    assert main([*RUN, "--model", str(broken), "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["model"] == str(broken)


@pytest.mark.parametrize("part", ["dit", "vae", "text_encoder"])
def test_a_truncated_file_is_named(capsys, broken, tmp_path, part):
    path = broken / BUILTIN_FILES[part]
    truncate(path)
    assert f"{path} is not a readable safetensors file (truncated or corrupt?)" in refused(
        capsys, broken, tmp_path
    )


def test_a_misshapen_tensor_and_a_missing_tokenizer_are_named(capsys, broken, tmp_path):
    path = broken / BUILTIN_FILES["dit"]
    state = load_file(str(path))
    state["head.head.weight"] = torch.zeros(3, BUILTIN_DIT.dim, dtype=torch.float16)
    save_file(state, str(path))
    line = refused(capsys, broken, tmp_path)
    assert f"{broken} does not fit the configured DiT" in line and f"head.head.weight (file [3, {BUILTIN_DIT.dim}]" in line
    shutil.rmtree(broken / "google")
    assert "lacks google/umt5-xxl/" in refused(capsys, broken, tmp_path)
