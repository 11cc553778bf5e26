"""The OOM guard: an out-of-memory error mid-run steps the plan down and resumes from the same step."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wanfit.errors import PlanError
from wanfit.pipeline import WanPipeline
from wanfit.plan.plan import Plan
from wanfit.runtime.oom import OOMGuard, is_out_of_memory

SIZE = {"height": 128, "width": 128, "num_frames": 5, "num_inference_steps": 6, "guidance_scale": 5.0}


class FakeDiT(nn.Module):
    """Per-sample arithmetic (batching cannot change it); raises out-of-memory once, at `fail_step`."""

    def __init__(self, fail_step: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.9))
        self.fail_step = fail_step
        self.timesteps: list[float] = []  # distinct timesteps in order of arrival
        self.calls: list[tuple[float, torch.Tensor, bool]] = []  # (t, x, raised)

    def forward(self, x, t, context):
        if not self.timesteps or self.timesteps[-1] != float(t[0]):
            self.timesteps.append(float(t[0]))
        failing = self.fail_step is not None and len(self.timesteps) - 1 == self.fail_step
        self.calls.append((float(t[0]), x.clone(), failing))
        if failing:
            self.fail_step = None
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return self.weight * torch.sin(x) + 0.1 * c + t.view(-1, 1, 1, 1, 1) / 1000


class FakeVAE(nn.Module):
    """Decodes by upsampling; untiled decodes raise out-of-memory when `fail_untiled`."""

    def __init__(self, fail_untiled: bool = False):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(0.0))
        self.fail_untiled = fail_untiled
        self.tiles: list = []

    @property
    def dtype(self):
        return self.bias.dtype

    def denormalize(self, z):
        return z * 2.0

    def decode(self, z, tile=None):
        self.tiles.append(tile)
        if tile is None and self.fail_untiled:
            raise RuntimeError("CUDA error: out of memory (injected)")
        video = F.interpolate(z[:, :3], scale_factor=(1, 8, 8), mode="nearest")
        frames = torch.cat([video[:, :, :1], video[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
        return torch.tanh(frames + self.bias)


class FakeTextEncoder:
    def encode(self, prompts, max_length=8):
        return torch.stack([torch.full((max_length, 32), float(len(p) % 7) / 7) for p in prompts])


def _run(plan: Plan, dit: FakeDiT, vae: FakeVAE, steps: list | None = None) -> tuple[np.ndarray, WanPipeline]:
    pipe = WanPipeline(dit, vae, FakeTextEncoder(), plan=plan)
    on_step = (lambda state: steps.append(state.step)) if steps is not None else None
    frames = pipe("a fox", seed=3, progress=False, on_step=on_step, **SIZE)
    return frames, pipe


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_guard_steps_down_until_the_step_fits():
    plans = [Plan(cfg_batch=True), Plan(cfg_batch=False), Plan(cfg_batch=False, ffn_chunk=1024)]
    state = {"plan": plans[0], "inputs": []}

    def step():
        state["inputs"].append(state["plan"])
        if state["plan"].ffn_chunk is None:
            raise torch.OutOfMemoryError("out of memory")
        return "done"

    def step_down(plan, phase):
        assert phase == "denoise"
        return plans[plans.index(plan) + 1] if plan in plans[:-1] else None

    def apply(plan):
        state["plan"] = plan

    guard = OOMGuard(lambda: state["plan"], step_down, apply, log=lambda msg: None)
    assert guard.run("denoise", step, what="step 3") == "done"
    assert state["inputs"] == plans
    assert [h[2] for h in guard.history] == ["cfg_batch True -> False", "ffn_chunk None -> 1024"]

    state["plan"] = plans[0]
    with pytest.raises(PlanError, match="Out of memory during vae_decode with no lighter plan left"):
        OOMGuard(lambda: state["plan"], lambda p, ph: None, apply, log=lambda m: None).run("vae_decode", step)
    with pytest.raises(RuntimeError, match="shape"):  # other errors pass through untouched
        guard.run("denoise", lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")))


def test_oom_in_denoise_resumes_from_the_same_step():
    torch.manual_seed(0)
    dit = FakeDiT(fail_step=3)
    steps: list[int] = []
    frames, pipe = _run(Plan(cfg_batch=True), dit, FakeVAE(), steps)

    # The guard gave up batched CFG, applied it, and predicted step 3 again from the same latents.
    assert pipe.plan.cfg_batch is False
    assert [s[0] for s in pipe.oom_steps] == ["denoise"] and "cfg_batch True -> False" in pipe.oom_steps[0][2]
    failed = [c for c in dit.calls if c[2]]
    assert len(failed) == 1
    t_fail, x_fail, _ = failed[0]
    retried = [c for c in dit.calls if c[0] == t_fail and not c[2]]
    assert len(retried) == 2  # cond and uncond, one after the other now
    assert torch.equal(retried[0][1], x_fail[:1])
    assert steps == [1, 2, 3, 4, 5, 6]  # every step once: nothing lost, nothing repeated

    reference, ref_pipe = _run(Plan(cfg_batch=False), FakeDiT(), FakeVAE())
    assert ref_pipe.oom_steps == []
    np.testing.assert_array_equal(frames, reference)
    # 3 batched calls, the failed batched attempt, then 2 per step for steps 3..5
    assert pipe.dit_calls == 3 + 1 + 2 * 3


def test_oom_in_decode_retries_tiled_with_the_same_latents():
    torch.manual_seed(0)
    vae = FakeVAE(fail_untiled=True)
    frames, pipe = _run(Plan(cfg_batch=True), FakeDiT(), vae)
    assert pipe.plan.vae_tile is not None and pipe.plan.offload_dit_before_decode
    assert all(s[0] == "vae_decode" for s in pipe.oom_steps)
    assert vae.tiles[:2] == [None, None] and vae.tiles[-1] == pipe.plan.vae_tile

    reference, _ = _run(pipe.plan, FakeDiT(), FakeVAE())
    np.testing.assert_array_equal(frames, reference)


class FailingOnceTextEncoder(FakeTextEncoder):
    """Raises out-of-memory on its first encode, like umT5 on a card that is too full."""

    def __init__(self):
        self.calls = 0

    def encode(self, prompts, max_length=8):
        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 10.00 GiB (injected)")
        return super().encode(prompts, max_length)


def test_oom_in_text_encoding_steps_down_and_encodes_again():
    lighter = Plan(cfg_batch=True, text_encoder_blocks_resident=0)
    pipe = WanPipeline(FakeDiT(), FakeVAE(), FailingOnceTextEncoder(), plan=Plan(cfg_batch=True))
    pipe.step_down = lambda plan, phase: lighter if phase == "text_encoder" and plan != lighter else None
    frames = pipe("a fox", seed=3, progress=False, **SIZE)
    assert [s[0] for s in pipe.oom_steps] == ["text_encoder"]
    assert pipe.plan == lighter and pipe.text_encoder.calls == 2
    reference = WanPipeline(FakeDiT(), FakeVAE(), FakeTextEncoder(), plan=lighter)
    np.testing.assert_array_equal(frames, reference("a fox", seed=3, progress=False, **SIZE))
