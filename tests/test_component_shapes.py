"""Reading a model folder's text encoder and VAE shapes without their weights, and planning from them."""

import shutil
from dataclasses import replace

import pytest

from tests.helpers import tiny_pipeline, tiny_text
from tests.helpers.tiny_model_dir import save_demo_official_layout
from wanfit.demo import tiny_text_encoder_config, tiny_tokenizer
from wanfit.errors import CheckpointError
from wanfit.models.configs import WAN21_TEXT_ENCODER, TextEncoderConfig
from wanfit.models.vae import WAN21_VAE, WAN_VAE_TINY
from wanfit.plan import estimates as E
from wanfit.plan import planner as P
from wanfit.plan.plan import Plan
from wanfit.weights.dit_loader import inspect_dit, resolve_config
from wanfit.weights.inspect import component_shapes, text_encoder_config

GIB = 1024**3
TINY_UMT5 = TextEncoderConfig.from_umt5(tiny_text.TINY_UMT5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The test pipeline in the diffusers layout (saved by diffusers) and the official one, and the
    built-in demo model as an official folder."""
    root = tmp_path_factory.mktemp("shapes")
    tokenizer_dir = tiny_text.train_tokenizer(root / "tok")
    reference = tiny_pipeline.make_diffusers_pipeline(tokenizer_dir)
    reference.save_pretrained(str(root / "diffusers"))
    tiny_pipeline.save_official_layout(reference, tokenizer_dir, root / "official")
    save_demo_official_layout(root / "demo")
    return root


@pytest.mark.parametrize("layout", ["diffusers", "official"])
def test_both_layouts_give_the_tiny_shapes(folders, layout):
    text_encoder, vae = component_shapes(folders / layout)
    assert text_encoder == TINY_UMT5
    assert vae == WAN_VAE_TINY  # base_dim 8, the release's latent statistics


def test_the_demo_folder_gives_the_demo_shapes(folders):
    text_encoder, vae = component_shapes(folders / "demo")
    demo = tiny_text_encoder_config(len(tiny_tokenizer()))
    # The relative-attention distance is no tensor shape; everything that sizes memory is.
    assert replace(text_encoder, relative_attention_max_distance=16) == demo
    assert E.text_encoder_sizes(text_encoder) == E.text_encoder_sizes(demo)
    assert vae == WAN_VAE_TINY


def test_text_encoder_without_config_json_is_read_from_its_shapes(folders, tmp_path):
    copy = shutil.copytree(folders / "diffusers" / "text_encoder", tmp_path / "text_encoder")
    (copy / "config.json").unlink()
    assert text_encoder_config(copy) == TINY_UMT5
    official = folders / "official" / "models_t5_umt5-xxl-enc-bf16.pth"
    assert text_encoder_config(official) == TINY_UMT5


def test_a_foreign_config_json_is_refused(folders, tmp_path):
    copy = shutil.copytree(folders / "diffusers" / "text_encoder", tmp_path / "text_encoder")
    (copy / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(CheckpointError, match="not the umT5 text encoder"):
        text_encoder_config(copy)


@pytest.mark.parametrize("layout", ["diffusers", "official"])
def test_a_tiny_folder_is_planned_as_tiny(folders, layout):
    """Issue 10 §7: a tiny folder at 64x64x5 fits in 1 GiB when planned from its own files' sizes."""
    text_encoder, vae = component_shapes(folders / layout)
    dit = resolve_config(inspect_dit(folders / layout), None)
    request = E.Request(dit, height=64, width=64, num_frames=5, text_encoder=text_encoder, vae=vae)
    plan = Plan(device="cuda", compute_dtype="bfloat16", text_encoder_device="cuda")
    tiny = E.peak_bytes(E.estimate_phases(request, plan, "sdpa_flash"))
    assert tiny < 64 * 1024**2
    release_parts = replace(request, text_encoder=WAN21_TEXT_ENCODER, vae=WAN21_VAE)
    assert E.peak_bytes(E.estimate_phases(release_parts, plan, "sdpa_flash")) > 10 * GIB
    # On a CPU (where umT5 cannot move elsewhere) --vram 1GiB was refused as needing 11.92 GiB.
    cpu = P.DeviceBudget("cpu", "cpu", None, 24 * GIB, 20 * GIB, 20 * GIB, False)
    result = P.plan_run(cpu, request, vram=1 * GIB)
    assert E.peak_bytes(result.phases) < 64 * 1024**2
    with pytest.raises(P.NoPlanError):
        P.plan_run(cpu, release_parts, vram=1 * GIB)
