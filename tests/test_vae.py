"""wanfit.models.vae against diffusers' AutoencoderKLWan with the same random weights (CPU, fp32)."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_vae import make_tiny_wanfit_vae, official_state_dict, rel_l2
from wanfit.errors import ConfigError
from wanfit.models.vae import (
    WAN21_VAE,
    WAN_VAE_TINY,
    AttentionBlock,
    VAEConfig,
    WanVAE,
)
from wanfit.weights.vae_keys import diffusers_to_official

MANIFESTS = Path(__file__).parent / "data" / "manifests"


@pytest.fixture(autouse=True)
def one_thread():
    # Small convolutions on a shared 2-core machine run several times faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    ref, ours = make_tiny_wanfit_vae(seed=0)
    assert ours.config == WAN_VAE_TINY.with_overrides(
        latents_mean=tuple(ref.config.latents_mean), latents_std=tuple(ref.config.latents_std)
    )
    return ref, ours


@pytest.mark.parametrize("latent_frames", [1, 2, 3])  # 1, 5 and 9 video frames
def test_decode_matches_diffusers(pair, latent_frames):
    ref, ours = pair
    torch.manual_seed(latent_frames)
    batch = 2 if latent_frames == 2 else 1
    z = torch.randn(batch, 16, latent_frames, 3, 5)  # non-square: 24 x 40 pixels
    expected = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == expected.shape == (batch, 3, 1 + 4 * (latent_frames - 1), 24, 40)
    assert expected.abs().lt(0.999).float().mean() > 0.9  # not saturated by the clamp: a real comparison
    assert rel_l2(got, expected) <= 1e-4


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(pair, frames):
    ref, ours = pair
    torch.manual_seed(frames)
    video = torch.rand(2, 3, frames, 16, 40) * 2 - 1  # a batch of two, non-square
    expected = ref.encode(video).latent_dist.mean
    got = ours.encode(video)
    assert got.shape == expected.shape == (2, 16, 1 + (frames - 1) // 4, 2, 5)
    assert rel_l2(got, expected) <= 1e-4


def test_normalize_follows_the_pipeline_convention(pair):
    ref, ours = pair
    z = torch.randn(1, 16, 2, 3, 4)
    mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, 16, 1, 1, 1)
    # diffusers' WanPipeline before decoding: latents / (1 / std) + mean
    torch.testing.assert_close(ours.denormalize(z), z / inv_std + mean)
    torch.testing.assert_close(ours.normalize(ours.denormalize(z)), z)


def test_tiled_decode_is_exact_and_the_margins_are_needed(pair):
    _, ours = pair
    torch.manual_seed(3)
    z = torch.randn(1, 16, 2, 3, 32)  # wide, so middle tiles are cut at every level
    whole = ours.decode(z)
    tiled = ours.decode(z, tile=(2, 8))
    assert len(ours.plan_tiles((3, 32), (2, 8))) == 8
    error = rel_l2(tiled, whole)
    assert error <= 1e-5  # measured 8.8e-7: float rounding only
    margins = list(ours.decoder.margins)
    try:
        ours.decoder.margins = [m - 1 for m in margins]
        assert rel_l2(ours.decode(z, tile=(2, 8)), whole) > 1e-4  # measured 1.8e-3
    finally:
        ours.decoder.margins = margins


def test_tile_margin_covers_the_receptive_field_tightly(pair):
    """A change at one latent pixel after the attention reaches exactly as far as the margin allows."""
    _, ours = pair
    width = 40
    tile = ours.plan_tiles((1, width), None)[0]
    stem = torch.randn(1, 32, 1, 1, width)
    bumped = stem.clone()
    bumped[..., 20] += 1

    def tail(x):
        frames = []
        with torch.no_grad():
            ours.decoder.tail(x, {}, tile, frames.append)
        return frames[0]

    changed = (tail(stem) - tail(bumped)).abs().amax(dim=(0, 1, 2, 3)).nonzero().flatten()
    reach = max(20 * 8 - changed.min().item(), changed.max().item() - (21 * 8 - 1))  # output pixels
    margin = ours.decoder.margins[0] * 8
    assert margin - 8 < reach <= margin


def test_uneven_tiles_and_one_tile(pair):
    _, ours = pair
    z = torch.randn(2, 16, 2, 7, 9)  # a batch of two
    whole = ours.decode(z)
    assert rel_l2(ours.decode(z, tile=(4, 5)), whole) <= 1e-5
    assert torch.equal(ours.decode(z, tile=64), whole)  # a tile larger than the frame: untiled


def test_decode_to_another_device_and_channels_last(pair):
    _, ours = pair
    z = torch.randn(1, 16, 2, 2, 3)
    whole = ours.decode(z)
    assert ours.decode(z, output_device="cpu").device.type == "cpu"
    try:
        ours.use_channels_last(True)
        assert ours.decoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
        assert rel_l2(ours.decode(z, tile=2), whole) <= 1e-5
        assert rel_l2(ours.encode(whole), ours.use_channels_last(False).encode(whole)) <= 1e-5
    finally:
        ours.use_channels_last(False)


def test_bf16_weights_compute_in_bf16(pair):
    ref, ours = pair
    z = torch.randn(1, 16, 2, 2, 3)
    expected = ours.decode(z)
    low = WanVAE(ours.config).eval()
    low.load_state_dict(ours.state_dict())
    low.to(torch.bfloat16)
    got = low.decode(z)
    assert got.dtype == torch.bfloat16
    assert rel_l2(got.float(), expected) < 0.05  # bf16 keeps 8 bits: a few percent at most
    assert low.encode(got).dtype == torch.bfloat16


def test_bad_inputs_are_config_errors(pair):
    _, ours = pair
    with pytest.raises(ConfigError, match="multiples of 8"):
        ours.encode(torch.zeros(1, 3, 1, 12, 16))
    with pytest.raises(ConfigError, match=r"\[B, 3, F, H, W\]"):
        ours.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ConfigError, match="latent"):
        ours.decode(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(ConfigError, match="temperal_downsample"):
        VAEConfig(temperal_downsample=(True,))


def test_real_config_has_the_official_names_and_shapes():
    official = json.loads((MANIFESTS / "official_wan2.1_vae.json").read_text())["tensors"]
    with torch.device("meta"):
        model = WanVAE(WAN21_VAE)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == official
    assert sum(p.numel() for p in model.parameters()) == 126892531


def test_diffusers_manifest_converts_to_the_official_one():
    official = json.loads((MANIFESTS / "official_wan2.1_vae.json").read_text())["tensors"]
    diffusers = json.loads((MANIFESTS / "diffusers_wan2.1_vae.json").read_text())["tensors"]
    converted = {diffusers_to_official(k, num_res_blocks=2): v for k, v in diffusers.items()}
    assert converted == official


def test_converter_agrees_with_the_independent_helper(pair):
    ref, _ = pair
    helper = official_state_dict(ref)
    converted = {diffusers_to_official(k, 2): v for k, v in ref.state_dict().items()}
    assert converted.keys() == helper.keys()
    assert all(torch.equal(converted[k], helper[k]) for k in helper)
    assert diffusers_to_official("decoder.up_blocks.0.attentions.0.proj.weight", 2) is None


def test_config_round_trips_and_strides():
    cfg = WAN21_VAE.with_overrides(num_res_blocks=1)
    assert VAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert (WAN21_VAE.spatial_stride, WAN21_VAE.temporal_stride) == (8, 4)
    assert WAN21_VAE.latent_frames(81) == 21 and WAN21_VAE.video_frames(21) == 81
    with pytest.raises(ConfigError, match="Unknown VAE config keys"):
        VAEConfig.from_dict({"scaling_factor": 1.0})


def test_attention_in_query_chunks_is_the_same():
    torch.manual_seed(0)
    block = AttentionBlock(16).eval()
    x = torch.randn(1, 16, 2, 12, 10)
    with torch.no_grad():
        whole = block(x)
        block.query_chunk = 7  # 120 queries per frame in 18 chunks
        assert torch.allclose(block(x), whole, atol=1e-6)
