"""CUDA graphs for the DiT's compiled block loop (issue 15): the planner's rule for Plan.cuda_graph,
the runner's keys, cache and fallback (a fake graph stands in for torch.cuda's, so it runs on the
CPU), the placement's lifetime of the graphs, and a pipeline that obeys the field."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.fake_cuda_graph import FakeOps
from tests.helpers.hardware import emulated
from wanfit.cli import main
from wanfit.commands import common
from wanfit.errors import WanfitWarning
from wanfit.models.configs import WAN_T2V_1_3B, WAN_TINY
from wanfit.models.dit import WanDiT
from wanfit.plan import planner as P
from wanfit.plan.estimates import Request
from wanfit.plan.plan import Plan, parse_plan_overrides
from wanfit.runtime.compile import CompiledBlocks
from wanfit.runtime.cuda_graph import WARMUP_ITERATIONS, GraphedBlocks
from wanfit.runtime.placement import DiTLayout, DiTPlacement

GIB = 1024**3
H200 = P.DeviceBudget("cuda", "NVIDIA H200", (9, 0), 140 * GIB, 139 * GIB, 256 * GIB, True, compilable=True)
CPU = P.DeviceBudget("cpu", "CPU", None, 64 * GIB, 60 * GIB, 60 * GIB, False, device="cpu")
REQ = replace(Request(WAN_T2V_1_3B), steps=50)
GRAPHED = dict(compile_dit=True, cuda_graph=True)


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path / "cache"))  # no measured compile costs


def planned(device=H200, request=REQ, **overrides):
    return P.plan_run(device, request, overrides=overrides)


# ----------------------------------------------------------------------------------- the planner


def test_a_resident_compiled_cuda_plan_keeps_the_graph_the_user_asked_for():
    result = planned(**GRAPHED)
    assert result.plan.cuda_graph and result.plan.cuda_graph_blocker is None
    assert any("replay as a CUDA graph" in n for n in result.notes)
    assert not planned().plan.cuda_graph  # opt-in: off until measured
    # A LoRA's runtime branch is kernels like any other: captured with the blocks.
    assert planned(lora_mode="runtime", **GRAPHED).plan.cuda_graph


@pytest.mark.parametrize(
    "device, overrides, why",
    [
        (CPU, {}, "does not run on CUDA"),
        (H200, {"dit_blocks_resident": 4}, "streamed"),
        (H200, {"storage_dtype": "float8_e4m3fn"}, "streamed"),
        (H200, {"compile_dit": False}, "not compiled (--set compile_dit=true)"),
        (H200, {"cache": "magcache"}, "step cache"),
        (H200, {"cfg_parallel": 2, "cfg_batch": False}, "several processes"),
        (H200, {"ulysses": 2}, "several processes"),
        (H200, {"dit_sharding": "fsdp", "cfg_parallel": 2, "cfg_batch": False}, "several processes"),
    ],
)
def test_the_planner_turns_the_graph_off_where_it_cannot_apply_and_says_why(device, overrides, why):
    result = planned(device, **{**GRAPHED, **overrides})
    assert not result.plan.cuda_graph
    note = next(n for n in result.notes if n.startswith("cuda_graph is off"))
    assert why in note


def test_a_compile_the_planner_declines_takes_the_graph_with_it():
    result = planned(request=replace(REQ, steps=2), cuda_graph=True)  # compiling does not pay in 2 steps
    assert not result.plan.compile_dit and not result.plan.cuda_graph
    assert any("cuda_graph is off: the DiT's blocks are not compiled" in n for n in result.notes)


def test_an_oom_notch_that_streams_the_dit_turns_the_graph_off():
    plan = planned(**GRAPHED).plan
    lower = plan
    while lower is not None and lower.dit_blocks_resident is None:
        lower = P.step_down(lower, REQ, "denoise", frozen={"compile_dit"})
        assert lower is None or lower.dit_blocks_resident is not None or lower.cuda_graph
    assert lower is not None and not lower.cuda_graph


def test_set_cuda_graph_true_survives_on_an_emulated_h200(monkeypatch, capsys):
    monkeypatch.setattr(common, "hardware_from_args", lambda args: emulated(args.emulate or "cpu", 64))
    base = ["plan", "--json", "--emulate", "h200", "--size", "832x480", "--frames", "81"]
    assert main([*base, "--set", "compile_dit=true", "--set", "cuda_graph=true"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["cuda_graph"] is True and "cuda_graph" in out["user_set"]
    # An emulated card does not compile by itself (no measured costs, no Triton check): no graph either.
    assert main([*base, "--set", "cuda_graph=true"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["cuda_graph"] is False
    assert any(n.startswith("cuda_graph is off") for n in out["notes"])


def test_set_reads_the_field_as_a_bool():
    assert parse_plan_overrides(["cuda_graph=true"]) == {"cuda_graph": True}
    assert Plan.from_dict(Plan(cuda_graph=True).to_dict()).cuda_graph


# ----------------------------------------------------------------------------------- the runner


def block(tokens, e, context, rope):
    return tokens * 0.5 + e.mean(dim=1, keepdim=True) + context.mean() + rope.real.mean()


def inputs_for(batch: int, seed: int = 0, rope=None):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        tokens=torch.randn(batch, 6, 4, generator=g),
        e=torch.randn(batch, 6, 4, generator=g),
        context=torch.randn(batch, 3, 4, generator=g),
        rope=rope if rope is not None else torch.polar(torch.ones(6, 1, 2), torch.zeros(6, 1, 2)),
    )


def graphed(ops=None, **kw):
    blocks = CompiledBlocks([block, block, block])
    return blocks, GraphedBlocks(blocks, ops=ops or FakeOps(), **kw)


@torch.no_grad()
def test_one_capture_per_key_and_each_replay_reads_the_new_inputs():
    blocks, runner = graphed()
    rope = inputs_for(1).rope
    for seed in range(3):
        x = inputs_for(2, seed, rope)
        torch.testing.assert_close(runner.run(x.tokens, x), blocks.run(x.tokens, x))
    assert runner.ops.captured == 1 and runner.ops.warmed == WARMUP_ITERATIONS and runner.replays == 3
    single = inputs_for(1, 7, rope)  # batch 1 (sequential CFG): a second graph
    torch.testing.assert_close(runner.run(single.tokens, single), blocks.run(single.tokens, single))
    assert runner.ops.captured == 2 and len(runner.graphs) == 2


@torch.no_grad()
def test_the_key_tells_apart_shapes_dtypes_and_ropes():
    x = inputs_for(2)
    key = GraphedBlocks.key(x.tokens, x)
    assert key == GraphedBlocks.key(x.tokens.clone(), SimpleNamespace(**{**vars(x), "e": x.e.clone()}))
    other_rope = SimpleNamespace(**{**vars(x), "rope": x.rope.clone()})
    assert GraphedBlocks.key(x.tokens, other_rope) != key
    assert GraphedBlocks.key(x.tokens.double(), x) != key
    longer = SimpleNamespace(**{**vars(x), "context": torch.zeros(2, 5, 4)})
    assert GraphedBlocks.key(x.tokens, longer) != key


@torch.no_grad()
def test_at_most_max_graphs_are_kept_the_least_recently_used_dropped():
    _, runner = graphed(max_graphs=2)
    rope = inputs_for(1).rope
    a, b, c = (inputs_for(n, n, rope) for n in (1, 2, 3))
    for x in (a, b, a, c):  # a was used after b: b goes
        runner.run(x.tokens, x)
    assert list(runner.graphs) == [GraphedBlocks.key(x.tokens, x) for x in (a, c)]
    runner.clear()
    assert not runner.graphs


@torch.no_grad()
def test_a_failed_capture_warns_once_runs_compiled_and_is_remembered_for_its_key():
    blocks, runner = graphed(FakeOps(fail=RuntimeError("operation not permitted when stream is capturing")))
    x = inputs_for(2)
    with pytest.warns(WanfitWarning, match="CUDA graph failed .*not permitted.*run compiled without one"):
        out = runner.run(x.tokens, x)
    torch.testing.assert_close(out, blocks.run(x.tokens, x))
    assert list(runner.failures) == [GraphedBlocks.key(x.tokens, x)] and not runner.graphs
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.run(x.tokens, x)  # no second warning, no second warm-up
    assert runner.ops.warmed == WARMUP_ITERATIONS


@torch.no_grad()
def test_out_of_memory_in_the_capture_is_the_oom_guards():
    _, runner = graphed(FakeOps(fail=torch.OutOfMemoryError("CUDA out of memory")))
    x = inputs_for(2)
    with pytest.raises(torch.OutOfMemoryError):
        runner.run(x.tokens, x)
    assert not runner.failures


def test_with_autograd_on_nothing_is_captured():
    blocks, runner = graphed()
    x = inputs_for(2)
    torch.testing.assert_close(runner.run(x.tokens, x), blocks.run(x.tokens, x))
    assert runner.ops.captured == 0 and runner.ops.warmed == 0


# ----------------------------------------------------------------------------------- the placement


class EagerBackend:
    """A torch.compile backend that runs the captured graphs eagerly (no compiler on the CPU)."""

    def __call__(self, graph, example_inputs):
        return graph.forward


@pytest.fixture
def cuda_anywhere(monkeypatch):
    """Plans on the CPU that the rule would allow on CUDA: the fake graph runs where the real one cannot."""

    def blocker(plan):
        return None if plan.device == "cpu" else Plan.cuda_graph_blocker.fget(plan)

    monkeypatch.setattr(Plan, "cuda_graph_blocker", property(blocker))


def make_placement(ops):
    torch.compiler.reset()
    torch.manual_seed(0)
    dit = WanDiT(WAN_TINY.with_overrides(num_layers=3)).eval().requires_grad_(False)
    return DiTPlacement(dit, compile_options={"backend": EagerBackend()}, graph_ops=ops)


@pytest.fixture(scope="module")
def dit_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 6, 10, generator=g)
    return x, torch.tensor([700.0]), torch.randn(1, 16, WAN_TINY.text_dim, generator=g)


def test_the_layout_replays_only_where_the_rule_allows():
    assert not DiTLayout.from_plan(Plan(**GRAPHED)).cuda_graph  # on the CPU
    assert DiTLayout.from_plan(Plan(device="cuda", **GRAPHED)).cuda_graph
    assert not DiTLayout.from_plan(Plan(device="cuda", dit_blocks_resident=2, **GRAPHED)).cuda_graph


@torch.no_grad()
def test_the_placement_replays_its_graphs_and_drops_them_with_what_they_captured(cuda_anywhere, dit_inputs):
    ops = FakeOps()
    placement = make_placement(ops)
    eager = placement.dit(*dit_inputs)
    plan = Plan(**GRAPHED)
    placement.place(plan)
    assert placement.graphed
    for _ in range(3):
        torch.testing.assert_close(placement(*dit_inputs), eager, atol=1e-5, rtol=1e-5)
    assert ops.captured == 1 and placement.graphs.replays == 3
    placement.place(plan)  # the same plan (the next denoise): the graphs are kept
    assert placement.graphed and len(placement.graphs.graphs) == 1

    placement.place(replace(plan, ffn_chunk=32))  # any plan change: captured again
    assert placement.graphed and not placement.graphs.graphs
    placement(*dit_inputs)
    placement.weights_changed()  # a LoRA merged or added as a branch
    assert not placement.graphed
    placement.place(plan)
    placement(*dit_inputs)
    assert ops.captured == 3
    placement.place(replace(plan, dit_blocks_resident=1))  # streamed: no compiled blocks, no graph
    assert placement.compiled_blocks is None and not placement.graphed
    placement.place(plan)
    placement.release()
    assert not placement.graphed
    placement.place(replace(plan, cuda_graph=False))
    assert placement.compiled_blocks is not None and not placement.graphed


@torch.no_grad()
def test_the_step_caches_runs_of_some_blocks_never_replay(cuda_anywhere, dit_inputs):
    ops = FakeOps()
    placement = make_placement(ops)
    placement.place(Plan(**GRAPHED))
    inputs = placement.embed(*dit_inputs)
    placement.run_blocks(inputs, start=0, end=2)
    placement.run_blocks(inputs)
    assert ops.captured == 0


# ----------------------------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("graph", [True, False])
def test_the_pipeline_obeys_the_field_and_moves_progress_per_step_under_a_graph(cuda_anywhere, graph):
    from wanfit.demo import tiny_pipeline
    from wanfit.pipeline import DenoiseState, initial_noise, latent_shape
    from wanfit.sampling import schedulers

    torch.compiler.reset()
    pipe = tiny_pipeline(device="cpu")
    ops = FakeOps()
    placed = pipe.placement.dit
    placed.compile_options, placed.graph_ops = {"dynamic": False, "backend": EagerBackend()}, ops
    hooks_seen = []
    for b in pipe.dit.blocks:  # how many forward hooks each block carries when it runs
        b.register_forward_pre_hook(lambda module, args: hooks_seen.append(len(module._forward_hooks)))
    cond, uncond = pipe.encode_prompts("a red fox", "", with_negative=True)

    def sample(plan):
        pipe.plan = plan
        scheduler = pipe.make_scheduler(None)
        timesteps = schedulers.set_timesteps(scheduler, 3, official=True)
        state = DenoiseState(initial_noise(latent_shape(1, 16, 32, 48, 5), 1), 0)
        return pipe.denoise(state, scheduler, timesteps, cond, uncond, 5.0, progress=True)

    reference = sample(replace(pipe.plan, compile_dit=True, cuda_graph=False))
    assert ops.captured == 0 and hooks_seen and all(n == 1 for n in hooks_seen)  # the bar's hook each block
    hooks_seen.clear()
    latents = sample(replace(pipe.plan, compile_dit=True, cuda_graph=graph))
    torch.testing.assert_close(latents, reference, atol=1e-5, rtol=1e-5)
    if graph:
        assert ops.captured == 1 and placed.graphs.replays == 3  # CFG batched: one forward a step
        assert hooks_seen and all(n == 0 for n in hooks_seen)  # the bar moves per step only
        assert "cuda_graph" not in pipe.run_record()["given_up"]
    else:
        assert ops.captured == 0 and not placed.graphed and all(n == 1 for n in hooks_seen)


@torch.no_grad()
def test_a_compile_that_fails_in_the_warm_up_runs_eagerly_without_graphs(cuda_anywhere, dit_inputs):
    def failing(graph, example_inputs):
        raise RuntimeError("no compiler here")

    ops = FakeOps()
    placement = make_placement(ops)
    placement.compile_options["backend"] = failing
    eager = placement.dit(*dit_inputs)
    placement.place(Plan(**GRAPHED))
    with pytest.warns(WanfitWarning, match="compiling the DiT's blocks failed"):
        out = placement(*dit_inputs)
    torch.testing.assert_close(out, eager)
    assert "compile" in placement.failures and placement.compiled_blocks is None and not placement.graphed
    assert ops.captured == 0


def test_a_pipeline_whose_capture_fails_runs_compiled_and_records_why(cuda_anywhere):
    from wanfit.demo import tiny_pipeline

    torch.compiler.reset()
    pipe = tiny_pipeline(device="cpu")
    placed = pipe.placement.dit
    placed.compile_options = {"dynamic": False, "backend": EagerBackend()}
    placed.graph_ops = FakeOps(fail=RuntimeError("capture not supported"))
    pipe.plan = replace(pipe.plan, **GRAPHED)
    with pytest.warns(WanfitWarning, match="CUDA graph failed"):
        pipe("a fox", height=32, width=48, num_frames=5, num_inference_steps=2, progress=False)
    given_up = pipe.run_record()["given_up"]
    assert "capture not supported" in given_up["cuda_graph"] and "compile" not in given_up
