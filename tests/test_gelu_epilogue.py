"""Plan.ffn_gelu_epilogue: the FFN's GELU inside ffn.0's GEMM (wanfit.models.dit.gelu_linear, on CUDA
cuBLASLt's GELU_BIAS epilogue). The CPU has no such epilogue: its torch._addmm_activation applies the
erf GELU, which the smoke test must catch, so the blocks' path is checked here with the op replaced by
a counting tanh one; the GPU run checks the real one (benchmarks/bench_gelu_epilogue.py)."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.hardware import emulated
from tests.test_placement import make_dit
from wanfit.errors import ConfigError, WanfitWarning
from wanfit.models import dit as D
from wanfit.models.configs import WAN_TINY
from wanfit.plan.plan import Plan
from wanfit.plan.planning import Constraints, model_request, plan_for
from wanfit.runtime import gemm_epilogue
from wanfit.runtime.lora import LowRankBranch, PerCallMerge

EPILOGUE = Plan(ffn_gelu_epilogue=True)


class TanhAddmmActivation:
    """torch._addmm_activation as CUDA computes it (tanh GELU), counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, bias, rows, weight_t, use_gelu=False):
        assert use_gelu
        self.calls += 1
        return F.gelu(torch.addmm(bias, rows, weight_t), approximate="tanh")


@pytest.fixture
def tanh_op(monkeypatch):
    op = TanhAddmmActivation()
    monkeypatch.setattr(torch, "_addmm_activation", op)
    return op


def block_and_input(dtype=torch.float32):
    torch.manual_seed(0)
    block = D.WanBlock(WAN_TINY).to(dtype).eval()
    h = torch.randn(2, 24, WAN_TINY.dim, dtype=dtype)
    return block, h


def test_the_block_computes_the_gelu_in_ffn0s_gemm(tanh_op):
    block, h = block_and_input()
    with torch.no_grad():
        want = block.feed_forward(h)  # GEMM, then the GELU in place (the default switches)
        block.ffn_gelu_epilogue = True
        got = block.feed_forward(h)
    assert tanh_op.calls == 1
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # FFN chunks (WanBlock.ffn_chunk): one GEMM per chunk of 10 of the 24 tokens
        chunked = D.run_in_chunks(block.feed_forward, h, 10)
    assert tanh_op.calls == 1 + 3
    torch.testing.assert_close(chunked, want, rtol=1e-6, atol=1e-6)


def lora_factors(first, rank=4):
    gen = torch.Generator().manual_seed(9)
    down = 0.3 * torch.randn(rank, first.in_features, generator=gen)
    return down, 0.3 * torch.randn(first.out_features, rank, generator=gen)


def test_a_per_call_lora_merge_keeps_the_gelu_in_the_gemm_with_the_merged_weight(tanh_op):
    block, h = block_and_input()
    first = block.ffn[0]
    down, up = lora_factors(first)
    with torch.no_grad():
        first.low_rank = LowRankBranch(down, up)
        want = block.feed_forward(h)  # the branch, the GELU apart
        first.low_rank = PerCallMerge(down, up)
        block.ffn_gelu_epilogue = True
        got = block.feed_forward(h)
        first.low_rank = None
        block.ffn_gelu_epilogue = False
        base = block.feed_forward(h)
    assert tanh_op.calls == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().mean() > 100 * (got - want).abs().mean()


def test_the_gelu_runs_apart_under_autograd_and_beside_a_lora_branch_or_an_fp8_gemm(tanh_op):
    block, h = block_and_input()
    block.ffn_gelu_epilogue = True
    first = block.ffn[0]
    with torch.enable_grad():
        block.feed_forward(h)
    first.low_rank = LowRankBranch(*lora_factors(first))
    with torch.no_grad():
        block.feed_forward(h)
    first.low_rank, first.gemm = None, lambda x: F.linear(x, first.weight, first.bias)
    with torch.no_grad():
        block.feed_forward(h)
    assert tanh_op.calls == 0
    first.gemm = None
    with torch.no_grad():
        block.feed_forward(h)
    assert tanh_op.calls == 1


def test_the_smoke_test_passes_the_tanh_gelu(tanh_op):
    gemm_epilogue.smoke_test.cache_clear()
    try:
        assert gemm_epilogue.smoke_test("cpu") is None  # the tanh op passes
        assert tanh_op.calls == 2  # fp32 and bf16
    finally:
        gemm_epilogue.smoke_test.cache_clear()


def test_the_cpus_own_op_fails_the_smoke_test():
    gemm_epilogue.smoke_test.cache_clear()
    failure = gemm_epilogue.smoke_test("cpu")
    assert failure is not None and "torch.float32" in failure and "tanh GELU" in failure


def test_a_failed_smoke_test_leaves_the_gelu_apart_with_one_warning():
    gemm_epilogue.smoke_test.cache_clear()
    placement = make_dit()
    with pytest.warns(WanfitWarning, match="GELU epilogue failed its smoke test .*the GELU runs apart"):
        placement.place(EPILOGUE)
    assert "tanh GELU" in placement.failures["ffn_gelu_epilogue"]
    assert not any(b.ffn_gelu_epilogue for b in placement.dit.blocks)
    assert not placement.layout.ffn_gelu_epilogue
    placement.place(EPILOGUE)  # given up for the process: no second test, no second warning
    assert not any(b.ffn_gelu_epilogue for b in placement.dit.blocks)


def test_the_placement_sets_and_clears_the_switch(monkeypatch):
    monkeypatch.setattr(gemm_epilogue, "smoke_test", lambda device: None)
    placement = make_dit()
    placement.place(EPILOGUE)
    assert all(b.ffn_gelu_epilogue for b in placement.dit.blocks)
    placement.apply(Plan())
    assert not any(b.ffn_gelu_epilogue for b in placement.dit.blocks)


def planned(card: str, device: str | None = None, **overrides):
    return plan_for(model_request("1.3B"), Constraints(device=device, overrides=overrides), emulated(card))


def test_the_planner_asks_for_it_on_cuda_in_half_precision_only():
    assert planned("h200").plan.ffn_gelu_epilogue
    assert planned("t4").plan.ffn_gelu_epilogue  # fp16: cuBLASLt's epilogue there too
    assert not planned("cpu", device="cpu").plan.ffn_gelu_epilogue
    assert not planned("h200", compute_dtype="float32").plan.ffn_gelu_epilogue
    assert not planned("h200", ffn_gelu_epilogue=False).plan.ffn_gelu_epilogue


def test_asking_for_it_where_it_cannot_run_is_refused_in_one_sentence():
    with pytest.raises(ConfigError) as err:
        planned("cpu", device="cpu", ffn_gelu_epilogue=True)
    message = str(err.value)
    assert message.startswith(
        "--set ffn_gelu_epilogue=true was asked for, but the GELU epilogue is cuBLASLt's"
    )
    assert message.count(".") == 1 and "\n" not in message
