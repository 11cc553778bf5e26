"""The Wan2.1 DiT against diffusers' WanTransformer3DModel, and its names against the real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_dit import (
    TINY_DIFFUSERS_CONFIGS,
    diffusers_forward,
    make_tiny_diffusers_dit,
    official_config,
    official_state_dict,
    tiny_inputs,
)
from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B, DiTConfig
from wanfit.models.dit import WanDiT, rope_frequencies
from wanfit.weights.dit_keys import official_to_diffusers

MANIFESTS = Path(__file__).parent / "data" / "manifests"


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def manifest(name: str) -> dict[str, list[int]]:
    return json.loads((MANIFESTS / f"{name}.json").read_text())["tensors"]


def wanfit_from(reference, name: str, text_len: int = 512) -> WanDiT:
    """A meta-built WanDiT given the reference's weights with load_state_dict(assign=True)."""
    cfg = DiTConfig.from_dict({**official_config(name), "text_len": text_len})
    with torch.device("meta"):
        model = WanDiT(cfg)
    model.load_state_dict(official_state_dict(reference), strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(TINY_DIFFUSERS_CONFIGS))
def pair(request):
    torch.manual_seed(0)
    reference = make_tiny_diffusers_dit(request.param, seed=3)
    return request.param, reference, wanfit_from(reference, request.param)


def test_forward_matches_diffusers_fp32(pair):
    name, reference, model = pair
    x, t, context = tiny_inputs(name, batch=2)
    expected = diffusers_forward(reference, x, t, context)
    with torch.no_grad():
        out = model(x, t, context)
    err = rel_l2(out, expected)
    print(f"[dit fp32 vs diffusers] {name} latent {tuple(x.shape)}: rel L2 {err:.2e}")
    assert out.shape == x.shape[:1] + (reference.config.out_channels,) + x.shape[2:]
    assert out.dtype == torch.float32
    assert err <= 1e-4


def test_short_context_is_zero_padded_to_text_len():
    torch.manual_seed(0)
    name = "small"
    reference = make_tiny_diffusers_dit(name, seed=3)
    model = wanfit_from(reference, name)
    x, t, context = tiny_inputs(name, batch=2, context_len=512)
    context[:, 7:] = 0
    with torch.no_grad():
        padded = model(x, t, context)
        short = model(x, t, context[:, :7])
        unpadded = wanfit_from(reference, name, text_len=7)(x, t, context[:, :7])
    assert torch.allclose(short, padded, rtol=1e-5, atol=1e-6)
    # The zero rows take part in cross-attention (as in the official model): they change the result.
    assert rel_l2(unpadded, padded) > 1e-4


def test_timestep_is_a_float_per_sample_and_broadcasts():
    torch.manual_seed(0)
    reference = make_tiny_diffusers_dit("small", seed=5)
    model = wanfit_from(reference, "small", text_len=8)
    x, _, context = tiny_inputs("small", batch=2, context_len=8)
    with torch.no_grad():
        frac = model(x, torch.tensor([500.25, 500.25]), context)
        whole = model(x, torch.tensor([500.0, 500.0]), context)
        scalar = model(x, torch.tensor(500.25), context)
        per_sample = model(x, torch.tensor([500.25, 10.0]), context)
    assert torch.equal(scalar, frac)
    assert rel_l2(frac, whole) > 1e-7  # fractional timesteps are not rounded away
    assert torch.allclose(per_sample[0], frac[0], atol=1e-6)
    assert rel_l2(per_sample[1], frac[1]) > 1e-3
    expected = diffusers_forward(reference, x, torch.tensor([500.25, 10.0]), context)
    assert rel_l2(per_sample, expected) <= 1e-4


def test_blocks_called_one_by_one_give_the_forward():
    """The runtime may drive the blocks itself: the documented call must reproduce forward()."""
    torch.manual_seed(0)
    model = wanfit_from(make_tiny_diffusers_dit("wide", seed=1), "wide", text_len=8)
    x, t, context = tiny_inputs("wide", batch=2, context_len=8)
    with torch.no_grad():
        expected = model(x, t, context)
        grid = model.patch_grid(x)
        tokens = model.patch_embedding(x).flatten(2).transpose(1, 2)
        t_emb = model.embed_time(t, x.shape[0])
        e = model.time_projection(t_emb).unflatten(1, (6, model.config.dim))
        ctx = model.embed_text(context)
        rope = model.rope(grid, x.device)
        for block in model.blocks:
            tokens = block(tokens, e, ctx, rope)
            assert tokens.dtype == torch.float32
        out = model.unpatchify(model.head(tokens, t_emb), grid)
    assert isinstance(model.blocks, torch.nn.ModuleList)
    assert torch.allclose(out, expected, atol=1e-6)


def test_bf16_weights_keep_an_fp32_residual_stream():
    torch.manual_seed(0)
    reference = make_tiny_diffusers_dit("small", seed=2)
    model32 = wanfit_from(reference, "small", text_len=8)
    model16 = wanfit_from(reference, "small", text_len=8).to(torch.bfloat16)
    x, t, context = tiny_inputs("small", batch=2, context_len=8)
    with torch.no_grad():
        out32 = model32(x, t, context)
        out16 = model16(x, t, context)
        e = model16.time_projection(model16.embed_time(t, 2).to(torch.bfloat16)).float().unflatten(1, (6, -1))
        tokens = torch.randn(2, 45, model16.config.dim)
        block_out = model16.blocks[0](
            tokens, e, model16.embed_text(context), model16.rope((3, 3, 5), x.device)
        )
    assert out16.dtype == torch.float32 and block_out.dtype == torch.float32
    err = rel_l2(out16, out32)
    print(f"[dit bf16 weights vs fp32] rel L2 {err:.2e}")
    assert 0 < err < 3e-2


def test_rope_is_computed_once_per_grid_and_device():
    torch.manual_seed(0)
    model = WanDiT(
        DiTConfig(dim=48, ffn_dim=32, freq_dim=16, num_heads=2, num_layers=1, text_dim=8, text_len=4)
    )
    first = model.rope((2, 3, 4), torch.device("cpu"))
    assert model.rope((2, 3, 4), "cpu") is first
    assert model.rope((2, 4, 3), "cpu") is not first
    assert first.shape == (24, 1, 12) and first.dtype == torch.complex64
    assert torch.allclose(first.abs(), torch.ones(24, 1, 12))


def test_rope_splits_head_dim_into_time_height_width():
    angles = rope_frequencies((3, 2, 2), head_dim=128).angle().view(3, 2, 2, 64)
    # Pairs 0..21 (44 dims) follow the frame index, 22..42 the row, 43..63 the column.
    assert torch.allclose(
        angles[1, 0, 0, :22], torch.ones(22) / 10000 ** (torch.arange(0, 44, 2) / 44), atol=1e-6
    )
    assert torch.count_nonzero(angles[1, 0, 0, 22:]) == 0
    assert torch.count_nonzero(angles[0, 1, 0, :22]) == 0 and torch.count_nonzero(angles[0, 1, 0, 43:]) == 0
    assert torch.allclose(
        angles[0, 0, 1, 43:], torch.ones(21) / 10000 ** (torch.arange(0, 42, 2) / 42), atol=1e-6
    )


def test_rope_per_axis_equals_rotating_the_whole_table():
    """The table is built from per-axis rotations; bit for bit what rotating every token's angles gives."""
    grid, head_dim = (5, 6, 7), 128
    hw_dim = 2 * (head_dim // 6)
    angles = []
    for axis, (n, d) in enumerate(zip(grid, (head_dim - 2 * hw_dim, hw_dim, hw_dim))):
        a = torch.outer(
            torch.arange(n, dtype=torch.float64),
            1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d),
        )
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        angles.append(a.view(shape).expand(*grid, d // 2))
    angles = torch.cat(angles, dim=-1).reshape(-1, 1, head_dim // 2)
    whole = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    assert torch.equal(rope_frequencies(grid, head_dim), whole)


def test_latent_not_divisible_by_patch_is_refused():
    torch.manual_seed(0)
    model = WanDiT(
        DiTConfig(dim=48, ffn_dim=32, freq_dim=16, num_heads=2, num_layers=1, text_dim=8, text_len=4)
    )
    with pytest.raises(ValueError, match="patch size"):
        model(torch.randn(1, 16, 2, 5, 4), torch.tensor([1.0]), torch.randn(1, 4, 8))


@pytest.mark.parametrize(
    "config, name",
    [(WAN_T2V_1_3B, "official_wan2.1_t2v_1.3B_dit"), (WAN_T2V_14B, "official_wan2.1_t2v_14B_dit")],
)
def test_real_configs_have_the_official_names_and_shapes(config, name):
    with torch.device("meta"):
        model = WanDiT(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest(name)
    assert list(ours) == list(manifest(name))  # same order, too


def test_real_config_converted_to_diffusers_names_equals_the_diffusers_manifest():
    with torch.device("meta"):
        model = WanDiT(WAN_T2V_1_3B)
    converted = {k: list(v.shape) for k, v in official_to_diffusers(model.state_dict()).items()}
    assert converted == manifest("diffusers_wan2.1_t2v_1.3B_transformer")


def test_real_14b_forward_runs_on_the_meta_device():
    with torch.device("meta"):
        model = WanDiT(WAN_T2V_14B.with_overrides(num_layers=2))  # real widths; depth does not matter here
        x = torch.randn(1, 16, 2, 4, 6)
        out = model(x, torch.tensor([999.0]), torch.randn(1, 512, 4096))
    assert out.shape == (1, 16, 2, 4, 6) and out.device.type == "meta"


def test_rope_in_real_arithmetic_under_torch_compile_equals_the_complex_form():
    from wanfit.models.dit import apply_rope

    rope = rope_frequencies((2, 3, 4), head_dim=24)
    x = torch.randn(1, 24, 2, 24)
    traced = torch.compile(
        apply_rope, backend="eager", fullgraph=True
    )  # dynamo traces: is_compiling() is True
    torch.testing.assert_close(traced(x, rope), apply_rope(x, rope), atol=1e-6, rtol=1e-6)


def test_attention_and_ffn_chunking_give_the_same_output():
    from wanfit.models.configs import WAN_TINY
    from wanfit.runtime.chunking import apply_chunking

    torch.manual_seed(0)
    model = WanDiT(WAN_TINY).eval()
    x, t, context = torch.randn(1, 16, 3, 6, 10), torch.tensor([700.0]), torch.randn(1, 16, WAN_TINY.text_dim)
    with torch.no_grad():
        whole = model(x, t, context)
        apply_chunking(model.blocks, attention_chunk=7, ffn_chunk=11)  # 45 tokens: uneven chunks
        assert model.blocks[0].self_attn.attention_chunk == 7 and model.blocks[0].ffn_chunk == 11
        chunked = model(x, t, context)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_the_ffn_gelu_in_place_gives_the_same_bits_and_writes_over_ffn0s_output():
    from wanfit.models.configs import WAN_TINY
    from wanfit.runtime.chunking import apply_chunking

    torch.manual_seed(0)
    model = WanDiT(WAN_TINY).eval()
    x, t, context = torch.randn(1, 16, 3, 6, 10), torch.tensor([700.0]), torch.randn(1, 16, WAN_TINY.text_dim)
    seen = {}
    ffn = model.blocks[0].ffn
    ffn[0].register_forward_hook(lambda m, a, out: seen.__setitem__("ffn0_out", out.data_ptr()))
    ffn[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("ffn2_in", a[0].data_ptr()))
    with torch.no_grad():
        separate = model(x, t, context)
        assert seen["ffn2_in"] != seen["ffn0_out"]  # GELU wrote a tensor of its own
        apply_chunking(model.blocks, attention_chunk=None, ffn_chunk=None, ffn_gelu_in_place=True)
        in_place = model(x, t, context)
        assert seen["ffn2_in"] == seen["ffn0_out"]  # GELU wrote over ffn.0's output
        apply_chunking(model.blocks, attention_chunk=None, ffn_chunk=11, ffn_gelu_in_place=True)
        chunked = model(x, t, context)  # each chunk's hidden written over as well
    assert torch.equal(in_place, separate)
    torch.testing.assert_close(chunked, separate, atol=1e-5, rtol=1e-5)
    # With autograd on (training the built-in model) it keeps the GELU's input for the backward.
    out = model(x, t, context)
    assert seen["ffn2_in"] != seen["ffn0_out"]
    out.sum().backward()
    assert model.blocks[0].ffn[0].weight.grad is not None
