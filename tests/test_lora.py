"""LoRA files of every format: wanfit's frames against diffusers' with the same file and strength,
and the conversion's refusals (another model, unknown keys, I2V keys)."""

import numpy as np
import pytest
import torch

from tests import test_pipeline
from tests.helpers import tiny_lora, tiny_pipeline
from tests.test_pipeline import FRAMES, HEIGHT, NEGATIVE, STEPS, WIDTH
from wanfit.errors import CheckpointError
from wanfit.pipeline import WanPipeline
from wanfit.runtime.lora import parameter_shapes
from wanfit.weights import lora_keys

STRENGTH = 0.7
folders, latents = (
    test_pipeline.folders,
    test_pipeline.latents,
)  # its fixtures: a tiny diffusers pipeline, latents
DIM = tiny_pipeline.PIPELINE_DIT["num_attention_heads"] * tiny_pipeline.PIPELINE_DIT["attention_head_dim"]
FFN, LAYERS = tiny_pipeline.PIPELINE_DIT["ffn_dim"], tiny_pipeline.PIPELINE_DIT["num_layers"]
JOB = dict(
    negative_prompt=NEGATIVE,
    height=HEIGHT,
    width=WIDTH,
    num_frames=FRAMES,
    num_inference_steps=STEPS,
    guidance_scale=5.0,
)


@pytest.fixture(scope="module")
def base_frames(folders, latents):
    return tiny_pipeline.diffusers_frames(folders[0], prompt="a fox", latents=latents.clone(), **JOB)


def mean_abs_diff(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def formats():
    """(format, file for wanfit, the same tensors as diffusers' loader reads them)."""
    factors = tiny_lora.random_factors(LAYERS, DIM, FFN, rank=4, seed=3)
    biases = tiny_lora.random_biases(factors)
    kohya = tiny_lora.kohya(factors, alpha=2.0)
    return {
        # LightX2V / Kijai style: lora_down/up with alpha (scale 2/4) and bias diffs.
        "comfyui": (tiny_lora.comfy(factors, alpha=2.0, biases=biases),) * 2,
        "comfyui-lora_A": (tiny_lora.comfy(factors, lora_ab=True),) * 2,
        "kohya": (kohya, kohya),
        # diffusers has no VideoX-Fun reader: it gets the kohya spelling of the same tensors.
        "videox-fun": (tiny_lora.kohya(factors, alpha=2.0, prefix="lora_unet__"), kohya),
        "diffusers": (tiny_lora.diffusers(factors, biases=biases),) * 2,
        # diffusers has no DiffSynth reader for Wan: it gets the ComfyUI spelling (no alpha: scale 1).
        "diffsynth": (tiny_lora.diffsynth(factors), tiny_lora.comfy(factors)),
    }


@pytest.mark.parametrize("name", list(formats()))
def test_each_format_gives_the_frames_diffusers_gives(folders, latents, base_frames, tmp_path, name):
    reference, diffusers_dir, _ = folders
    ours_state, theirs_state = formats()[name]
    ours_file = tiny_lora.save(ours_state, tmp_path / "ours.safetensors")
    theirs_file = tiny_lora.save(theirs_state, tmp_path / "theirs.safetensors")

    reference.load_lora_weights(str(theirs_file), adapter_name="test")
    try:
        reference.set_adapters(["test"], [STRENGTH])
        expected = tiny_pipeline.diffusers_frames(reference, prompt="a fox", latents=latents.clone(), **JOB)
    finally:
        reference.delete_adapters("test")

    pipe = WanPipeline.from_pretrained(diffusers_dir, device="cpu")
    lora = pipe.load_lora(ours_file, strength=STRENGTH)
    assert lora.format == name.split("-lora_A")[0]
    frames = pipe("a fox", latents=latents.clone(), progress=False, **JOB)
    agree, moved = mean_abs_diff(frames, expected), mean_abs_diff(expected, base_frames)
    print(f"{name}: |wanfit - diffusers| = {agree:.4f}/255, the LoRA moves the frames {moved:.2f}/255")
    assert agree <= 0.05
    assert moved > 1.0  # 20x the tolerance: the LoRA really acts
    assert pipe.loras == [lora.record(STRENGTH)] and len(lora.sha256) == 64


def tiny_shapes():
    from wanfit.models.configs import WAN_TINY

    return parameter_shapes(WAN_TINY)


def test_diffs_on_norms_modulation_and_head_are_added_times_the_strength():
    """ComfyUI's `.diff` / `.diff_b`: a full delta of a module's weight or of a bare parameter."""
    shapes = tiny_shapes()
    gen = torch.Generator().manual_seed(0)
    state = {
        "diffusion_model.blocks.0.norm3.diff": torch.randn(64, generator=gen),
        "diffusion_model.blocks.0.norm3.diff_b": torch.randn(64, generator=gen),
        "diffusion_model.blocks.1.modulation.diff": torch.randn(1, 6, 64, generator=gen),
        "diffusion_model.head.head.diff": torch.randn(shapes["head.head.weight"], generator=gen),
    }
    lora = lora_keys.convert(state, shapes)
    lora_keys.check_fits(lora, shapes)
    assert set(lora.diffs) == {
        "blocks.0.norm3.weight",
        "blocks.0.norm3.bias",
        "blocks.1.modulation",
        "head.head.weight",
    }
    assert torch.equal(lora.diffs["blocks.1.modulation"], state["diffusion_model.blocks.1.modulation.diff"])


def test_alpha_scales_and_no_alpha_means_scale_one():
    shapes = tiny_shapes()
    factors = tiny_lora.random_factors(2, 64, 128, rank=8)
    with_alpha = lora_keys.convert(tiny_lora.comfy(factors, alpha=4.0), shapes)
    without = lora_keys.convert(tiny_lora.comfy(factors), shapes)
    module = "blocks.1.ffn.2"
    assert with_alpha.low_rank[module].scale == 0.5 and without.low_rank[module].scale == 1.0
    down, up = factors[module]
    torch.testing.assert_close(with_alpha.low_rank[module].delta(), 0.5 * up @ down)


def tiny_state_with(module: str, extra: dict | None = None) -> dict:
    """A ComfyUI LoRA for the tiny DiT, plus a rank-4 pair for `module` and `extra` keys."""
    state = tiny_lora.comfy(tiny_lora.random_factors(2, 64, 128))
    state[f"diffusion_model.{module}.lora_down.weight"] = torch.zeros(4, 64)
    state[f"diffusion_model.{module}.lora_up.weight"] = torch.zeros(64, 4)
    return state | (extra or {})


def test_image_to_video_keys_are_skipped_with_a_note():
    shapes = tiny_shapes()
    state = tiny_state_with(
        "blocks.0.cross_attn.k_img", {"diffusion_model.img_emb.proj.1.diff_b": torch.zeros(64)}
    )
    lora = lora_keys.convert(state, shapes)
    lora_keys.check_fits(lora, shapes)
    assert len(lora.skipped_i2v) == 3 and "image-to-video" in lora.notes[0]
    assert not any("k_img" in m for m in lora.low_rank)


def test_unknown_keys_are_an_error_listing_them_unless_skipped():
    shapes = tiny_shapes()
    state = tiny_state_with("blocks.0.self_attn.qq", {"something_else": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"3 keys that fit no weight.*something_else") as err:
        lora_keys.check_fits(lora_keys.convert(state, shapes), shapes)
    assert "blocks.0.self_attn.qq" in str(err.value) and str(err.value).endswith(".")
    lora = lora_keys.convert(state, shapes)
    lora_keys.check_fits(lora, shapes, skip_unknown=True)
    assert "skipped 3 unknown keys" in lora.notes[0] and len(lora.low_rank) == 20


def test_a_lora_for_another_model_is_refused_naming_the_first_module(tmp_path):
    from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B

    big = tiny_lora.random_factors(1, WAN_T2V_14B.dim, WAN_T2V_14B.ffn_dim, rank=1)
    path = tiny_lora.save(tiny_lora.comfy(big, alpha=1.0), tmp_path / "lora_14b.safetensors")
    with pytest.raises(CheckpointError) as err:
        lora_keys.load_lora(path, parameter_shapes(WAN_T2V_1_3B), model_name="Wan2.1 T2V-1.3B")
    message = str(err.value)
    assert message == (
        "lora_14b.safetensors was made for another model than Wan2.1 T2V-1.3B: its blocks.0.self_attn.q "
        "is [5120, 5120], where this model's is [1536, 1536]."
    )


def test_missing_half_of_a_pair_and_empty_files_are_refused(tmp_path):
    shapes = tiny_shapes()
    with pytest.raises(CheckpointError, match="no lora_up/lora_B for blocks.0.self_attn.q"):
        lora_keys.convert(
            {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 64)}, shapes
        )
    lora = lora_keys.convert({"diffusion_model.blocks.0.cross_attn.k_img.diff_b": torch.zeros(64)}, shapes)
    with pytest.raises(CheckpointError, match="holds no LoRA weight"):
        lora_keys.check_fits(lora, shapes)
    with pytest.raises(CheckpointError, match="LoRA file not found"):
        lora_keys.load_lora(tmp_path / "missing.safetensors", shapes)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        lora_keys.load_lora(bad, shapes)


def test_diffusers_metadata_alpha_is_honoured(tmp_path):
    import json

    from safetensors.torch import save_file

    shapes = tiny_shapes()
    factors = tiny_lora.random_factors(2, 64, 128, rank=4)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    meta = {
        "transformer.r": 4,
        "transformer.lora_alpha": 8,
        "transformer.alpha_pattern": {"blocks.1.ffn.net.2": 2},
    }
    save_file(tiny_lora.diffusers(factors), str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    lora = lora_keys.load_lora(path, shapes)
    assert lora.format == "diffusers"
    assert lora.low_rank["blocks.0.self_attn.q"].scale == 2.0
    assert lora.low_rank["blocks.1.ffn.2"].scale == 0.5
