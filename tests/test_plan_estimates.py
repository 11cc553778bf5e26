"""Memory estimates: exact parameter counts from the real checkpoints' shapes; sane, monotonic peaks."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from wanfit.models.configs import WAN21_TEXT_ENCODER, WAN_T2V_1_3B, WAN_T2V_14B
from wanfit.models.vae import WAN21_VAE, WAN_VAE_TINY
from wanfit.plan import estimates as E
from wanfit.plan import host_estimates as H
from wanfit.plan.plan import Plan

MANIFESTS = Path(__file__).parent / "data" / "manifests"
GB = 1e9


def _tensors(name: str) -> dict:
    return json.loads((MANIFESTS / name).read_text())["tensors"]


def _count(tensors: dict, keep=lambda k: True) -> int:
    return sum(math.prod(shape) for key, shape in tensors.items() if keep(key))


@pytest.mark.parametrize(
    "config, manifest",
    [(WAN_T2V_1_3B, "official_wan2.1_t2v_1.3B_dit.json"), (WAN_T2V_14B, "official_wan2.1_t2v_14B_dit.json")],
)
def test_dit_parameter_counts_match_the_checkpoints(config, manifest):
    t = _tensors(manifest)
    assert sum(E.dit_block_params(config)) == _count(t, lambda k: k.startswith("blocks.0."))
    assert E.dit_nonblock_params(config) == _count(t, lambda k: not k.startswith("blocks."))
    assert E.dit_params(config) == _count(t)
    matrices = _count(t, lambda k: k.startswith("blocks.0.") and len(t[k]) == 2)
    assert E.dit_block_params(config)[0] == matrices


def test_text_encoder_and_vae_counts_match_the_checkpoints():
    t5 = _tensors("official_umt5_xxl_encoder.json")
    sizes = E.text_encoder_sizes(WAN21_TEXT_ENCODER)
    assert sizes.params == _count(t5) == 5_680_910_336
    assert sizes.layer == _count(t5, lambda k: k.startswith("blocks.0."))
    assert sizes.final_norm == _count(t5, lambda k: k == "norm.weight") == 4096
    vae = _tensors("official_wan2.1_vae.json")
    encoder, decoder = E.vae_params()
    assert encoder == _count(vae, lambda k: k.startswith(("encoder.", "conv1.")))
    assert decoder == _count(vae, lambda k: k.startswith(("decoder.", "conv2.")))
    assert encoder + decoder == 126_892_531


def _manifest(name: str) -> dict:
    return json.loads((MANIFESTS / name).read_text())


def test_counts_from_the_model_classes_equal_every_manifests_total():
    """The meta-built models against the totals of the released files, in both layouts."""
    for name, count in [
        ("official_wan2.1_t2v_1.3B_dit.json", E.dit_params(WAN_T2V_1_3B)),
        ("diffusers_wan2.1_t2v_1.3B_transformer.json", E.dit_params(WAN_T2V_1_3B)),
        ("official_wan2.1_t2v_14B_dit.json", E.dit_params(WAN_T2V_14B)),
        ("official_wan2.1_vae.json", sum(E.vae_params(WAN21_VAE))),
        ("diffusers_wan2.1_vae.json", sum(E.vae_params(WAN21_VAE))),
        ("official_umt5_xxl_encoder.json", E.text_encoder_sizes(WAN21_TEXT_ENCODER).params),
    ]:
        manifest = _manifest(name)
        assert count == manifest["num_params"] == _count(manifest["tensors"]), name
    # The diffusers text encoder stores its tied token embedding twice (shared and embed_tokens).
    diffusers_t5 = _manifest("diffusers_umt5_xxl_text_encoder.json")
    embedding = math.prod(diffusers_t5["tensors"]["shared.weight"])
    assert E.text_encoder_sizes(WAN21_TEXT_ENCODER).params == diffusers_t5["num_params"] - embedding


def test_vae_decoder_facts_come_from_the_decoder():
    """Tile margins, cached convs and level widths as the decoder module has them."""
    from wanfit.models.vae import CausalConv3d, Decoder3d

    sizes = E.vae_sizes(WAN21_VAE)
    assert sizes.tile_margins == (15, 12, 10, 7)  # the release's, num_res_blocks=2
    shallow = WAN_VAE_TINY.with_overrides(num_res_blocks=1)
    assert E.vae_sizes(shallow).tile_margins == tuple(Decoder3d(shallow).margins) == (11, 8, 7, 5)
    assert sizes.level_widths == (384, 384, 192, 96)
    decoder = Decoder3d(WAN_VAE_TINY)
    convs = [m for m in decoder.modules() if isinstance(m, CausalConv3d)]
    listed = [conv for _, conv in decoder.causal_convs()]
    assert len(listed) == len(convs) and {id(c) for c in listed} == {id(c) for c in convs}
    # conv1 + 4 in the middle + 2 per residual block (3 per level) + 2 time upsamplings + the head
    assert len(sizes.cached_convs) == 1 + 4 + 2 * 3 * 4 + 2 + 1
    assert {frames for _, _, frames in sizes.cached_convs} == {2}


def test_release_estimates_are_pinned():
    """The calibrated model's numbers for the release 1.3B at 832x480x81 (bf16, resident, untiled),
    as the hand-counted parameter tables gave them before the counts came from the model classes (the
    denoise activations as recalibrated on the H200 on 2026-12-02: one fp32 [B, L, dim] more at the FFN)."""
    phases = E.estimate_phases(REQ, _plan(ffn_gelu_in_place=False, residual_in_place=False), "sdpa_flash")
    got = {name: (p.weights, p.activations, p.workspace, p.cache) for name, p in phases.items()}
    # The default writes the FFN's GELU in place: the RoPE stage becomes the peak.
    assert E.estimate_phases(REQ, _plan(), "sdpa_flash")["denoise"].activations == 3039080448
    # The residual updates in place (the default): one fp32 [2, L, dim] stream less at the FFN.
    in_place = E.estimate_phases(REQ, _plan(ffn_gelu_in_place=False), "sdpa_flash")["denoise"].activations
    assert in_place == 4179652608 - 2 * REQ.tokens * 1536 * 4
    assert got == {
        "text_encoder": (14453599334, 142606336, 0, 8388608),
        "denoise": (3091778662, 4179652608, 0, 75481088),
        "vae_decode": (3091778662, 1229230080, 9609600, 1888573440),
    }
    tiled = E.estimate_vae_decode(REQ, _plan(vae_tile=(16, 16)), "sdpa_flash", others=False)
    assert (tiled.activations, tiled.cache) == (240630912, 241852992)


def _plan(**kw) -> Plan:
    base = {"device": "cuda", "compute_dtype": "bfloat16", "text_encoder_device": "cuda"}
    base["text_encoder_dtype"] = "bfloat16"
    return Plan(**{**base, **kw})


REQ = E.Request(WAN_T2V_1_3B)  # 832x480x81, guidance on


def test_request_shapes():
    assert REQ.tokens == 32760 and REQ.latent_frames == 21 and REQ.latent_hw == (60, 104)
    assert E.Request(WAN_T2V_14B, height=720, width=1280).tokens == 21 * 45 * 80


def test_resident_bf16_weights_of_1_3b():
    weights = E.dit_device_weights(WAN_T2V_1_3B, _plan())
    assert weights == 2 * 1_418_996_800  # ~2.84 GB
    assert E.dit_device_weights(WAN_T2V_1_3B, _plan(compute_dtype="float32")) == 2 * weights
    fp8 = E.dit_device_weights(WAN_T2V_1_3B, _plan(storage_dtype="float8_e4m3fn"))
    assert 0.5 * weights < fp8 < 0.56 * weights  # half, plus the upcast block and fp32-kept vectors


def test_streaming_lowers_the_denoise_peak_and_needs_host_memory():
    peaks = [
        E.estimate_denoise(REQ, _plan(dit_blocks_resident=k), "sdpa_flash").peak for k in (None, 20, 6, 2, 0)
    ]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 5
    block = sum(E.dit_block_params(WAN_T2V_1_3B)) * 2
    assert peaks[0] - peaks[-1] == (30 - 2) * block  # only the two streaming slots stay
    assert H.dit_host(REQ, _plan(dit_blocks_resident=6)).pinned == 24 * block
    assert H.dit_host(REQ, _plan()).pinned == 0


def test_denoise_grows_with_size_frames_and_cfg_batch():
    plan = _plan()
    base = E.estimate_denoise(REQ, plan, "sdpa_flash").peak
    assert E.estimate_denoise(replace(REQ, num_frames=41), plan, "sdpa_flash").peak < base
    assert E.estimate_denoise(replace(REQ, height=720, width=1280), plan, "sdpa_flash").peak > base
    single = E.estimate_denoise(REQ, _plan(cfg_batch=False), "sdpa_flash")
    assert single.peak < base
    no_cfg = E.estimate_denoise(replace(REQ, guidance=False), plan, "sdpa_flash")
    assert no_cfg.activations == single.activations and no_cfg.cache < single.cache  # one embedding
    # Activations of one sample at 32760 tokens: between 1 and 3 GB (diffusers measured 4.2 GiB with weights).
    assert 1 * GB < single.activations < 3 * GB


def test_attention_workspace_by_backend():
    # DESIGN.md: math attention for 12 heads at 32760 tokens peaked at 108 GiB on an H200.
    math_ws = E.attention_workspace("sdpa_math", 1, 12, 32760, 32760, 128, 2)
    assert abs(math_ws / 1024**3 - 108) < 1.0
    flash = E.attention_workspace("sdpa_flash", 1, 12, 32760, 32760, 128, 2)
    chunked = E.attention_workspace("chunked", 1, 12, 32760, 32760, 128, 2)
    assert flash < chunked < 1 * GB < math_ws
    assert E.attention_workspace("sdpa_math", 1, 12, 32760, 32760, 128, 2, query_chunk=1024) < math_ws / 30
    # Attention chunking matters for math attention only.
    math_peak = E.estimate_denoise(REQ, _plan(), "sdpa_math").peak
    assert E.estimate_denoise(REQ, _plan(attention_chunk=2048), "sdpa_math").peak < math_peak / 10
    flash_peak = E.estimate_denoise(REQ, _plan(), "sdpa_flash").peak
    assert E.estimate_denoise(REQ, _plan(attention_chunk=2048), "sdpa_flash").peak == flash_peak


def test_ffn_chunking_lowers_the_ffn_stage():
    full = E.dit_activations(REQ, _plan(cfg_batch=False, ffn_gelu_in_place=False), "sdpa_flash")
    chunked = E.dit_activations(
        REQ, _plan(cfg_batch=False, ffn_gelu_in_place=False, ffn_chunk=2048), "sdpa_flash"
    )
    assert full[2] == "ffn" and chunked[0] < full[0]


def test_vae_tiling_lowers_the_decode_peak():
    peaks = [
        E.estimate_vae_decode(REQ, _plan(vae_tile=t), "sdpa_flash").peak
        for t in (None, (64, 64), (32, 32), (16, 16))
    ]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4
    untiled = E.estimate_vae_decode(REQ, _plan(offload_dit_before_decode=True), "sdpa_flash", others=False)
    assert untiled.weights == 126_892_531 * 2
    # Causal caches of 2 frames per conv dominate an untiled 480p decode: ~1.9 GB in bf16.
    assert 1.7 * GB < untiled.cache < 2.1 * GB
    assert E.estimate_vae_decode(REQ, _plan(offload_dit_before_decode=True), "sdpa_flash").peak < peaks[0]
    # A tile as large as the latent changes nothing.
    assert E.estimate_vae_decode(REQ, _plan(vae_tile=(64, 128)), "sdpa_flash").peak == peaks[0]


def test_text_encoder_placements():
    on_device = E.estimate_text_encoder(REQ, _plan(), others=False)
    assert on_device.weights == 5_680_910_336 * 2  # 11.4 GB in bf16
    streamed = E.estimate_text_encoder(REQ, _plan(text_encoder_blocks_resident=0), others=False)
    assert streamed.weights == (4096 + 2 * E.text_encoder_sizes(WAN21_TEXT_ENCODER).layer) * 2
    on_cpu = E.estimate_text_encoder(REQ, _plan(text_encoder_device="cpu"), others=False)
    assert on_cpu.weights == 0 and on_cpu.activations == 0
    assert (
        H.text_encoder_host(REQ, _plan(text_encoder_device="cpu"), encoding=True).total() > 5_680_910_336 * 2
    )
    # Kept on the device, the encoder also weighs on the later phases; freed, it does not.
    kept = E.estimate_denoise(REQ, _plan(free_text_encoder=False), "sdpa_flash").peak
    freed = E.estimate_denoise(REQ, _plan(free_text_encoder=True), "sdpa_flash").peak
    assert kept - freed == 5_680_910_336 * 2


def test_phase_estimates_serialise():
    phases = E.estimate_phases(REQ, _plan())
    assert set(phases) == set(E.PHASES)
    d = phases["denoise"].to_dict()
    assert d["peak"] == d["weights"] + d["activations"] + d["workspace"] + d["cache"]
    assert E.peak_bytes(phases) == max(p.peak for p in phases.values())


def test_the_ffn_gelu_in_place_plans_one_hidden_tensor_less():
    """At 832x480x81 batch 2 in bf16 the FFN stage peaks (1.3B); writing the GELU over ffn.0's output
    takes one [B, L, ffn_dim] tensor off it, down to the next stage's peak (RoPE)."""
    base = E.dit_activations(REQ, _plan(ffn_gelu_in_place=False), "sdpa_flash")
    in_place = E.dit_activations(REQ, _plan(), "sdpa_flash")  # the default
    assert base[2] == "ffn" and in_place[0] < base[0]
    hidden = 2 * REQ.tokens * WAN_T2V_1_3B.ffn_dim * 2
    assert base[0] - in_place[0] <= hidden


def test_the_text_encoders_sizes_are_counted_once_then_read_from_the_user_cache(monkeypatch, tmp_path):
    # Counting imports transformers' umT5 modules (3-9 s in a fresh process); a plan alone reads the
    # counts an earlier process stored, per config and transformers version.
    import dataclasses
    import json

    from wanfit.builtin import BUILTIN_TEXT_ENCODER
    from wanfit.plan import estimates

    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path))
    sizes = estimates.text_encoder_sizes.__wrapped__  # past the in-process memo
    counted = []
    real_count = estimates._count_text_encoder
    monkeypatch.setattr(estimates, "_count_text_encoder", lambda c: counted.append(c) or real_count(c))
    first = sizes(BUILTIN_TEXT_ENCODER)
    assert counted == [BUILTIN_TEXT_ENCODER] and first.params > first.layer > 0
    assert sizes(BUILTIN_TEXT_ENCODER) == first and len(counted) == 1  # read back, not counted
    stored = json.loads((tmp_path / estimates.SIZES_FILE).read_text())
    (key,) = stored
    assert "transformers " in key and stored[key]["params"] == first.params
    # Another transformers version's entry is not taken for this one's, and an unreadable file is
    # counted again and rewritten.
    (tmp_path / estimates.SIZES_FILE).write_text(
        json.dumps({key.replace("transformers ", "transformers 0.0-"): stored[key]})
    )
    assert sizes(BUILTIN_TEXT_ENCODER) == first and len(counted) == 2
    (tmp_path / estimates.SIZES_FILE).write_text("{not json")
    assert sizes(BUILTIN_TEXT_ENCODER) == first and len(counted) == 3
    assert key in json.loads((tmp_path / estimates.SIZES_FILE).read_text())
    other = dataclasses.replace(BUILTIN_TEXT_ENCODER, num_layers=BUILTIN_TEXT_ENCODER.num_layers + 1)
    assert sizes(other).params > first.params and len(counted) == 4  # another config: its own entry
