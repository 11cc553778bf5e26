"""Several prompts in one DiT pass: the pipeline's batched videos equal one call per prompt, the
planner's prompts_per_pass (what fits, 1 where batching cannot run), the estimates' larger pass, and
`generate --prompts` grouping compatible videos into passes."""

from dataclasses import replace

import numpy as np
import pytest

from tests.test_planner import H100, REQ
from wanfit.cli import main
from wanfit.errors import ConfigError
from wanfit.pipeline import WanPipeline
from wanfit.plan import planner as P
from wanfit.plan.estimates import estimate_phases
from wanfit.plan.plan import parse_plan_overrides, settings_help

RUN = ["generate", "--size", "48x32", "--frames", "5", "--steps", "2", "--no-progress"]
PROMPTS = ["a red fox", "two dogs", "a blue square", "a green circle", "rain"]


def _max_diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def tiny():
    from wanfit.demo import tiny_pipeline

    return tiny_pipeline()


@pytest.mark.parametrize("sampler", ["unipc", "distilled"])  # a multistep one, one that re-noises
def test_prompts_denoised_together_equal_one_call_per_prompt(tiny, sampler):
    job = dict(height=32, width=48, num_frames=5, num_inference_steps=3, progress=False, sampler=sampler)
    one_by_one = [tiny(p, seed=s, **job) for p, s in zip(PROMPTS[:3], (3, 4, 5))]
    calls_each = tiny.dit_calls
    planned = tiny.plan
    try:
        tiny.apply_plan(replace(planned, prompts_per_pass=3))
        together = tiny(PROMPTS[:3], seed=[3, 4, 5], **job)
        assert tiny.dit_calls == calls_each  # one pass: the three videos' steps in the same forwards
    finally:
        tiny.apply_plan(planned)
    assert len(together) == 3
    for alone, batched in zip(one_by_one, together):
        assert batched.shape == alone.shape and _max_diff(alone, batched) <= 1  # fp32 rounding only
    assert _max_diff(together[0], together[1]) > 1  # each its own prompt and seed


def test_a_list_of_seeds_must_match_the_prompts(tiny):
    with pytest.raises(ConfigError, match="2 prompts were given with 3 seeds"):
        tiny(PROMPTS[:2], seed=[1, 2, 3], height=32, width=48, num_frames=5, progress=False)


def test_the_planner_batches_what_fits_and_caps_it():
    assert P.plan_run(H100, REQ).plan == P.plan_run(H100, replace(REQ, prompts=1)).plan  # as before
    assert P.plan_run(H100, REQ).plan.prompts_per_pass == 1
    four = P.plan_run(H100, replace(REQ, prompts=4))
    assert four.plan.prompts_per_pass == 4 and any("4 prompts per DiT pass" in n for n in four.notes)
    assert P.plan_run(H100, replace(REQ, prompts=20)).plan.prompts_per_pass == P.MAX_PROMPTS_PER_PASS
    # Its estimate counts the four: activations, latents and embeddings grow with the pass.
    single = estimate_phases(REQ, replace(four.plan, prompts_per_pass=1))["denoise"]
    batched = four.phases["denoise"]
    assert batched.activations > 3 * single.activations and batched.cache > 3 * single.cache
    assert batched.weights == single.weights


def test_a_tight_budget_plans_one_prompt_per_pass():
    tight = P.plan_run(H100, replace(REQ, prompts=4), vram=19 * 1024**3)
    assert tight.plan.prompts_per_pass == 1
    two = estimate_phases(REQ, replace(tight.plan, prompts_per_pass=2), tight.attention_backend)
    assert two["denoise"].peak > tight.budget.device_bytes  # the reason: two would not fit
    assert any("two would not fit" in n for n in tight.notes)


@pytest.mark.parametrize(
    "overrides, reason",
    [({"cache": "magcache"}, "a step cache is on"), ({"dit_blocks_resident": 10}, "the DiT is streamed")],
)
def test_what_cannot_batch_plans_one_prompt_per_pass(overrides, reason):
    result = P.plan_run(H100, replace(REQ, prompts=4), overrides=overrides)
    assert result.plan.prompts_per_pass == 1 and any(reason in n for n in result.notes)
    forced = P.plan_run(H100, replace(REQ, prompts=4), overrides={**overrides, "prompts_per_pass": 3})
    assert forced.plan.samples_per_pass == 1 and any("prompts_per_pass=3 is set" in n for n in forced.notes)


def test_prompts_per_pass_is_a_checked_setting():
    assert parse_plan_overrides(["prompts_per_pass=3"]) == {"prompts_per_pass": 3}
    with pytest.raises(ConfigError, match="prompts_per_pass takes a whole number of at least 1"):
        parse_plan_overrides(["prompts_per_pass=0"])
    assert "prompts_per_pass: " in settings_help()


@pytest.fixture
def passes(monkeypatch):
    """Every pass the pipeline ran: (prompts, seeds, size) with its videos."""
    seen = []
    original = WanPipeline._generate

    def recording(self, prompts, seeds, negative_prompt, height, width, *args, **kwargs):
        videos = original(self, prompts, seeds, negative_prompt, height, width, *args, **kwargs)
        seen.append((list(prompts), list(seeds), (width, height), videos))
        return videos

    monkeypatch.setattr(WanPipeline, "_generate", recording)
    return seen


def _frames(passes) -> dict:
    return {(p, s): v for prompts, seeds, _, videos in passes for p, s, v in zip(prompts, seeds, videos)}


def test_a_batch_runs_passes_of_the_set_size_with_the_same_frames(tmp_path, passes):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"{p}\n" for p in PROMPTS))
    assert (
        main([*RUN, "--prompts", str(path), "--out", str(tmp_path / "a"), "--set", "prompts_per_pass=1"]) == 0
    )
    alone = _frames(passes)
    assert [len(p[0]) for p in passes] == [1] * 5
    passes.clear()
    assert (
        main([*RUN, "--prompts", str(path), "--out", str(tmp_path / "b"), "--set", "prompts_per_pass=3"]) == 0
    )
    assert [p[0] for p in passes] == [PROMPTS[:3], PROMPTS[3:]]
    assert len(list((tmp_path / "b").glob("*.mp4"))) == 5
    together = _frames(passes)
    assert together.keys() == alone.keys()
    assert all(_max_diff(alone[k], together[k]) <= 1 for k in alone)


def test_the_planner_groups_compatible_videos_and_keeps_other_sizes_apart(tmp_path, passes, capsys):
    path = tmp_path / "p.txt"
    path.write_text(
        'a red fox\n{"prompt": "two dogs", "size": "64x48"}\nrain\n{"prompt": "sun", "steps": 3}\n'
    )
    out = tmp_path / "out"
    assert main([*RUN, "--prompts", str(path), "--out", str(out), "--videos-per-prompt", "2"]) == 0
    groups = sorted((sorted(p[0]), p[2]) for p in passes)
    assert groups == [
        (["a red fox", "a red fox", "rain", "rain"], (48, 32)),  # one size, steps and seeds 0, 1 each
        (["sun", "sun"], (48, 32)),  # other steps: a pass of its own
        (["two dogs", "two dogs"], (64, 48)),  # another size: never with the others
    ]
    assert "prompts per DiT pass" in capsys.readouterr().err
    assert len(list(out.glob("*.mp4"))) == 8


def test_a_failing_pass_runs_its_videos_one_by_one(tmp_path, passes, monkeypatch, capsys):
    from wanfit.errors import WanfitError

    original = WanPipeline._generate

    def failing(self, prompts, *args, **kwargs):
        if len(prompts) > 1 or "bad" in prompts[0]:
            raise WanfitError(f"cannot make {prompts[0]!r}")
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(WanPipeline, "_generate", failing)
    path = tmp_path / "p.txt"
    path.write_text("a red fox\nbad prompt\nrain\n")
    out = tmp_path / "out"
    assert main([*RUN, "--prompts", str(path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "running them one by one" in captured.err
    assert sorted(p.name for p in out.glob("*.mp4")) == ["001_a_red_fox_0.mp4", "003_rain_0.mp4"]
    assert "line 2: error: cannot make 'bad prompt'" in captured.out
