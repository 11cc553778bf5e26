"""wanfit's WanPipeline against diffusers' WanPipeline on the same tiny random weights."""

import numpy as np
import pytest
import torch

from tests.helpers import tiny_pipeline, tiny_text
from wanfit.pipeline import WanPipeline, latent_shape

HEIGHT, WIDTH, FRAMES, STEPS = 32, 48, 5, 4
PROMPT = "a red fox runs through fresh snow"
NEGATIVE = "blurry, static"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    tokenizer_dir = tiny_text.train_tokenizer(root / "tok")
    reference = tiny_pipeline.make_diffusers_pipeline(tokenizer_dir)
    reference.save_pretrained(str(root / "diffusers"))
    tiny_pipeline.save_official_layout(reference, tokenizer_dir, root / "official")
    return reference, root / "diffusers", root / "official"


@pytest.fixture(scope="module")
def latents():
    shape = latent_shape(1, 16, HEIGHT, WIDTH, FRAMES)
    return torch.randn(shape, generator=torch.Generator().manual_seed(5))


def run_reference(reference, latents, prompt=PROMPT, guidance=5.0):
    return tiny_pipeline.diffusers_frames(
        reference,
        prompt=prompt,
        negative_prompt=NEGATIVE,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=latents.clone(),
    )


def run_wanfit(pipe, latents, prompt=PROMPT, guidance=5.0, **kwargs):
    return pipe(
        prompt,
        negative_prompt=NEGATIVE,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=latents.clone(),
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def reference_frames(folders, latents):
    return run_reference(folders[0], latents)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_diffusers_folder_gives_diffusers_frames(folders, latents, reference_frames):
    pipe = WanPipeline.from_pretrained(folders[1], device="cpu")
    frames = run_wanfit(pipe, latents)
    assert frames.dtype == np.uint8 and frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert frames.shape == reference_frames.shape
    diff = mean_abs_diff(frames, reference_frames)
    print(f"mean |wanfit - diffusers| = {diff:.4f}/255")
    assert diff <= 0.05


def test_the_prompt_moves_the_frames_far_more_than_the_tolerance(folders, latents, reference_frames):
    other = run_reference(folders[0], latents, prompt="a quiet harbour at dawn, boats and gulls")
    moved = mean_abs_diff(other, reference_frames)
    print(f"another prompt moves the frames by {moved:.2f}/255 on average")
    assert moved > 1.0  # 20x the agreement tolerance


def test_official_layout_gives_the_same_frames_with_the_same_scheduler(folders, latents, reference_frames):
    scheduler_config = folders[1] / "scheduler" / "scheduler_config.json"
    pipe = WanPipeline.from_pretrained(folders[2], device="cpu", scheduler_config=scheduler_config)
    frames = run_wanfit(pipe, latents)
    diff = mean_abs_diff(frames, reference_frames)
    print(f"mean |wanfit(official layout) - diffusers| = {diff:.4f}/255")
    assert diff <= 0.05


def test_guidance_one_skips_the_unconditional_pass(folders, latents):
    pipe = WanPipeline.from_pretrained(folders[1], device="cpu")
    run_wanfit(pipe, latents, guidance=1.0)
    assert pipe.dit_calls == STEPS
    run_wanfit(pipe, latents, guidance=5.0)
    assert pipe.dit_calls == STEPS  # cond and uncond batched: one call per step
    sequential = WanPipeline.from_pretrained(folders[1], device="cpu")
    sequential.plan = sequential.plan.__class__.from_dict({**sequential.plan.to_dict(), "cfg_batch": False})
    run_wanfit(sequential, latents, guidance=5.0)
    assert sequential.dit_calls == 2 * STEPS


def test_batched_and_sequential_guidance_agree(folders, latents):
    batched = WanPipeline.from_pretrained(folders[1], device="cpu")
    a = run_wanfit(batched, latents)
    batched.plan = batched.plan.__class__.from_dict({**batched.plan.to_dict(), "cfg_batch": False})
    b = run_wanfit(batched, latents)
    assert mean_abs_diff(a, b) <= 0.05


def test_frames_to_uint8_gives_the_numpy_formulas_bytes_rounding_ties_too():
    from wanfit.pipeline import frames_to_uint8

    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 11, 6, 5, generator=g) * 2.4 - 1.2  # some values clip at both ends
    # Values whose x*255 lands exactly on a .5 tie after (x/2 + 0.5): round half to even, as numpy does.
    ties = (torch.arange(0, 256, dtype=torch.float32) + 0.5) / 255 * 2 - 1
    video[0, 0, 0].view(-1)[:30] = ties[:30]
    for dtype in (torch.float32, torch.bfloat16):
        v = video.to(dtype)
        host = (v[0].to("cpu", torch.float32) / 2 + 0.5).clamp(0, 1)
        expected = (host.permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)
        out = frames_to_uint8(v)
        assert out.dtype == np.uint8 and out.shape == (11, 6, 5, 3)
        assert np.array_equal(out, expected), dtype
