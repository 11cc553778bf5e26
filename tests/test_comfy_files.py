"""ComfyUI's files: a models/ folder, its scaled-fp8 and fp16 umT5 files (tokenizer inside), the fp16
DiT and VAE, parts named one by one, fp8 storage of umT5 as a plan setting, and the clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import tiny_text
from tests.helpers.tiny_comfy import (
    DIT_NAME,
    TE_FP8_NAME,
    TE_FP16_NAME,
    VAE_NAME,
    save_comfy_models,
    text_encoder_state,
)
from tests.helpers.tiny_model_dir import save_demo_official_layout
from wanfit.cli import main
from wanfit.errors import CheckpointError
from wanfit.models.text_encoder import WanTextEncoder
from wanfit.plan.planning import model_request
from wanfit.weights.model_dir import find_model_files
from wanfit.weights.text_encoder_loader import load_text_encoder

RUN = ["generate", "--size", "48x32", "--frames", "5", "--steps", "2", "--no-progress", "--prompt", "a fox"]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    return save_comfy_models(tmp_path_factory.mktemp("comfy"))


@pytest.fixture(scope="module")
def tokenizer(comfy):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(comfy.parent / "spm"))


def test_a_models_folder_is_found_by_what_its_files_hold(comfy):
    files = find_model_files(comfy)
    assert files.layout == "comfyui" and files.tokenizer is None
    # The image-to-video DiT and the CLIP encoder beside them are passed over.
    assert (files.dit.name, files.text_encoder.name, files.vae.name) == (DIT_NAME, TE_FP8_NAME, VAE_NAME)
    assert find_model_files(comfy.parent).dit == files.dit  # the ComfyUI folder above models/ too


def test_the_scaled_fp8_umt5_file_keeps_fp8_and_encodes_as_its_decoded_weights(comfy, tokenizer):
    te = load_text_encoder(comfy / "text_encoders" / TE_FP8_NAME, prompt_cache=False)
    assert te.storage_dtype == torch.float8_e4m3fn and te.compute_dtype == torch.float32
    assert len(te._scales) == 2 * 7  # every block's seven matrices
    # The reference: the same model with the file's decoded weights, in fp32.
    _, decoded = text_encoder_state(tiny_text.make_umt5(0), None, fp8=True)
    reference = tiny_text.make_umt5(0)
    reference.load_state_dict({**decoded, "encoder.embed_tokens.weight": decoded["shared.weight"]})
    expected = WanTextEncoder(reference, tokenizer, cache=None).encode(["a red fox", "boats"], max_length=16)
    assert torch.equal(te.encode(["a red fox", "boats"], max_length=16), expected)


def test_the_tokenizer_inside_the_file_is_the_sentencepiece_model(comfy, tokenizer):
    te = load_text_encoder(comfy / "text_encoders" / TE_FP8_NAME, prompt_cache=False)
    for text in ("a red fox runs through snow", "  two dogs, a ball!", ""):
        assert te.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_fp8_storage_of_a_bf16_umt5_is_a_setting_close_to_bf16(tmp_path, tokenizer):
    folder = tiny_text.save_official_layout(
        tiny_text.make_umt5(0), comfy_tokenizer_dir(tokenizer, tmp_path), tmp_path / "te"
    )
    bf16 = load_text_encoder(folder, dtype=torch.bfloat16, compute_dtype=torch.float32, prompt_cache=False)
    fp8 = load_text_encoder(folder, dtype="float8_e4m3fn", prompt_cache=False)
    matrices = [
        p for n, p in fp8.model.named_parameters() if n.endswith(("q.weight", "wi_0.weight", "wo.weight"))
    ]
    assert {p.dtype for p in matrices} == {
        torch.float8_e4m3fn
    } and fp8.model.shared.weight.dtype == torch.bfloat16
    want, got = bf16.encode(["a red fox"], max_length=16), fp8.encode(["a red fox"], max_length=16)
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 0.1


def comfy_tokenizer_dir(tokenizer, tmp_path: Path) -> Path:
    folder = tmp_path / "tok"
    tokenizer.save_pretrained(str(folder))
    return folder


def test_generate_from_the_models_folder_equals_the_parts_named_one_by_one(comfy, tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"  # folders of PNG frames
    assert main([*RUN, "--model", str(comfy), "--out", str(whole)]) == 0
    named = [
        "--dit", str(comfy / "diffusion_models" / DIT_NAME),
        "--vae", str(comfy / "vae" / VAE_NAME),
        "--text-encoder", str(comfy / "text_encoders" / TE_FP8_NAME),
    ]  # fmt: skip
    assert main([*RUN, *named, "--out", str(parts)]) == 0
    capsys.readouterr()
    frames = sorted(p.name for p in whole.glob("*.png"))
    assert len(frames) == 5 and frames == sorted(p.name for p in parts.glob("*.png"))
    assert all((whole / f).read_bytes() == (parts / f).read_bytes() for f in frames)
    from wanfit.video import sidecar_path

    meta = json.loads(sidecar_path(parts).read_text())
    assert meta["dit"].endswith(DIT_NAME) and meta["plan"]["text_encoder_dtype"] == "float8_e4m3fn"


def test_the_plan_knows_the_files_dtypes(comfy):
    request = model_request(comfy, width=48, height=32, frames=5)
    assert (request.dit_file_dtype, request.text_encoder_file_dtype) == ("float16", "float8_e4m3fn")


def test_an_official_folder_with_one_part_replaced(tmp_path, comfy, capsys):
    official = save_demo_official_layout(tmp_path / "official")
    fp16 = tmp_path / TE_FP16_NAME
    state, _ = text_encoder_state(_demo_text_model(), None, fp8=False)
    save_file(state, str(fp16))
    out = tmp_path / "v.mp4"
    assert main([*RUN, "--model", str(official), "--text-encoder", str(fp16), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out  # the folder's own tokenizer serves the named file


def _demo_text_model():
    from wanfit.demo import tiny_pipeline

    return tiny_pipeline(device="cpu").text_encoder.model


def refused(capsys, argv, tmp_path) -> str:
    out = tmp_path / "refused.mp4"
    assert main([*RUN, *argv, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("wanfit: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in "".join(lines)
    err = errors[0]
    assert not out.exists() and not list(tmp_path.glob("*.part*"))
    return err


def test_bad_comfy_folders_and_files_are_one_sentence(comfy, tmp_path, capsys):
    copy = tmp_path / "models"
    shutil.copytree(comfy, copy)
    shutil.copy(
        copy / "diffusion_models" / DIT_NAME, copy / "diffusion_models" / "wan2.1_t2v_other.safetensors"
    )
    err = refused(capsys, ["--model", str(copy)], tmp_path)
    assert "several Wan2.1 text-to-video DiT files" in err and "--dit FILE" in err
    (copy / "diffusion_models" / DIT_NAME).unlink()
    (copy / "diffusion_models" / "wan2.1_t2v_other.safetensors").unlink()
    err = refused(capsys, ["--model", str(copy)], tmp_path)
    assert "no Wan2.1 text-to-video DiT" in err and "image-to-video" in err
    # The image-to-video file named on its own: the loader's check.
    i2v = copy / "diffusion_models" / "wan2.1_i2v_tiny_fp16.safetensors"
    err = refused(capsys, ["--model", str(comfy), "--dit", str(i2v)], tmp_path)
    assert "image-to-video" in err


def test_a_dit_of_another_size_than_the_folders_config(comfy, tmp_path, capsys):
    official = save_demo_official_layout(tmp_path / "official")
    err = refused(
        capsys, ["--model", str(official), "--dit", str(comfy / "diffusion_models" / DIT_NAME)], tmp_path
    )
    assert "does not fit the configured DiT" in err and "another model" in err


def test_a_truncated_fp8_text_encoder_and_missing_parts(comfy, tmp_path, capsys):
    cut = tmp_path / TE_FP8_NAME
    data = (comfy / "text_encoders" / TE_FP8_NAME).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    parts = ["--dit", str(comfy / "diffusion_models" / DIT_NAME), "--vae", str(comfy / "vae" / VAE_NAME)]
    err = refused(capsys, [*parts, "--text-encoder", str(cut)], tmp_path)
    assert str(cut) in err and "truncated or corrupt" in err
    err = refused(capsys, parts, tmp_path)
    assert "Without --model, name every part of the model: --text-encoder missing" in err
    err = refused(capsys, [*parts, "--text-encoder", str(tmp_path / "nowhere.safetensors")], tmp_path)
    assert "does not exist" in err
    # An fp16 umT5 file with no tokenizer inside and none beside it.
    bare = tmp_path / "bare" / TE_FP16_NAME
    bare.parent.mkdir()
    state, _ = text_encoder_state(tiny_text.make_umt5(0), None, fp8=False)
    save_file(state, str(bare))
    with pytest.raises(CheckpointError, match="No tokenizer found"):
        load_text_encoder(bare, prompt_cache=False)
