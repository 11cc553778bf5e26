"""The CUDA allocator's expandable segments: decided by the planner, applied once by the runtime."""

from dataclasses import replace

import torch

from tests.helpers.hardware import emulated
from wanfit.models.configs import WAN_T2V_1_3B
from wanfit.plan import planner as P
from wanfit.plan.estimates import Request
from wanfit.plan.plan import Plan, parse_setting
from wanfit.plan.planning import plan_for
from wanfit.runtime import allocator

REQ = Request(WAN_T2V_1_3B, 832, 480, 81)


def test_the_planner_turns_expandable_segments_on_for_cuda_unless_the_user_configured_the_allocator():
    laptop = emulated("rtx3060-laptop", 16)
    assert plan_for(REQ, hardware=laptop).plan.cuda_expandable_segments is True
    configured = replace(laptop, allocator_conf="backend:cudaMallocAsync")
    assert plan_for(REQ, hardware=configured).plan.cuda_expandable_segments is None
    assert (
        plan_for(Request(WAN_T2V_1_3B, 320, 192, 17), hardware=emulated("cpu")).plan.cuda_expandable_segments
        is None
    )


def test_budget_carries_the_users_allocator_setting():
    hw = replace(emulated("h100"), allocator_conf="expandable_segments:False")
    assert P.budget_from_probe(hw).allocator_conf == "expandable_segments:False"


def test_the_setting_reads_true_false_and_none():
    assert parse_setting("cuda_expandable_segments", "false") is False
    assert parse_setting("cuda_expandable_segments", "on") is True
    assert parse_setting("cuda_expandable_segments", "none") is None


def test_the_runtime_sets_the_allocator_once_per_value(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.setattr(allocator, "_applied", None)
    plan = Plan(device="cuda", compute_dtype="bfloat16", cuda_expandable_segments=True)
    allocator.apply_allocator(plan)
    allocator.apply_allocator(plan)  # the pipeline and the placements both apply it
    assert calls == ["expandable_segments:True"]
    allocator.apply_allocator(replace(plan, cuda_expandable_segments=False))
    assert calls[-1] == "expandable_segments:False"
    allocator.apply_allocator(replace(plan, cuda_expandable_segments=None))  # leave it as it is
    allocator.apply_allocator(Plan(device="cpu", compute_dtype="float32", cuda_expandable_segments=True))
    assert len(calls) == 2
