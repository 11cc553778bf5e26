"""The step caches on the built-in trained model (issue 14): at threshold 0 each gives the frames of
the uncached path; at its default threshold each that skips DiT work keeps the grid's prompts
(measured: docs/builtin_model.md, "Step caches"). GRID_SAMPLE at the model's 10 steps."""

import math

import pytest

from wanfit.attention.ranking import CACHE_ENV
from wanfit.builtin import SAMPLING
from wanfit.quality import GRID_SAMPLE, Report, Setting, calibrate_magcache, evaluate

STEPS = SAMPLING.num_inference_steps
EVALUATIONS = len(GRID_SAMPLE) * STEPS * 2  # cond and uncond at every step of every video

# Each policy as this model takes it: TeaCache has no fit for this DiT (coefficients=none: the raw
# change; at threshold 0 the 1.3B fit with ret steps, whose polynomial is negative for this model's
# change at the last step, so the published rule would skip it there); EasyCache's default ret=10
# would leave nothing to skip in 10 steps.
EXACT = {
    "teacache": "teacache:0,coefficients=1.3B,ret=true",
    "magcache": "magcache:0",
    "easycache": "easycache:0,ret=3",
    "firstblock": "firstblock:0",
}
DEFAULT = {
    "teacache": "teacache,coefficients=none",
    "magcache": "magcache",
    "easycache": "easycache,ret=3",
    "firstblock": "firstblock",
}
# At the default thresholds, measured on GRID_SAMPLE: teacache skips 5 of 10 steps per stream and
# gets 9 of 11 videos right, 22.6 dB; magcache 3 of 10, 11 of 11, 27.9 dB. The floors leave two
# videos of margin (a broken cache falls far below: teacache:0.5 reads 1 of 11). EasyCache's and
# the first-block cache's changes stay above 0.05 over 10 steps: they skip nothing.
FLOOR = {"teacache": 0.6, "magcache": 0.8}


@pytest.fixture(scope="module")
def exact():
    return evaluate(scenes=GRID_SAMPLE, psnr=False)


def subset(report: Report, scenes) -> Report:
    return Report("default", tuple(scenes), [], [report.frames[GRID_SAMPLE.index(s)] for s in scenes])


@pytest.fixture
def calibrated(monkeypatch, tmp_path):
    """MagCache's ratios of the built-in model at STEPS, stored where --cache magcache finds them
    (a folder of this test's own)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = calibrate_magcache(STEPS)
    assert path.is_relative_to(tmp_path) and path.name == f"magcache-{STEPS}.json"
    return path


@pytest.mark.parametrize("policy", EXACT)
def test_threshold_zero_gives_the_uncached_frames(policy, exact, calibrated):
    scenes = GRID_SAMPLE[:3]
    spec = EXACT[policy]
    cached = evaluate(Setting(spec, plan={"cache": spec}), scenes=scenes, reference=subset(exact, scenes))
    assert cached.psnr == math.inf, cached.summary()
    assert cached.skipped() == (0, len(scenes) * STEPS * 2)
    assert all(r["policy"] == spec for r in cached.cache_reports)


@pytest.mark.parametrize("policy", DEFAULT)
def test_the_default_threshold_skips_and_keeps_the_prompts(policy, exact, calibrated):
    spec = DEFAULT[policy]
    cached = evaluate(Setting(spec, plan={"cache": spec}), scenes=GRID_SAMPLE, reference=exact)
    skipped, evaluations = cached.skipped()
    assert evaluations == EVALUATIONS
    if policy not in FLOOR:  # measured: nothing to skip at 10 steps, so the frames are the exact ones
        assert skipped == 0 and cached.psnr == math.inf, cached.summary()
        return
    assert skipped > 0 and cached.accuracy("all") >= FLOOR[policy], cached.summary()
    assert 20 < cached.psnr < math.inf, cached.summary()
    report = cached.cache_reports[0]
    assert report["settings"]["threshold"] == (0.08 if policy == "teacache" else 0.12)
    for steps in report["skipped"].values():
        if policy == "teacache":  # the first and the last step are always computed
            assert 0 not in steps and STEPS - 1 not in steps, report
        else:  # calls from int(2 * S * retention) = 4 (step 2) on; at most K = 2 skipped in a row
            assert min(steps) >= 2 and not any({s + 1, s + 2} <= set(steps) for s in steps), report
