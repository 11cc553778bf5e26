"""Several processes on gloo (issue 17): Ulysses and CFG-parallel give the one-process numbers, the
degrees are planned and refused clearly, and a failing or vanished process ends every process fast."""

import os
import signal
import time
from dataclasses import replace

import pytest
import torch

from tests.helpers.ranks import run_ranks
from wanfit.errors import ConfigError
from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B, WAN_TINY
from wanfit.models.dit import WanDiT
from wanfit.pipeline import WanPipeline
from wanfit.plan.estimates import Request, estimate_denoise, rank_tokens
from wanfit.plan.parallel import choose_degrees, parallel_degrees, parse_parallel
from wanfit.plan.plan import Plan
from wanfit.runtime.parallel import EXIT_PEER_FAILED, UlyssesAttention, dit_parallel, token_shares

# Latents [B, 16, F, H, W] whose 3 x 3 x 5 = 45 tokens split unevenly over 2 and 4 processes.
LATENT = (2, 16, 3, 6, 10)


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    model = WanDiT(WAN_TINY).eval().requires_grad_(False)
    with torch.no_grad():  # norms away from 1 so that every path matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*LATENT, generator=gen)
    t = torch.tensor([250.0, 800.0])
    context = torch.randn(2, 12, WAN_TINY.text_dim, generator=gen)
    return x, t, context


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- the parts, in one process ----------------------------------------------------------------------


def test_token_shares_cover_the_sequence_in_order():
    assert token_shares(45, 4) == [12, 11, 11, 11]
    assert token_shares(32760, 4) == [8190] * 4
    for length, parts in ((7, 3), (100, 8), (5, 5)):
        shares = token_shares(length, parts)
        assert sum(shares) == length and max(shares) - min(shares) <= 1


def test_degrees_use_the_most_gpus_cfg_first():
    r13, r14 = Request(WAN_T2V_1_3B), Request(WAN_T2V_14B, model_name="14B")
    assert choose_degrees(r13, 8) == (2, 4)  # 12 heads
    assert choose_degrees(r13, 2) == (2, 1)
    assert choose_degrees(Request(WAN_T2V_1_3B, guidance=False), 8) == (1, 6)
    assert choose_degrees(r14, 8) == (2, 4)  # 40 heads
    assert choose_degrees(r14, 6) == (1, 5)
    assert parse_parallel("cfg2,ulysses4") == (2, 4) == parse_parallel("cfg2xulysses4")
    assert parse_parallel("ulysses3") == (1, 3)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(spec="ulysses8"), "Ulysses 8 does not divide the 12 attention heads"),
        (dict(spec="cfg3"), "degree 1 or 2"),
        (dict(spec="ulysses"), "--parallel takes degrees like"),
        (dict(spec="cfg2,ulysses4", gpus=4), "needs 8 GPUs"),
        (dict(world_size=5), "5 processes cannot share"),
        (dict(spec="ulysses2", world_size=4), "runs 2 processes, but this run was started with 4"),
    ],
)
def test_impossible_degrees_are_one_clear_sentence(kwargs, words):
    with pytest.raises(ConfigError, match=words) as err:
        parallel_degrees(Request(WAN_T2V_1_3B, guidance=not kwargs.get("world_size")), **kwargs)
    assert str(err.value).endswith(".") and "\n" not in str(err.value)


def test_cfg_parallel_without_guidance_is_refused():
    with pytest.raises(ConfigError, match="guidance is off"):
        parallel_degrees(Request(WAN_T2V_1_3B, guidance=False), spec="cfg2")


def test_per_gpu_estimate_counts_the_token_share():
    request = Request(WAN_T2V_1_3B)
    one = Plan(device="cuda", compute_dtype="bfloat16", cfg_batch=False)
    four = Plan(device="cuda", compute_dtype="bfloat16", cfg_batch=False, ulysses=4)
    assert rank_tokens(request, four) == 8190
    a, b = estimate_denoise(request, one, "sdpa_flash"), estimate_denoise(request, four, "sdpa_flash")
    assert a.weights == b.weights  # the whole DiT on every GPU
    # The share's activations plus the exchanged heads: well under half of one process's.
    assert a.activations / 5 < b.activations < a.activations / 2
    # CFG-parallel: one sample per process, like sequential CFG on one.
    cfg2 = estimate_denoise(
        request, Plan(device="cuda", compute_dtype="bfloat16", cfg_parallel=2), "sdpa_flash"
    )
    assert cfg2.activations == a.activations


# --- several processes -------------------------------------------------------------------------------


def _ulysses_forward(session, dit, inputs, chunk):
    for block in dit.blocks:
        block.self_attn.attention_chunk = chunk
    parallel = dit_parallel(session, Plan(ulysses=session.world_size))
    with torch.no_grad():
        out = parallel.forward(dit, *inputs)
        used = all(isinstance(b.self_attn.dispatcher, UlyssesAttention) for b in dit.blocks)
        # A pipeline may hand the model new dispatchers: the next forward wraps them again.
        dit.set_attention_dispatchers(None, None)
        again = parallel.forward(dit, *inputs)
    return out, again, used, parallel.ulysses.shares


@pytest.mark.parametrize("world_size, chunk", [(2, None), (4, None), (4, 5)])
def test_ulysses_forward_equals_one_process(dit, inputs, world_size, chunk):
    with torch.no_grad():
        expected = dit(*inputs)
    results = run_ranks(_ulysses_forward, world_size, dit, inputs, chunk)
    for r in results:
        assert r.exitcode == 0, r
        out, again, used, shares = r.value
        assert used and shares == token_shares(45, world_size)
        assert relative_error(out, expected) < 1e-6 and relative_error(again, expected) < 1e-6


def _guided(session, dit, inputs, plan):
    x, t, context = inputs
    pipe = WanPipeline(dit, None, None, plan=plan)
    pipe.parallel = dit_parallel(session, plan)
    # Rank-dependent latents: the run must use rank 0's everywhere.
    latents = pipe.parallel.same_latents(x[:1] + session.rank)
    with torch.no_grad():
        return latents, pipe.predict_noise(latents, t[0], context[:1], context[1:], 5.0)


@pytest.mark.parametrize("cfg, ulysses", [(2, 1), (2, 2)])
def test_cfg_parallel_guidance_equals_one_process(dit, inputs, cfg, ulysses):
    x, t, context = inputs
    with torch.no_grad():
        expected = WanPipeline(dit, None, None, plan=Plan()).predict_noise(
            x[:1], t[0], context[:1], context[1:], 5.0
        )
    results = run_ranks(
        _guided, cfg * ulysses, dit, inputs, Plan(cfg_parallel=cfg, ulysses=ulysses, cfg_batch=False)
    )
    for r in results:
        assert r.exitcode == 0, r
        latents, noise = r.value
        assert torch.equal(latents, x[:1])
        assert relative_error(noise, expected) < 1e-5


def _fail_on_rank_1(session, how):
    parallel = dit_parallel(session, Plan(ulysses=session.world_size))
    x = torch.ones(64)
    for step in range(200):
        if session.rank == 1 and step == 3:
            if how == "error":
                raise ConfigError("Injected failure on rank 1.")
            if how == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGSTOP)  # "hung": no exit, no heartbeat, sockets stay open
        x = parallel.same_latents(x)
        time.sleep(0.01)
    return "finished"


def test_an_error_on_one_rank_ends_every_rank_quickly():
    started = time.monotonic()
    rank0, rank1 = run_ranks(_fail_on_rank_1, 2, "error", timeout=20)
    assert rank1.exitcode == 1 and rank1.error == "ConfigError: Injected failure on rank 1."
    # Rank 0 was blocked in a collective: it ends too, silently (rank 1 spoke for the run).
    assert rank0.exitcode == EXIT_PEER_FAILED and rank0.error is None and rank0.value is None
    assert time.monotonic() - started < 15


def test_a_killed_rank_ends_the_others_with_an_error():
    rank0, rank1 = run_ranks(_fail_on_rank_1, 2, "killed", timeout=20)
    assert rank1.exitcode == -signal.SIGKILL
    assert rank0.exitcode == 1 and rank0.error.startswith("ParallelError: Lost contact with another process")


def test_a_hung_rank_is_found_by_its_heartbeat(capfd):
    env = {"WANFIT_PEER_TIMEOUT": "1"}
    rank0, rank1 = run_ranks(_fail_on_rank_1, 2, "hung", timeout=15, env=env, hung=frozenset({1}))
    assert rank1.exitcode is None  # stopped, then killed by the harness
    assert rank0.exitcode == 2  # rank 0's watchdog said why and ended it, stuck in the collective
    err = capfd.readouterr().err
    assert err.count("wanfit: error:") == 1 and "rank 1 stopped responding for 1 s" in err


# --- the DiT sharded with FSDP2 (Plan.dit_sharding) -------------------------------------------------


def _sharded_forward(session, dit, inputs, plan):
    """Shard the blocks as the placement does, then one forward: each rank its own batch row under
    CFG-parallel, the whole batch shared by token under Ulysses."""
    from wanfit.runtime.placement import DiTPlacement

    x, t, context = inputs
    placement = DiTPlacement(dit)
    placement.place(plan)
    parallel = dit_parallel(session, plan)
    rows = slice(session.rank, session.rank + 1) if plan.cfg_parallel == 2 else slice(None)
    kept = sum(p.to_local().numel() for p in dit.blocks.parameters())
    whole = sum(p.numel() for p in dit.blocks.parameters())
    with torch.no_grad():
        out = parallel.forward(dit, x[rows], t[rows], context[rows])
    return out, kept, whole


@pytest.mark.parametrize("cfg, ulysses", [(2, 1), (1, 2)])
def test_sharded_dit_forward_equals_one_process(dit, inputs, cfg, ulysses):
    with torch.no_grad():
        expected = dit(*inputs)
    plan = Plan(cfg_parallel=cfg, ulysses=ulysses, cfg_batch=False, dit_sharding="fsdp")
    results = run_ranks(_sharded_forward, 2, dit, inputs, plan)
    assert [r.exitcode for r in results] == [0, 0], results
    # The shards partition every block (a tensor with one row, e.g. the modulation, stays on rank 0).
    assert sum(r.value[1] for r in results) == results[0].value[2]
    for r in results:
        out, kept, whole = r.value
        assert kept < 0.55 * whole
        reference = expected[r.rank : r.rank + 1] if cfg == 2 else expected
        assert relative_error(out, reference) < 1e-5


def test_the_planner_shards_a_dit_that_does_not_fit_one_gpu():
    from wanfit.plan.estimates import dit_device_weights
    from wanfit.plan.parallel import parallel_overrides
    from wanfit.plan.planning import Constraints, plan_for

    request = Request(WAN_T2V_14B, model_name="14B", height=480, width=832, num_frames=81)
    vram = 24 * 2**30  # the 14B DiT alone is 28.6 GB in bf16
    eight = plan_for(request, Constraints(vram=vram, overrides=parallel_overrides(2, 4)), "h100")
    assert eight.plan.dit_sharding == "fsdp" and eight.plan.dit_blocks_resident is None
    assert "shard_dit" in eight.steps
    whole = dit_device_weights(WAN_T2V_14B, replace(eight.plan, dit_sharding="none"))
    # Per GPU: an eighth of the blocks plus two gathered blocks (and the small non-block parts).
    sharded = eight.phases["denoise"].detail["dit"]
    assert whole / 8 < sharded < whole / 8 + 3 * whole / WAN_T2V_14B.num_layers
    one = plan_for(request, Constraints(vram=vram), "h100")  # one such GPU streams the blocks instead
    assert one.plan.dit_sharding == "none" and one.plan.dit_blocks_resident is not None


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(dit_sharding="fsdp"), "over the processes of a run on several GPUs"),
        (dict(dit_sharding="fsdp", cfg_parallel=2, dit_blocks_resident=4), "does not combine"),
    ],
)
def test_a_sharding_the_run_cannot_do_is_refused(overrides, words):
    from wanfit.plan.planning import Constraints, plan_for

    with pytest.raises(ConfigError, match=words):
        plan_for(Request(WAN_T2V_1_3B), Constraints(overrides=overrides), "h100")


def test_the_planner_puts_the_text_encoder_on_rank_0_of_several():
    from wanfit.plan.parallel import parallel_overrides
    from wanfit.plan.planning import Constraints, plan_for

    request = Request(WAN_T2V_1_3B)
    assert plan_for(request, Constraints(), "h100").plan.text_encoder_rank is None  # one process
    two = Constraints(overrides=parallel_overrides(2, 1))
    assert plan_for(request, two, "h100").plan.text_encoder_rank == 0
    every = Constraints(overrides={**parallel_overrides(2, 1), "text_encoder_rank": None})
    assert plan_for(request, every, "h100").plan.text_encoder_rank is None  # every process encodes
