"""load_dit on every checkpoint layout, compared with diffusers' forward; and each error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import wanfit
from tests.helpers.tiny_dit import (
    COMFY_PREFIX,
    diffusers_forward,
    load_official_into_diffusers,
    make_tiny_diffusers_dit,
    official_config,
    official_state_dict,
    save_diffusers,
    save_official,
    tiny_inputs,
    to_comfy,
    to_fp8,
)
from wanfit.errors import CheckpointError, ConfigError
from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B
from wanfit.models.dit import WanDiT
from wanfit.weights.dit_loader import check_checkpoint, load_dit, map_dit_keys, resolve_config

MANIFESTS = Path(__file__).parent / "data" / "manifests"


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = make_tiny_diffusers_dit("small", seed=11)
    x, t, context = tiny_inputs("small", batch=2)
    return model, (x, t, context), diffusers_forward(model, x, t, context)


def assert_matches(model: WanDiT, reference_out: torch.Tensor, inputs, label: str, tol: float = 1e-4):
    with torch.no_grad():
        out = model(*inputs)
    err = rel_l2(out, reference_out)
    print(f"[load_dit vs diffusers fp32] {label}: rel L2 {err:.2e}")
    assert err <= tol


# ---- every layout -------------------------------------------------------------------------------


def test_diffusers_transformer_folder(small, tmp_path):
    reference, inputs, expected = small
    folder = save_diffusers(reference, tmp_path / "transformer")
    model = load_dit(folder)
    assert model.config.dim == 48 and model.config.num_heads == 2 and model.config.in_dim == 4
    assert next(model.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert_matches(model, expected, inputs, "diffusers transformer/ folder")


def test_diffusers_sharded_folder_and_pipeline_root(small, tmp_path):
    reference, inputs, expected = small
    folder = save_diffusers(reference, tmp_path / "pipe" / "transformer", max_shard_size="60KB")
    assert len(list(folder.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert_matches(load_dit(tmp_path / "pipe"), expected, inputs, "diffusers pipeline folder, shards")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    assert_matches(load_dit(index), expected, inputs, "diffusers shard index path")


def test_official_single_file_with_config_dict(small, tmp_path):
    reference, inputs, expected = small
    file = save_official(official_state_dict(reference), tmp_path / "dit.safetensors")
    model = load_dit(file, config={"num_heads": 2})
    assert_matches(model, expected, inputs, "official single file")


def test_official_shards_index_and_model_folder(small, tmp_path):
    reference, inputs, expected = small
    index = save_official(
        official_state_dict(reference), tmp_path / "diffusion_pytorch_model.safetensors", shards=3
    )
    assert_matches(load_dit(index, config={"num_heads": 2}), expected, inputs, "official shards + index")
    # The official release folder: shards + index + an official config.json (and other models' files).
    (tmp_path / "config.json").write_text(
        json.dumps({"_class_name": "WanModel", "model_type": "t2v", **official_config("small")})
    )
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"not read")
    assert_matches(load_dit(tmp_path), expected, inputs, "official model folder")
    index.unlink()  # shards without their index are still found by name
    assert_matches(load_dit(tmp_path), expected, inputs, "official shards, no index")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_comfyui_prefixed_half_precision(small, tmp_path, dtype):
    reference, inputs, _ = small
    state = to_comfy(official_state_dict(reference), dtype)
    state["first_stage_model.decoder.middle.0.residual.0.gamma"] = torch.randn(4)  # all-in-one files
    file = save_official(state, tmp_path / "wan2.1_t2v_tiny.safetensors")
    model = load_dit(file, config={"num_heads": 2})
    assert next(model.parameters()).dtype == dtype  # the file's dtype by default
    # Against diffusers holding exactly the same rounded weights, computed in fp32.
    rounded = make_tiny_diffusers_dit("small", seed=11)
    dit_state = {k.removeprefix(COMFY_PREFIX): v for k, v in state.items() if k.startswith(COMFY_PREFIX)}
    load_official_into_diffusers(rounded, dit_state)
    expected = diffusers_forward(rounded, *inputs)
    assert_matches(
        load_dit(file, config={"num_heads": 2}, dtype="fp32"), expected, inputs, f"ComfyUI prefixed {dtype}"
    )
    with torch.no_grad():
        err = rel_l2(model(*inputs), expected)
    print(f"[load_dit vs diffusers fp32] ComfyUI {dtype} computed in {dtype}: rel L2 {err:.2e}")
    assert err < 3e-2


@pytest.mark.parametrize("scaled", [False, True])
def test_comfyui_fp8_e4m3(small, tmp_path, scaled):
    reference, inputs, _ = small
    stored, decoded = to_fp8(official_state_dict(reference), scaled=scaled)
    file = save_official(stored, tmp_path / "wan_fp8.safetensors")
    model = load_dit(file, config={"num_heads": 2})
    assert next(model.blocks[0].self_attn.q.parameters()).dtype == torch.bfloat16  # fp8 files -> bf16
    rounded = make_tiny_diffusers_dit("small", seed=11)
    load_official_into_diffusers(rounded, decoded)
    expected = diffusers_forward(rounded, *inputs)
    label = "ComfyUI fp8-e4m3" + (" scaled" if scaled else "")
    assert_matches(load_dit(file, config={"num_heads": 2}, dtype=torch.float32), expected, inputs, label)


def test_pickled_official_file(small, tmp_path):
    reference, inputs, expected = small
    file = tmp_path / "dit.pth"
    torch.save(official_state_dict(reference), file)
    assert_matches(load_dit(file, config={"num_heads": 2}), expected, inputs, "official .pth")


@pytest.mark.parametrize("name", ["wide", "head128"])
def test_other_tiny_configs_batch2_non_square(tmp_path, name):
    torch.manual_seed(0)
    reference = make_tiny_diffusers_dit(name, seed=4)
    inputs = tiny_inputs(name, batch=2)
    expected = diffusers_forward(reference, *inputs)
    if name == "wide":  # config.json: no cross-attention norm, 5 output channels
        model = load_dit(save_diffusers(reference, tmp_path / "d"))
        assert not model.config.cross_attn_norm and model.config.out_dim == 5
        assert_matches(model, expected, inputs, f"{name}, diffusers")
    else:  # no config at all: heads of 128 are inferred from the shapes
        model = load_dit(save_official(official_state_dict(reference), tmp_path / "o.safetensors"))
        assert model.config.num_heads == 1 and model.config.cross_attn_norm
        assert_matches(model, expected, inputs, f"{name}, official file")


def test_dtype_choice_and_device(small, tmp_path):
    reference, _, _ = small
    file = save_official(official_state_dict(reference), tmp_path / "dit.safetensors")
    model = load_dit(file, config={"num_heads": 2}, dtype="bf16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ConfigError, match="dtype"):
        load_dit(file, config={"num_heads": 2}, dtype="int4")
    with pytest.raises(ConfigError, match="hidden"):
        load_dit(file, config={"hidden": 3})


def test_wanfit_exports_load_dit():
    assert wanfit.load_dit is load_dit


# ---- real layouts from the manifests (names and shapes only) ------------------------------------


class ManifestTensors(dict):
    """Stands in for LazyStateDict: the key names and shapes of a real checkpoint, no data."""

    def shape(self, key):
        return tuple(self[key])

    def dtype_name(self, key):
        return "BF16"


def manifest_tensors(name: str, prefix: str = "") -> ManifestTensors:
    tensors = json.loads((MANIFESTS / f"{name}.json").read_text())["tensors"]
    return ManifestTensors({prefix + k: v for k, v in tensors.items()})


@pytest.mark.parametrize(
    "name, prefix, config",
    [
        ("official_wan2.1_t2v_1.3B_dit", "", WAN_T2V_1_3B),
        ("official_wan2.1_t2v_1.3B_dit", "model.diffusion_model.", WAN_T2V_1_3B),
        ("diffusers_wan2.1_t2v_1.3B_transformer", "", WAN_T2V_1_3B),
        ("official_wan2.1_t2v_14B_dit", "", WAN_T2V_14B),
    ],
)
def test_real_layouts_are_mapped_and_their_config_inferred(name, prefix, config):
    checkpoint = map_dit_keys(manifest_tensors(name, prefix), Path(name))
    assert checkpoint.layout == ("diffusers" if name.startswith("diffusers") else "official")
    assert not checkpoint.unexpected
    assert resolve_config(checkpoint, None) == config  # heads of 128 inferred from the shapes
    check_checkpoint(checkpoint, config)  # raises on any difference


def test_14b_weights_with_a_1_3b_config_name_both_models():
    checkpoint = map_dit_keys(manifest_tensors("official_wan2.1_t2v_14B_dit"), Path("wan14b"))
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(checkpoint, resolve_config(checkpoint, WAN_T2V_1_3B.to_dict()))
    message = str(err.value)
    assert "configured DiT, Wan2.1 T2V-1.3B (dim=1536, 30 layers)" in message
    assert "its weights are of another model, Wan2.1 T2V-14B (dim=5120, 40 layers)" in message
    assert "270 unexpected: blocks.30." in message and "and 267 more" in message  # blocks 30..39
    assert (
        "wrong shape: patch_embedding.weight (file [5120, 16, 1, 2, 2], model [1536, 16, 1, 2, 2])" in message
    )


def test_i2v_14b_like_checkpoint_is_named(tmp_path):
    tensors = manifest_tensors("official_wan2.1_t2v_14B_dit")
    tensors["patch_embedding.weight"] = [5120, 36, 1, 2, 2]
    with pytest.raises(CheckpointError, match="36 input channels"):
        check_checkpoint(map_dit_keys(tensors, Path("x")), WAN_T2V_14B)


# ---- error paths on real files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_small(small):
    return official_state_dict(small[0])


def test_missing_key(official_small, tmp_path):
    state = dict(official_small)
    del state["blocks.1.cross_attn.norm_k.weight"]
    file = save_official(state, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing: blocks\.1\.cross_attn\.norm_k\.weight"):
        load_dit(file, config={"num_heads": 2})


def test_wrong_shape(official_small, tmp_path):
    state = dict(official_small)
    state["blocks.0.ffn.2.bias"] = torch.randn(47)
    file = save_official(state, tmp_path / "dit.safetensors")
    with pytest.raises(
        CheckpointError, match=r"wrong shape: blocks\.0\.ffn\.2\.bias \(file \[47\], model \[48\]\)"
    ):
        load_dit(file, config={"num_heads": 2})


def test_other_tiny_model_under_a_config_json_names_both(tmp_path):
    torch.manual_seed(0)
    save_diffusers(make_tiny_diffusers_dit("small"), tmp_path)
    wide = official_state_dict(make_tiny_diffusers_dit("wide"))
    save_official(wide, tmp_path / "diffusion_pytorch_model.safetensors")  # config.json says "small"
    with pytest.raises(
        CheckpointError,
        match=r"DiT, dim=48, 2 layers, 4 input channels: its weights are of another model, dim=108, 3 layers, 6 input",
    ):
        load_dit(tmp_path)


def test_i2v_extra_keys_are_named(official_small, tmp_path):
    state = dict(official_small)
    state["img_emb.proj.1.weight"] = torch.randn(48, 16)
    state["blocks.0.cross_attn.k_img.weight"] = torch.randn(48, 48)
    with pytest.raises(CheckpointError, match="image-to-video"):
        load_dit(save_official(state, tmp_path / "i2v.safetensors"), config={"num_heads": 2})
    # The same in the diffusers layout, told by its config.json.
    cfg = {
        "_class_name": "WanTransformer3DModel",
        "num_attention_heads": 2,
        "attention_head_dim": 24,
        "image_dim": 16,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="image-to-video"):
        load_dit(save_official(official_small, tmp_path / "diffusion_pytorch_model.safetensors"))


def test_unknown_layout_and_other_models(tmp_path):
    save_file({"encoder.layers.0.weight": torch.randn(2, 2)}, str(tmp_path / "what.safetensors"))
    with pytest.raises(
        CheckpointError, match="not a Wan2.1 DiT checkpoint of a known layout.*encoder.layers.0.weight"
    ):
        load_dit(tmp_path / "what.safetensors")
    save_file({"decoder.middle.0.residual.0.gamma": torch.randn(2)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="Wan VAE"):
        load_dit(tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="several unrelated weight files"):
        load_dit(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_dit(tmp_path / "nothing.safetensors")


def test_corrupt_and_truncated_files(official_small, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_dit(garbage)
    good = save_official(official_small, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_dit(cut, config={"num_heads": 2})
    pth = tmp_path / "cut.pth"
    torch.save(official_small, pth)
    pth.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_dit(pth, config={"num_heads": 2})


def test_heads_not_inferable_asks_for_config(official_small, tmp_path):
    file = save_official(official_small, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="num_heads"):
        load_dit(file)
