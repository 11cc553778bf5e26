"""LoRAs in the plan (issue 13): the planner picks merge or the runtime branch, the user's --set wins,
the pipeline obeys the plan, and the estimates count what each mode costs."""

import json
from dataclasses import replace

import pytest
import torch

from tests.helpers import tiny_lora
from tests.helpers.hardware import emulated
from tests.helpers.tiny_model_dir import save_demo_official_layout
from tests.test_lora_runtime import make_lora
from wanfit.cli import main
from wanfit.commands import common
from wanfit.demo import tiny_pipeline
from wanfit.errors import ConfigError
from wanfit.models.configs import WAN_T2V_1_3B, WAN_TINY
from wanfit.plan.estimates import GIB, Request, estimate_denoise, estimate_phases
from wanfit.plan.host_estimates import host_bytes
from wanfit.plan.lora import LoraShapes, lora_memory, lora_mode_rule
from wanfit.plan.plan import Plan, parse_plan_overrides
from wanfit.plan.planner import Budget, budget_from_probe, lora_base_copy_choice, plan_run, step_down
from wanfit.plan.planning import Constraints, model_request, plan_for
from wanfit.plan.timing import LORA_PER_CALL_MERGE_FORWARD_COST, estimate_time
from wanfit.runtime.lora import parameter_shapes

BLOCK_LINEARS = tuple(tiny_lora.MODULES)
TINY_CALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2, seed=1, progress=False)


def every_block_linear(config, rank: int) -> LoraShapes:
    """A LoRA of `rank` on every block Linear of `config` (shapes only)."""
    ranks = tuple((f"blocks.{i}.{m}", rank) for i in range(config.num_layers) for m in BLOCK_LINEARS)
    return LoraShapes(ranks)


RANK_64 = every_block_linear(WAN_T2V_1_3B, 64)  # shaped like LightX2V's step-distill LoRA


def planned(card: str = "h100", loras=RANK_64, **constraints):
    request = replace(model_request("1.3B", steps=50), loras=loras)
    return plan_for(request, Constraints.from_options(**constraints), emulated(card, 128))


# --- the planner decides ------------------------------------------------------------------------------


def test_the_planner_merges_into_a_resident_dit_and_per_call_into_streamed_or_fp8_blocks():
    resident = planned()
    assert resident.plan.dit_blocks_resident is None and resident.plan.storage_dtype is None
    assert resident.plan.lora_mode == "merge"
    assert resident.lora_summary.startswith("LoRAs: merged into the weights (the DiT is resident in bfloat16")

    streamed = planned(vram="3GiB")
    assert streamed.plan.dit_blocks_resident is not None and streamed.plan.lora_mode == "merge_per_call"
    assert "a copy of each block Linear's weight at each call" in streamed.lora_summary
    assert "stream" in streamed.lora_summary

    fp8 = planned(fp8=True)
    assert fp8.plan.storage_dtype == "float8_e4m3fn" and fp8.plan.lora_mode == "merge_per_call"
    assert "upcast copy" in fp8.lora_summary

    # Beside the fast tier's fp8 GEMMs (which hold their own quantised copies), the branch.
    assert lora_mode_rule(Plan(device="cuda", fp8_gemm=True))[0] == "runtime"
    assert lora_mode_rule(Plan(device="cuda", fp8_gemm=True, dit_blocks_resident=3))[0] == "runtime"

    assert planned(loras=None).plan.lora_mode is None  # no LoRA, no mode


def test_the_planner_keeps_the_base_weights_on_the_gpu_where_they_fit_and_nowhere_for_the_cli():
    api = planned()  # the Python API may unload: a copy, on the H100 beside the weights
    assert api.plan.lora_base_copy == "device"
    copy = api.phases["denoise"].detail["lora_base_copy"]
    shapes = parameter_shapes(WAN_T2V_1_3B)
    assert copy == 2 * sum(torch.Size(shapes[f"{m}.weight"]).numel() for m, _ in RANK_64.ranks)  # bf16
    assert "Base weights kept on the GPU" in api.lora_summary
    host_copy = replace(api.plan, lora_base_copy="host")
    with_copy = estimate_phases(api.request, api.plan)["denoise"].peak
    assert with_copy == estimate_phases(api.request, host_copy)["denoise"].peak + copy
    assert host_bytes(api.request, host_copy) == host_bytes(api.request, api.plan) + copy

    # Where the copy would not fit, the host; the planner's search itself is unchanged by it.
    need = max(p.peak for p in estimate_phases(api.request, api.plan, api.attention_backend).values())
    for budget, where in ((need - 1, "host"), (need, "device")):
        assert (
            lora_base_copy_choice(api.request, api.plan, Budget(budget, 1 << 62, "t"), api.attention_backend)
            == where
        )
    assert planned(vram="3GiB").plan.lora_base_copy == "host"  # streamed blocks: on the host

    cli = plan_for(
        replace(api.request, lora_unloadable=False), Constraints.from_options(), emulated("h100", 128)
    )
    assert cli.plan.lora_base_copy == "none" and "No copy of the base weights" in cli.lora_summary
    assert host_bytes(cli.request, cli.plan) == host_bytes(api.request, host_copy) - copy
    assert planned(loras=None).plan.lora_base_copy is None


def test_out_of_memory_moves_the_base_copy_to_the_host_first():
    api = planned()
    lighter = step_down(api.plan, api.request, "denoise", frozen=api.frozen)
    assert lighter == replace(api.plan, lora_base_copy="host")
    assert step_down(api.plan, api.request, "denoise", frozen={"lora_base_copy"}).lora_base_copy == "device"


def test_a_cli_job_keeps_no_base_copy_and_a_batch_of_several_sizes_does(tiny_model, fixed_hosts, capsys):
    root, lora = tiny_model
    base = ["plan", "--model", str(root), "--emulate", "h100", "--size", "48x32", "--frames", "5", "--json"]
    assert main([*base, "--lora", str(lora)]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["lora_base_copy"] == "none"
    assert main([*base, "--lora", str(lora), "--set", "lora_base_copy=device"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["lora_base_copy"] == "device"


def test_a_user_merge_on_a_streamed_plan_is_kept_and_said():
    result = planned(settings=["dit_blocks_resident=0", "lora_mode=merge"])
    assert result.plan.dit_blocks_resident == 0 and result.plan.lora_mode == "merge"
    assert "lora_mode" in result.frozen
    assert "as set (lora_mode=merge)" in result.lora_summary and "would choose merge_per_call" in result.lora_summary
    assert not any("LoRA" in n for n in result.notes)  # generate prints notes; this is `wanfit plan`'s
    # And the memory follows the mode that runs: no branch in the denoising phase.
    branched = planned(settings=["dit_blocks_resident=0"])
    assert result.phases["denoise"].detail["lora_factors"] == 0
    assert branched.phases["denoise"].detail["lora_factors"] > 0


def test_a_streamed_plan_merges_as_set_and_runs_like_a_resident_merge():
    """What the runtime can do: a merge into the streamer's stored copies gives the resident frames."""
    lora = make_lora()
    frames = {}
    for name, plan in {
        "resident": Plan(device="cpu", lora_mode="merge"),
        "streamed": Plan(device="cpu", dit_blocks_resident=0, lora_mode="merge"),
    }.items():
        pipe = tiny_pipeline(plan=plan)
        pipe.load_lora(lora, 0.8)
        assert pipe.lora.mode == "merge" and pipe.lora.branches == []
        frames[name] = pipe("a fox", **TINY_CALL)
        assert pipe.placement.dit.streamer is not None or name == "resident"
    assert (frames["resident"] == frames["streamed"]).all()


def test_loras_on_a_sharded_dit_are_refused_in_one_sentence_and_never_chosen():
    request = replace(model_request("1.3B"), loras=every_block_linear(WAN_T2V_1_3B, 8))
    device = budget_from_probe(emulated("h100", 128))
    sharded = parse_plan_overrides(["cfg_parallel=2", "dit_sharding=fsdp"])
    with pytest.raises(ConfigError) as err:
        plan_run(device, request, overrides=sharded)
    message = str(err.value)
    assert message.count(". ") == 0 and message.endswith(".") and "dit_sharding=fsdp" in message
    # Left to the planner, a DiT too large for the card streams instead of sharding.
    tight = plan_run(device, request, overrides={"cfg_parallel": 2}, vram=4 * GIB)
    assert tight.plan.dit_sharding == "none" and tight.plan.lora_mode == "merge_per_call"
    unlora = plan_run(device, replace(request, loras=None), overrides={"cfg_parallel": 2}, vram=4 * GIB)
    assert unlora.plan.dit_sharding == "fsdp"  # what the LoRAs changed


# --- the pipeline obeys ---------------------------------------------------------------------------------


def test_the_pipeline_applies_the_plans_mode_not_the_rules():
    lora = make_lora()
    # A resident fp32 DiT, where the rule would merge: the plan says runtime.
    pipe = tiny_pipeline(plan=Plan(device="cpu", lora_mode="runtime"))
    pipe.load_lora(lora)
    assert pipe.lora.mode == "runtime" and len(pipe.lora.branches) == WAN_TINY.num_layers * 10
    # A streamed DiT, where the rule would merge per call: the plan says merge.
    pipe = tiny_pipeline(plan=Plan(device="cpu", dit_blocks_resident=0, lora_mode="merge"))
    base = pipe.dit.blocks[0].self_attn.q.weight.clone()
    pipe.load_lora(lora)
    assert pipe.lora.mode == "merge" and pipe.lora.branches == []
    assert not torch.equal(pipe.dit.blocks[0].self_attn.q.weight, base)


def test_an_explicit_mode_overrides_the_plan_and_the_plan_records_what_runs():
    lora = make_lora()
    pipe = tiny_pipeline(plan=Plan(device="cpu"))  # made before any LoRA was known
    assert pipe.plan.lora_mode is None
    pipe.load_lora(lora)
    assert pipe.plan.lora_mode == pipe.lora.mode == "merge"  # the planner's rule for it
    pipe.unload_loras()
    pipe.load_lora(lora, mode="runtime")
    assert pipe.plan.lora_mode == pipe.lora.mode == "runtime"
    assert pipe.run_record()["plan"]["lora_mode"] == "runtime"
    # A new plan that applies them otherwise re-applies them; one that says nothing keeps them.
    pipe.apply_plan(Plan(device="cpu", lora_mode="merge"))
    assert pipe.lora.mode == "merge" and pipe.lora.branches == []
    pipe.apply_plan(Plan(device="cpu"))
    assert pipe.lora.mode == pipe.plan.lora_mode == "merge"


# --- what they cost -------------------------------------------------------------------------------------


def bench_request(loras) -> Request:
    """benchmarks/bench_lora.py's forward: 1.3B, 832x480x81, one sample."""
    return Request(WAN_T2V_1_3B, guidance=False, loras=loras)


def test_the_runtime_branch_estimate_matches_the_h200_measurement():
    """Measured (bench_lora.py, H200, 2026-12-02, rank 64 on 305 modules, 300 block Linears): the
    branch (its add in place, q/k/v sharing a down-projection) raised the forward's peak 4.65 -> 4.85
    GiB (+0.20); a merge left it unchanged. Estimated: +0.175 GiB (0.163 factors + 0.012 for q/k/v's
    stacked x A^T), 12% under: the rest is not accounted for (allocator rounding, cuBLAS workspace)."""
    loras = RANK_64
    base = estimate_denoise(
        bench_request(None), Plan(device="cuda", compute_dtype="bfloat16"), "sdpa_cudnn", others=False
    )
    added = {}
    for mode in ("runtime", "merge"):
        plan = Plan(device="cuda", compute_dtype="bfloat16", lora_mode=mode)
        added[mode] = (
            estimate_denoise(bench_request(loras), plan, "sdpa_cudnn", others=False).peak - base.peak
        )
    assert added["merge"] == 0
    assert abs(added["runtime"] / GIB - 0.20) < 0.15 * 0.20, added["runtime"] / GIB


def test_the_branch_estimate_grows_with_the_rank_and_a_merge_costs_only_while_it_runs():
    plan = Plan(device="cuda", compute_dtype="bfloat16", lora_mode="runtime")
    peaks = [
        estimate_phases(bench_request(every_block_linear(WAN_T2V_1_3B, r)), plan)["denoise"].peak
        for r in (8, 32, 128)
    ]
    assert peaks[0] < peaks[1] < peaks[2]
    merge = Plan(device="cuda", compute_dtype="bfloat16", lora_mode="merge")
    request = bench_request(RANK_64)
    with_lora, without = estimate_phases(request, merge), estimate_phases(bench_request(None), merge)
    assert with_lora["denoise"].peak == without["denoise"].peak
    # The fp32 value and delta of the largest weight (ffn: 8960 x 1536), before the denoising.
    assert with_lora["text_encoder"].detail["lora_merge"] == 2 * 4 * 8960 * 1536
    # The base weights kept for unloading: on the host, most of the DiT in merge mode.
    assert lora_memory(request, merge).host > 2 * GIB > lora_memory(request, plan).host
    assert host_bytes(request, merge) > host_bytes(bench_request(None), merge) + 2 * GIB


def test_the_time_estimate_pays_the_branch_per_step_or_the_merge_once():
    resident, streamed = planned(), planned(vram="3GiB")
    assert resident.plan.lora_base_copy == "device"  # a library caller may unload: the copy fits beside it
    # 1.39e9 elements merged at the H200's measured speed per base copy: on the device 0.53 s for the
    # 14B's 1.405e10, to the host 23.84 s.
    assert estimate_time(resident, 50).lora_merge_s == pytest.approx(0.53 * 1.392 / 14.05, rel=0.01)
    to_host = replace(resident, plan=replace(resident.plan, lora_base_copy="host"))
    assert estimate_time(to_host, 50).lora_merge_s == pytest.approx(23.84 * 1.392 / 14.05, rel=0.01)
    unlora = replace(streamed, request=replace(streamed.request, loras=None))
    ratio = estimate_time(streamed, 50).denoise_s / estimate_time(unlora, 50).denoise_s
    # A streamed plan merges per call; rank 64 on every block Linear: the measured cost of that merge
    assert streamed.plan.lora_mode == "merge_per_call"
    assert ratio == pytest.approx(1 + LORA_PER_CALL_MERGE_FORWARD_COST)
    runtime = replace(streamed, plan=replace(streamed.plan, lora_mode="runtime"))
    ratio = estimate_time(runtime, 50).denoise_s / estimate_time(unlora, 50).denoise_s
    assert ratio == pytest.approx(1.050)  # the branch: the measured LoRA (compiled, 5.0%)


# --- the CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    save_demo_official_layout(root)
    factors = tiny_lora.random_factors(WAN_TINY.num_layers, WAN_TINY.dim, WAN_TINY.ffn_dim, rank=4)
    lora = tiny_lora.save(tiny_lora.comfy(factors, alpha=4.0), root / "style.safetensors")
    return root, lora


@pytest.fixture
def fixed_hosts(monkeypatch):
    monkeypatch.setattr(common, "hardware_from_args", lambda args: emulated(args.emulate or "cpu", 64))


def test_wanfit_plan_shows_the_mode_and_why(tiny_model, fixed_hosts, capsys):
    root, lora = tiny_model
    base = ["plan", "--model", str(root), "--emulate", "h100", "--size", "48x32", "--frames", "5"]
    assert main([*base, "--lora", str(lora)]) == 0
    text = capsys.readouterr().out
    assert "lora_mode: merge" in text and "\nLoRAs: merged into the weights (the DiT is resident" in text
    assert main([*base, "--lora", str(lora), "--set", "dit_blocks_resident=0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["lora_mode"] == "merge_per_call" and out["request"]["loras"]["max_rank"] == 4
    assert "stream" in out["lora_summary"]
    assert main(base) == 0
    text = capsys.readouterr().out
    assert "lora_mode: no LoRA" in text and "LoRAs:" not in text


def test_lora_mode_is_a_checked_setting(capsys):
    assert main(["plan", "--list-settings"]) == 0
    assert "lora_mode: how LoRAs are applied" in capsys.readouterr().out
    assert parse_plan_overrides(["lora_mode=runtime"]) == {"lora_mode": "runtime"}
    assert parse_plan_overrides(["lora_mode=merge_per_call"]) == {"lora_mode": "merge_per_call"}
    with pytest.raises(
        ConfigError, match="lora_mode takes one of merge, merge_per_call, runtime or none, got 'fused'"
    ):
        parse_plan_overrides(["lora_mode=fused"])


def test_lora_base_copy_none_is_the_choice_not_unset(capsys):
    # "none" is one of lora_base_copy's choices (keep no copy); it must not read as "let the planner choose".
    assert parse_plan_overrides(["lora_base_copy=none"]) == {"lora_base_copy": "none"}
    assert parse_plan_overrides(["lora_mode=none"]) == {"lora_mode": None}  # here none is unset
    assert parse_plan_overrides(["dit_sharding=none"]) == {"dit_sharding": "none"}  # was refused before
    assert planned().plan.lora_base_copy == "device"
    assert planned(settings=["lora_base_copy=none"]).plan.lora_base_copy == "none"
    assert main(["plan", "--list-settings"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("lora_base_copy:"))
    assert line.endswith("(one of device, host, none)")
