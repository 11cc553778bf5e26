"""load_vae in every layout: diffusers folder, official .pth, single safetensors; and its errors."""

import json

import pytest
import torch

import wanfit
from tests.helpers.tiny_vae import (
    make_tiny_diffusers_vae,
    official_state_dict,
    rel_l2,
    save_diffusers_layout,
    save_official_pth,
    save_single_safetensors,
)
from wanfit.errors import CheckpointError
from wanfit.models.vae import WAN21_LATENTS_MEAN, WAN_VAE_TINY
from wanfit.weights.vae_loader import load_vae


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref():
    return make_tiny_diffusers_vae(seed=1)


@pytest.fixture(scope="module")
def latent():
    torch.manual_seed(0)
    return torch.randn(1, 16, 2, 2, 3)


@pytest.fixture(scope="module")
def expected(ref, latent):
    return ref.decode(latent).sample


def test_diffusers_folder_with_its_config(ref, latent, expected, tmp_path):
    save_diffusers_layout(ref, tmp_path / "pipe" / "vae")
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):  # the vae/ folder or the pipeline's
        vae = load_vae(path)
        assert vae.config.latents_mean == pytest.approx(ref.config.latents_mean)
        assert vae.config.latents_std == pytest.approx(ref.config.latents_std)
        assert vae.config.base_dim == 8 and vae.dtype == torch.float32
        assert rel_l2(vae.decode(latent), expected) <= 1e-4


def test_official_pth(ref, latent, expected, tmp_path):
    path = save_official_pth(ref, tmp_path / "Wan2.1_VAE.pth")
    for source in (path, tmp_path):  # the file, or the official model folder holding it
        vae = load_vae(source)
        # The shape is read from the tensors; mean and std, absent from the file, are Wan2.1's.
        assert vae.config == WAN_VAE_TINY
        assert vae.config.latents_mean == WAN21_LATENTS_MEAN
        assert rel_l2(vae.decode(latent), expected) <= 1e-4


@pytest.mark.parametrize("naming,prefix", [("official", ""), ("diffusers", ""), ("official", "vae.")])
def test_single_safetensors(ref, latent, expected, tmp_path, naming, prefix):
    path = save_single_safetensors(ref, tmp_path / "wan_2.1_vae.safetensors", naming, prefix)
    vae = wanfit.load_vae(path, dtype="fp32")
    assert rel_l2(vae.decode(latent), expected) <= 1e-4


def test_other_topology_is_read_from_the_shapes(tmp_path):
    small = make_tiny_diffusers_vae(
        seed=2, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, False]
    )
    for path in (
        save_single_safetensors(small, tmp_path / "a.safetensors", "diffusers"),
        save_official_pth(small, tmp_path / "b.pth"),
    ):
        vae = load_vae(path)
        assert (vae.config.dim_mult, vae.config.num_res_blocks) == ((1, 2, 2), 1)
        assert vae.config.temperal_downsample == (True, False)
        z = torch.randn(1, 16, 3, 2, 3)
        assert rel_l2(vae.decode(z), small.decode(z).sample) <= 1e-4
        video = torch.rand(1, 3, 5, 8, 16) * 2 - 1
        assert rel_l2(vae.encode(video), small.encode(video).latent_dist.mean) <= 1e-4


def test_dtype_and_device(ref, tmp_path):
    path = save_single_safetensors(ref, tmp_path / "v.safetensors")
    vae = load_vae(path, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in vae.parameters())
    assert not vae.training
    with pytest.raises(wanfit.errors.ConfigError, match="Unknown dtype"):
        load_vae(path, dtype="int8")


class _NotATensor:
    pass


def _official_with(ref, tmp_path, edit) -> str:
    state = official_state_dict(ref)
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    return str(path)


def test_missing_unexpected_and_misshaped_tensors_are_named_in_one_error(ref, tmp_path):
    def edit(state):
        del state["decoder.head.2.bias"]
        state["decoder.middle.1.proj.weight"] = torch.zeros(3, 3, 1, 1)
        state["decoder.extra.weight"] = torch.zeros(1)

    with pytest.raises(CheckpointError) as info:
        load_vae(_official_with(ref, tmp_path, edit))
    message = str(info.value)
    assert "1 missing: decoder.head.2.bias" in message
    assert "1 unexpected: decoder.extra.weight" in message
    assert "decoder.middle.1.proj.weight (file [3, 3, 1, 1], model [32, 32, 1, 1])" in message


def test_unreadable_and_foreign_files(ref, tmp_path):
    garbage = tmp_path / "Wan2.1_VAE.pth"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_vae(garbage)
    torch.save({"encoder.conv1.weight": torch.zeros(1), "code": _NotATensor()}, tmp_path / "objects.pth")
    with pytest.raises(CheckpointError, match=r"holds code or objects other than tensors \(.*_NotATensor\)"):
        load_vae(tmp_path / "objects.pth")

    good = save_single_safetensors(ref, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_vae(cut)

    from safetensors.torch import save_file

    save_file({"blocks.0.ffn.0.weight": torch.zeros(2, 2)}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="not a Wan2.1 VAE"):
        load_vae(tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_vae(tmp_path / "nowhere")


def test_wan22_config_is_refused(ref, tmp_path):
    folder = save_diffusers_layout(ref, tmp_path / "vae")
    config = json.loads((folder / "config.json").read_text())
    config.update(is_residual=True, z_dim=48)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="Wan2.2"):
        load_vae(folder)
