"""The fast tier's memory, planned: what its fp8 GEMMs keep and hold per call (measured on the CPU against
the estimates), the phases that count them, the planner declining the tier where its copies do not fit,
and `wanfit plan --fast` showing the bytes."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.helpers.hardware import emulated
from tests.helpers.live_bytes import LiveBytes
from wanfit.cli import main
from wanfit.commands import common
from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B, WAN_TINY, DiTConfig
from wanfit.models.dit import Linear, WanDiT
from wanfit.plan import estimates as E
from wanfit.plan import planner as P
from wanfit.plan.plan import Plan
from wanfit.plan.planning import Constraints, model_request, plan_for
from wanfit.runtime import fp8_linear

GIB = 1024**3
MANIFESTS = Path(__file__).parent / "data" / "manifests"
FAST = Plan(device="cuda", compute_dtype="bfloat16", fp8_gemm=True)
# A small block with the 1.3B's FFN ratio (8960 / 1536), so the FFN is where a forward peaks.
RATIO = DiTConfig(dim=96, ffn_dim=560, freq_dim=32, num_heads=4, num_layers=1, text_dim=32, text_len=16)


def test_live_bytes_counts_the_storages_alive_at_once():
    before = torch.ones(1000)
    with LiveBytes() as live:
        a = before * 2  # 4000 bytes
        b = a + 1  # 8000 alive
        del a  # 4000
        c = b.view(-1)  # a view: nothing new
        d = (c * 2).to(torch.bfloat16)  # b, the fp32 product and its 2000-byte cast: 10000 at once
    assert live.peak == 10000 and live.now == 6000
    del b, c, d
    assert live.now == 0


# --- what the conversion keeps --------------------------------------------------------------------


def _held_by_gemms(dit: WanDiT) -> int:
    """Bytes of the storages the installed GEMMs hold that the model's own parameters do not."""
    own = {p.untyped_storage().data_ptr() for p in dit.parameters()}
    held = {}
    for layer in fp8_linear.block_linears(dit.blocks):
        for value in vars(layer.gemm).values():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in own:
                held[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(held.values())


def test_the_estimate_is_what_the_conversion_of_a_tiny_dit_keeps_beside_its_bf16_weights():
    torch.manual_seed(0)
    dit = WanDiT(WAN_TINY).to(torch.bfloat16)
    weights = {name: p.detach().clone() for name, p in dit.named_parameters()}
    returned = fp8_linear.install(dit.blocks)
    held = _held_by_gemms(dit)
    assert held > 0
    assert E.fast_tier_weights(WAN_TINY, FAST) == held == returned
    # The bf16 weights stay as they were, beside the copies.
    assert all(
        torch.equal(p, weights[name]) and p.dtype == torch.bfloat16 for name, p in dit.named_parameters()
    )
    # By hand: per block, 8 projections of dim x dim and the FFN's two, one byte an element and an fp32
    # scale per output channel.
    d, f = WAN_TINY.dim, WAN_TINY.ffn_dim
    per_block = 8 * (d * d + 4 * d) + (d * f + 4 * f) + (f * d + 4 * d)
    assert held == WAN_TINY.num_layers * per_block


def test_the_1_3b_fast_tier_keeps_about_1_3_gib_as_its_checkpoints_shapes_say():
    shapes = json.loads((MANIFESTS / "official_wan2.1_t2v_1.3B_dit.json").read_text())["tensors"]
    matrices = [s for key, s in shapes.items() if key.startswith("blocks.0.") and len(s) == 2]
    assert len(matrices) == 10  # q, k, v, o of both attentions and the FFN's two
    per_block = sum(rows * cols + 4 * rows for rows, cols in matrices)
    extra = E.fast_tier_weights(WAN_T2V_1_3B, FAST)
    assert extra == 30 * per_block
    assert 1.29 * GIB < extra < 1.31 * GIB  # ~46.4 M matrix elements a block, 30 blocks, 1 byte each
    assert 13.0 * GIB < E.fast_tier_weights(WAN_T2V_14B, FAST) < 13.2 * GIB


@pytest.mark.parametrize(
    "plan",
    [
        replace(FAST, fp8_gemm=False),
        replace(FAST, dit_blocks_resident=2),
        replace(FAST, storage_dtype="float8_e4m3fn"),
        replace(FAST, cfg_parallel=2, dit_sharding="fsdp"),
    ],
    ids=["exact", "streamed", "fp8-stored", "sharded"],
)
def test_no_fp8_copies_where_the_blocks_run_exact(plan):
    assert not plan.fast_tier_in_place and plan.tier == "exact"
    assert E.fast_tier_weights(WAN_T2V_1_3B, plan) == 0
    phases = E.estimate_phases(E.Request(WAN_T2V_1_3B), plan)
    assert all(p.detail["fp8_gemms"] == 0 for p in phases.values())


@pytest.mark.parametrize("offload", [False, True])
def test_the_phases_count_the_copies_while_the_dit_holds_them(offload):
    request = E.Request(WAN_T2V_1_3B)
    fast = replace(FAST, offload_dit_before_decode=offload)
    exact = replace(fast, fp8_gemm=False)
    extra = E.fast_tier_weights(WAN_T2V_1_3B, fast)
    with_copies, without = E.estimate_phases(request, fast), E.estimate_phases(request, exact)
    assert fast.tier == "fast" and with_copies["denoise"].weights == without["denoise"].weights + extra
    # Offloaded before the decode, the DiT leaves with its copies, and a later prompt's encoding finds
    # it on the host; else both find it placed as the denoising left it.
    for phase in ("text_encoder", "vae_decode"):
        assert with_copies[phase].weights == without[phase].weights + (0 if offload else extra)


# --- what a call holds ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "features, rows, bias, row_multiple",
    [
        ((96, 560), 1200, True, 1),
        ((560, 96), 1200, True, 1),
        ((96, 560), 1203, True, 16),
        ((560, 96), 1203, False, 16),
    ],
)
def test_one_eager_gemm_call_holds_what_call_peak_bytes_says(features, rows, bias, row_multiple):
    n_in, n_out = features
    layer = Linear(n_in, n_out, bias=bias).to(torch.bfloat16)
    gemm = fp8_linear.Fp8Gemm(layer, row_multiple=row_multiple)  # torch._scaled_mm: its CPU kernel
    x = torch.randn(rows, n_in).to(torch.bfloat16)
    with torch.no_grad(), LiveBytes() as live:
        out = gemm(x)
    assert out.shape == (rows, n_out)
    expected = fp8_linear.call_peak_bytes(
        n_in, n_out, rows, dtype_bytes=2, bias=bias, row_multiple=row_multiple
    )
    assert live.peak == expected
    weight = layer.weight.detach()
    with LiveBytes() as live:
        fp8_linear.quantize_rows(weight)
    assert live.peak == fp8_linear.quantize_peak_bytes(n_out, n_in)


@pytest.mark.parametrize("rows, row_multiple", [(1200, 1), (1202, 16), (1202, 1)])
def test_the_fast_ffn_peaks_as_the_estimate_says(rows, row_multiple):
    """The FFN exact holds its two [rows, ffn_dim] tensors at the GELU (FFN_HIDDEN_TENSORS); with fp8
    GEMMs, ffn.2's quantisation beside the GELU output is more, as fp8_ffn_bytes counts it (which pads
    the rows, as a kernel that takes only multiples of 16 would)."""
    torch.manual_seed(0)
    block = WanDiT(RATIO).to(torch.bfloat16).eval().blocks[0]
    h = torch.randn(1, rows, RATIO.dim).to(torch.bfloat16)
    with torch.no_grad(), LiveBytes() as exact:
        block.ffn(h)
    hidden = rows * RATIO.ffn_dim * 2
    assert exact.peak == E.FFN_HIDDEN_TENSORS * hidden
    fp8_linear.install(torch.nn.ModuleList([block]), row_multiple=row_multiple)
    with torch.no_grad(), LiveBytes() as fast:
        block.ffn(h)
    estimate = E.fp8_ffn_bytes(RATIO, rows, FAST)
    assert fast.peak > 1.5 * exact.peak  # the eager quantisation's fp32 copies: 8 bytes an element
    if rows % 16 == 0 or row_multiple == 16:
        assert fast.peak == estimate
    else:
        assert fast.peak < estimate  # a kernel that takes any row count pads nothing


def test_the_attention_sides_fp8_gemms_leave_its_peak_as_it_was():
    """Only the FFN's are counted: the projections' eager buffers stay below the RoPE stage's tensors."""
    torch.manual_seed(0)
    dit = WanDiT(RATIO).to(torch.bfloat16).eval()
    block = dit.blocks[0]
    block.self_attn.attention_chunk = 16  # the CPU's attention kernel keeps its scores small
    h = torch.randn(2, 600, RATIO.dim)
    context = torch.randn(2, RATIO.text_len, RATIO.dim).to(torch.bfloat16)
    rope = dit.rope((1, 1, 600), "cpu")

    def peaks():
        with torch.no_grad(), LiveBytes() as self_attention:
            block.self_attn(h, rope)
        with torch.no_grad(), LiveBytes() as cross_attention:
            block.cross_attn(h, context)
        return self_attention.peak, cross_attention.peak

    exact = peaks()
    fp8_linear.install(dit.blocks)
    assert all(m.gemm is not None for m in fp8_linear.block_linears(dit.blocks))
    assert peaks() == exact


def test_compiled_blocks_hold_far_less_than_eager_ones():
    request = E.Request(WAN_T2V_1_3B)
    fast = replace(FAST, ffn_gelu_in_place=False)  # buffers counted over the exact FFN with two hidden tensors
    eager = E.estimate_denoise(request, fast, "sdpa_flash").detail
    compiled = E.estimate_denoise(request, replace(fast, compile_dit=True), "sdpa_flash").detail
    assert eager["fp8_gemms"] == compiled["fp8_gemms"] > 0
    # Eagerly ffn.2's input is quantised through two fp32 copies [B*L, ffn_dim]: gigabytes at 480p.
    tokens = 2 * request.tokens
    assert eager["fp8_gemm_buffers"] > 2 * tokens * WAN_T2V_1_3B.ffn_dim * 2
    assert 0 < compiled["fp8_gemm_buffers"] < eager["fp8_gemm_buffers"] / 10


# --- the planner ----------------------------------------------------------------------------------


def test_where_the_copies_do_not_fit_beside_the_resident_dit_the_fast_tier_is_declined():
    request, hw = model_request("1.3B"), emulated("rtx4090")
    vram = 8 * GIB
    exact = plan_for(request, Constraints(vram=vram), hw)
    assert exact.plan.dit_blocks_resident is None  # the exact tier fits resident...
    with_copies = E.estimate_phases(request, replace(exact.plan, fp8_gemm=True), exact.attention_backend)
    assert E.peak_bytes(with_copies) > exact.budget.device_bytes  # ...and its fp8 copies do not
    fast = plan_for(request, Constraints(fast=True, vram=vram), hw)
    assert not fast.plan.fp8_gemm and fast.plan.tier == "exact"
    assert fast.plan == exact.plan  # the exact tier's plan, not a streamed one
    assert fast.peak_bytes == exact.peak_bytes
    (note,) = [n for n in fast.notes if "do not fit beside the resident DiT" in n]
    assert "1.30 GiB" in note and note.endswith("running exact.") and note.count(". ") == 0
    assert not any("fast tier: the DiT blocks' linears run as fp8" in n for n in fast.notes)


def test_the_fast_tier_gives_up_cheaper_things_before_it_is_declined():
    request, hw = model_request("1.3B"), emulated("rtx4090")
    vram = 10 * GIB
    exact = plan_for(request, Constraints(vram=vram), hw)
    fast = plan_for(request, Constraints(fast=True, vram=vram), hw)
    assert fast.plan.tier == "fast" and fast.plan.dit_blocks_resident is None
    assert exact.plan.cfg_batch and not fast.plan.cfg_batch  # room for the copies: CFG one after the other
    assert fast.phases["denoise"].detail["fp8_gemms"] == E.fast_tier_weights(request.config, fast.plan)
    assert fast.peak_bytes <= fast.budget.device_bytes


def test_where_both_tiers_stream_the_fast_tier_stays_asked_for_and_runs_exact():
    request, hw = model_request("1.3B"), emulated("rtx4090")
    fast = plan_for(request, Constraints(fast=True, vram=4 * GIB), hw)
    exact = plan_for(request, Constraints(vram=4 * GIB), hw)
    assert fast.plan.fp8_gemm and fast.plan.tier == "exact"
    assert replace(fast.plan, fp8_gemm=False) == exact.plan
    assert not any("do not fit beside the resident DiT" in n for n in fast.notes)


def test_a_compilable_card_plans_the_fused_quantisation():
    h200 = P.DeviceBudget("cuda", "H200", (9, 0), 140 * GIB, 139 * GIB, 256 * GIB, True, compilable=True)
    result = P.plan_run(h200, P.default_request(), overrides={"fp8_gemm": True})
    assert result.plan.compile_dit and result.plan.tier == "fast"
    compiled = E.estimate_denoise(result.request, result.plan, result.attention_backend)
    eager = E.estimate_denoise(
        result.request, replace(result.plan, compile_dit=False), result.attention_backend
    )
    assert result.phases["denoise"].peak == compiled.peak < eager.peak


# --- the command line -----------------------------------------------------------------------------


@pytest.fixture
def fixed_hosts(monkeypatch):
    monkeypatch.setattr(common, "hardware_from_args", lambda args: emulated(args.emulate or "cpu", 64))


def test_plan_fast_shows_the_copies_and_buffers_in_its_breakdown(fixed_hosts, capsys):
    assert main(["plan", "--json", "--fast", "--emulate", "h100"]) == 0
    out = json.loads(capsys.readouterr().out)
    denoise = out["phases"]["denoise"]["detail"]
    assert denoise["fp8_gemms"] == E.fast_tier_weights(WAN_T2V_1_3B, FAST) and denoise["fp8_gemm_buffers"] > 0
    assert main(["plan", "--fast", "--emulate", "h100"]) == 0
    text = capsys.readouterr().out
    (line,) = [line for line in text.splitlines() if line.startswith("fast tier:")]
    assert "add 1.30 GiB to the weights of text_encoder, denoise, vae_decode" in line
    assert f"(eager) raise a DiT forward's peak by {denoise['fp8_gemm_buffers'] / GIB:.2f} GiB" in line
    assert main(["plan", "--emulate", "h100"]) == 0
    assert "fast tier:" not in capsys.readouterr().out


def test_placing_the_fast_tier_peaks_at_its_largest_weights_quantisation():
    held, peak = E.dit_block_fp8_gemms(WAN_T2V_1_3B)
    assert peak == fp8_linear.quantize_peak_bytes(8960, 1536) == 8 * 8960 * 1536 + 4 * 8960  # ffn.0
    small = E.Request(WAN_T2V_1_3B, height=32, width=32, num_frames=1)  # 16 tokens: activations of kB
    denoise = E.estimate_denoise(small, FAST, "sdpa_flash")
    assert denoise.detail["peak_stage_fp8_quantisation"] >= peak
    assert E.estimate_denoise(small, replace(FAST, fp8_gemm=False), "sdpa_flash").activations < peak


def test_out_of_memory_recovery_gives_up_the_fast_tier_before_streaming_the_dit():
    # A fast 1.3B plan on an H200 that runs out of memory while denoising: the guard's first notch
    # that touches the DiT drops the fp8 copies (the tier), not its residency.
    result = plan_for(model_request("1.3B"), Constraints(fast=True), emulated("h200"))
    assert result.plan.fast_tier_in_place
    plan, chain = result.plan, []
    while plan is not None and plan.fast_tier_in_place:
        plan = P.step_down(plan, result.request, "denoise", frozen=result.frozen)
        chain.append(plan)
    assert plan is not None and plan.dit_blocks_resident is None and plan.dit_sharding == "none"
    assert not plan.fp8_gemm and plan.tier == "exact"
    # And the exact tier's denoise estimate is below the fast one's: the notch lowers the peak.
    before = E.estimate_phases(result.request, chain[-2] if len(chain) > 1 else result.plan, "sdpa_cudnn")
    after = E.estimate_phases(result.request, plan, "sdpa_cudnn")
    assert after["denoise"].peak < before["denoise"].peak
