"""Planner decisions per budget, --vram parsing, step_down, host RAM, downscaling."""

import pytest

from tests.helpers.hardware import emulated
from wanfit.errors import ConfigError, PlanError
from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B
from wanfit.plan import planner as P
from wanfit.plan.estimates import PHASES, Request, estimate_phases
from wanfit.plan.plan import parse_plan_overrides
from wanfit.plan.planning import plan_for

GIB = 1024**3
REQ = Request(WAN_T2V_1_3B)  # 832x480x81 with guidance


def card(name, cc, gib, host_gib=64.0, kind="cuda"):
    total = int(gib * GIB)
    return P.DeviceBudget(
        kind, name, cc, total, total - GIB // 2, int(host_gib * GIB), cc is not None and cc >= (8, 0)
    )


H100 = card("H100", (9, 0), 79.1, 256)
T4 = card("T4", (7, 5), 15.0, 30)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4GiB", 4 * GIB),
        ("6000MiB", 6000 * 1024**2),
        ("12GB", 12 * 10**9),
        ("1.5 GiB", int(1.5 * GIB)),
        ("2g", 2 * GIB),
        ("4294967296", 4 * GIB),
    ],
)
def test_parse_bytes(text, expected):
    assert P.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "four", "4XB", "-1GiB", "0", "100KiB", "4 Gib extra"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ConfigError, match="--vram"):
        P.parse_bytes(text)


def test_the_planner_takes_its_compute_dtype_from_the_precision_policy():
    def dtype(**kw):
        device = P.DeviceBudget("cuda", "card", (7, 5), 16 * GIB, 16 * GIB, 64 * GIB, **kw)
        return P.fastest_plan(device, P.default_request()).compute_dtype

    assert dtype(bf16_native=True) == "bfloat16"
    assert dtype(bf16_native=False) == "float16"
    assert dtype(bf16_native=False, fp16_native=False) == "float32"
    cpu = P.DeviceBudget("cpu", "CPU", None, 32 * GIB, 32 * GIB, 32 * GIB, False)
    assert P.fastest_plan(cpu, P.default_request()).compute_dtype == "float32"


def test_budget_from_an_emulated_probe():
    from wanfit.hardware.probe import probe

    t4 = P.budget_from_probe(probe(emulate="t4"), attention_backend="sdpa_efficient")
    assert (t4.kind, t4.compute_capability, t4.bf16_native) == ("cuda", (7, 5), False)
    assert t4.total_bytes == 15 * GIB and not t4.compilable  # emulated: nothing compiles
    assert P.fastest_plan(t4, P.default_request()).compute_dtype == "float16"


def test_budget_is_free_memory_minus_a_margin_or_vram():
    budget = P.make_budget(H100)
    assert budget.device_bytes == H100.free_bytes - int(0.05 * H100.total_bytes) and budget.margin_bytes > 0
    assert P.make_budget(H100, 4 * GIB).device_bytes == 4 * GIB


def _fits(result):
    assert result.peak_bytes <= result.budget.device_bytes
    assert result.host_bytes <= result.budget.host_bytes
    assert all(p.peak <= result.budget.device_bytes for p in result.phases.values())


def test_80gb_card_keeps_everything_resident_and_batches_cfg():
    result = P.plan_run(H100, REQ)
    _fits(result)
    plan = result.plan
    assert plan == P.fastest_plan(H100, REQ) and result.steps == ()
    assert plan.cfg_batch and plan.dit_blocks_resident is None and plan.vae_tile is None
    assert not plan.free_text_encoder and plan.text_encoder_device == "cuda"
    assert plan.compute_dtype == "bfloat16" and plan.ffn_chunk is None


def test_t4_runs_fp16_with_the_text_encoder_out_of_the_way():
    result = plan_for(REQ, hardware=emulated("t4", host_gib=30))
    _fits(result)
    plan = result.plan
    # The dispatcher's choice on a T4 (no flash or cuDNN below sm_80), recorded per kind in the plan.
    assert plan.compute_dtype == "float16" and plan.self_attention == "sdpa_efficient"
    assert result.attention_backend == "sdpa_efficient" and plan.cross_attention == "sdpa_efficient"
    assert (
        plan.free_text_encoder
        or plan.text_encoder_device == "cpu"
        or plan.text_encoder_blocks_resident is not None
    )
    # Kept on the card through the denoising, umT5 (11.4 GB) next to the DiT would not fit 15 GiB.
    full = estimate_phases(REQ, P.fastest_plan(result.device, REQ), "sdpa_efficient")
    assert full["denoise"].peak > result.budget.device_bytes and result.steps


def test_4gib_streams_the_dit_and_the_tightest_budget_tiles_and_chunks_too():
    four = P.plan_run(H100, REQ, vram=4 * GIB)
    _fits(four)
    assert four.plan.dit_blocks_resident is not None and four.plan.text_encoder_device == "cuda"
    assert four.plan.vae_tile is None and four.plan.ffn_chunk is None
    # With the FFN's GELU in place or in ffn.0's GEMM (the defaults on CUDA) the tightest plan needs no
    # FFN chunks; with both off (the user's settings, kept) the FFN stage is the DiT's peak and gets
    # chunked too.
    with pytest.raises(P.NoPlanError) as err:
        P.plan_run(H100, REQ, vram=GIB)
    tight_in_place = P.plan_run(H100, REQ, vram=err.value.min_budget_bytes + 32 * 1024**2)
    _fits(tight_in_place)
    assert tight_in_place.plan.ffn_gelu_in_place and tight_in_place.plan.ffn_chunk is None
    off = {"ffn_gelu_in_place": False, "ffn_gelu_epilogue": False}
    with pytest.raises(P.NoPlanError) as err_off:
        P.plan_run(H100, REQ, vram=GIB, overrides=off)
    tight = P.plan_run(H100, REQ, vram=err_off.value.min_budget_bytes + 32 * 1024**2, overrides=off)
    _fits(tight)
    plan = tight.plan
    assert plan.dit_blocks_resident is not None and plan.vae_tile is not None and plan.ffn_chunk is not None
    assert not plan.cfg_batch and plan.offload_dit_before_decode
    # Reported in the give-up order.
    order = [k.name for k in P.KNOBS]
    assert list(tight.steps) == sorted(tight.steps, key=order.index)
    assert {"stream_dit_blocks", "vae_tiling", "ffn_chunking"} <= set(tight.steps)


def test_streaming_keeps_as_many_blocks_resident_as_fit():
    result = P.plan_run(H100, REQ, vram=4 * GIB)
    k = result.plan.dit_blocks_resident
    from dataclasses import replace

    more = estimate_phases(REQ, replace(result.plan, dit_blocks_resident=k + 1), result.attention_backend)
    assert max(p.peak for p in more.values()) > 4 * GIB


def test_1gib_is_refused_naming_the_smallest_budget():
    with pytest.raises(P.NoPlanError, match=r"smallest plan needs a budget of \d+\.\d\d GiB") as err:
        P.plan_run(H100, REQ, vram=1 * GIB)
    need = err.value.min_budget_bytes
    assert need > 1 * GIB and P.fmt_bytes(need) in str(err.value)
    _fits(P.plan_run(H100, REQ, vram=need))  # and that budget does work
    with pytest.raises(PlanError):
        P.plan_run(H100, REQ, vram=need - 64 * 1024**2)


def test_allow_downscale_lowers_the_request_loudly():
    result = P.plan_run(H100, REQ, vram=1 * GIB, allow_downscale=True)
    _fits(result)
    w, h, f = result.plan.output_size
    assert w * h * f < 832 * 480 * 81 and (f - 1) % 4 == 0 and w % 16 == 0 and h % 16 == 0
    assert result.requested == REQ and result.notes[0].startswith("DOWNSCALED")


def test_host_ram_is_a_budget_too():
    colab = card("T4", (7, 5), 15.0, host_gib=10.0)
    result = P.plan_run(colab, REQ)
    _fits(result)
    # Pinned copies of umT5's blocks (8.6 GiB) do not fit beside the process: they stream from the file.
    plan = result.plan
    assert plan.text_encoder_blocks_resident is not None and plan.text_encoder_stream_source == "mmap"
    assert "text_encoder_from_file" in result.steps and plan.dit_stream_source == "pinned"
    roomy = P.plan_run(card("T4", (7, 5), 15.0, host_gib=30.0), REQ)
    assert roomy.plan.text_encoder_stream_source == "pinned"  # fastest where the RAM allows
    # 14B at 720p on a T4 streams the DiT too; 20 GiB is enough once both stream from their files.
    big = P.plan_run(card("T4", (7, 5), 15.0, host_gib=20), Request(WAN_T2V_14B, height=720, width=1280))
    _fits(big)
    assert big.plan.dit_blocks_resident is not None and big.plan.dit_stream_source == "mmap"
    with pytest.raises(P.NoPlanError, match="host RAM") as err:
        P.plan_run(card("T4", (7, 5), 15.0, host_gib=20), REQ, ram=2 * GIB)
    assert err.value.host_bytes_needed > 2 * GIB
    assert P.fmt_bytes(err.value.host_bytes_needed) in str(err.value) and str(err.value).count(". ") == 0


def test_overrides_are_kept():
    result = P.plan_run(H100, REQ, overrides={"cfg_batch": False, "vae_tile": (32, 32)})
    assert not result.plan.cfg_batch and result.plan.vae_tile == (32, 32)
    assert parse_plan_overrides(["cfg_batch=false", "vae_tile=32", "dit_blocks_resident=4"]) == {
        "cfg_batch": False,
        "vae_tile": (32, 32),
        "dit_blocks_resident": 4,
    }
    for bad in (["nonsense=1"], ["cfg_batch"], ["cfg_batch=maybe"], ["ffn_chunk=lots"]):
        with pytest.raises(ConfigError):
            parse_plan_overrides(bad)


def test_fp8_halves_the_streamed_bytes():
    plain = P.plan_run(H100, REQ, vram=3 * GIB)
    fp8 = P.plan_run(H100, REQ, vram=3 * GIB, fp8=True)
    assert fp8.plan.storage_dtype == "float8_e4m3fn"
    assert (
        fp8.plan.dit_blocks_resident is None or fp8.plan.dit_blocks_resident > plain.plan.dit_blocks_resident
    )


def _changes(a, b):
    da, db = a.to_dict(), b.to_dict()
    return {k for k in da if da[k] != db[k]}


def test_step_down_sequences():
    plan = P.fastest_plan(H100, REQ)
    seen = []
    while (nxt := P.step_down(plan, REQ, "denoise")) is not None:
        before, after = estimate_phases(REQ, plan, "sdpa_flash"), estimate_phases(REQ, nxt, "sdpa_flash")
        assert after["denoise"].peak < before["denoise"].peak
        seen.append(_changes(plan, nxt))
        plan = nxt
    assert seen[:3] == [{"free_text_encoder"}, {"cfg_batch"}, {"dit_blocks_resident"}]
    ks = [None]
    plan = P.fastest_plan(H100, REQ)
    while (plan := P.step_down(plan, REQ, "denoise")) is not None:
        if plan.dit_blocks_resident != ks[-1]:
            ks.append(plan.dit_blocks_resident)
    assert ks == [None, 15, 7, 3, 1, 0]

    plan, tiles = P.fastest_plan(H100, REQ), []
    first = P.step_down(plan, REQ, "vae_decode")
    assert _changes(plan, first) == {"free_text_encoder"}
    plan = first
    while (plan := P.step_down(plan, REQ, "vae_decode")) is not None:
        tiles.append(plan.vae_tile)
    assert tiles[0] is None and tiles[1] == (64, 64) and tiles[-1] == (8, 8)  # offload first, then tiles

    leanest = P._leanest(REQ, P.fastest_plan(H100, REQ), "sdpa_flash", frozenset())
    assert P.step_down(leanest, REQ) is None
    assert all(
        estimate_phases(REQ, leanest, "sdpa_flash")[p].peak
        <= estimate_phases(REQ, P.fastest_plan(H100, REQ), "sdpa_flash")[p].peak
        for p in PHASES
    )


def test_cpu_plans_on_the_cpu():
    cpu = P.DeviceBudget("cpu", "CPU", None, 64 * GIB, 60 * GIB, 60 * GIB, False, device="cpu")
    result = P.plan_run(cpu, REQ)
    _fits(result)
    assert result.plan.device == "cpu" and result.plan.compute_dtype == "float32"
    assert result.plan.dit_blocks_resident is None  # nothing to stream from on a CPU
    assert result.to_dict()["feasible"] is True
