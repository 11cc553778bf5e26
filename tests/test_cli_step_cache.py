"""`--cache` and `wanfit calibrate-cache` on the built-in tiny model (issue 14): metadata, refusals,
calibration found by magcache, Ctrl-C and resume of a cached run, `wanfit plan`."""

import json

import numpy as np
import pytest
import torch

import wanfit.attention as wa
from tests.helpers import tiny_lora
from tests.test_cli_generate import generate as run
from tests.test_cli_generate import one_error_line
from wanfit import checkpointing
from wanfit.builtin import BUILTIN_DIT, MODEL_DIR
from wanfit.pipeline import WanPipeline
from wanfit.sampling.step_cache.tables import dit_model_key
from wanfit.video import read_video
from wanfit.weights.model_dir import find_model_files

STEPS = 12
RUN = ["generate", "--size", "48x32", "--frames", "5", "--steps", str(STEPS), "--seed", "3", "--no-progress"]
FIRSTBLOCK = "firstblock:0.25"  # skips some of the built-in model's steps at this size
# Where calibrations of the built-in model are stored: named by its DiT file.
BUILTIN_KEY = dit_model_key(find_model_files(MODEL_DIR).dit)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for var in ("WANFIT_EMULATE", "WANFIT_ATTENTION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path / "cache"))  # calibrations of this test only
    torch.manual_seed(0)
    yield
    wa.reset()


def test_a_cached_run_names_the_policy_and_its_skipped_steps(capsys, tmp_path):
    out = tmp_path / "v.mp4"
    code, stdout, _ = run(capsys, *RUN, "--cache", FIRSTBLOCK, "--out", str(out))
    assert code == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["cache"] == meta["plan"]["cache"] == meta["step_cache"]["policy"] == FIRSTBLOCK
    skipped = meta["step_cache"]["skipped"]
    assert (
        set(skipped) == {"cond", "uncond"} and skipped["cond"] and all(0 < s < STEPS for s in skipped["cond"])
    )
    assert meta["step_cache"]["settings"]["threshold"] == 0.25
    assert f"step cache {FIRSTBLOCK}: skipped {len(skipped['cond'])} of {STEPS} cond steps" in stdout

    plain = tmp_path / "plain.mp4"
    assert run(capsys, *RUN, "--out", str(plain))[0] == 0
    meta = json.loads(plain.with_suffix(".json").read_text())
    assert meta["cache"] is None and meta["plan"]["cache"] is None and meta["step_cache"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cache", "fastcache"], "Unknown step cache 'fastcache'"),
        (["--cache", "teacache:-0.1"], "at least 0"),
        (["--cache", "magcache"], "run `wanfit calibrate-cache`"),
        (["--cache", "teacache"], "coefficients=1.3B"),
        (["--cache", FIRSTBLOCK, "--steps", "4"], "needs at least 10 steps"),
        (["--cache", "easycache", "--steps", "11"], "can skip no step"),
        (["--set", "cache=firstblock,K=2"], "takes the options none"),
        (["--cache", FIRSTBLOCK, "--gpus", "2", "--device", "cpu"], "runs on one GPU for now"),
    ],
)
def test_caches_that_cannot_run_are_refused_before_any_work(capsys, tmp_path, argv, message):
    code, stdout, err = run(capsys, *RUN, *argv, "--out", str(tmp_path / "v.mp4"))
    assert code == 2 and stdout == ""
    assert message in one_error_line(err)
    assert list(tmp_path.glob("v*")) == []


def test_a_few_step_preset_with_a_cache_is_refused(capsys, tmp_path):
    argv = ["generate", "--size", "48x32", "--frames", "5", "--preset", "lightx2v-4step", "--no-progress"]
    code, _, err = run(capsys, *argv, "--cache", FIRSTBLOCK, "--out", str(tmp_path / "v.mp4"))
    assert code == 2 and "needs at least 10 steps, got 4" in one_error_line(err)
    assert not list(tmp_path.glob("v*"))


def test_calibrate_cache_then_magcache_finds_the_ratios(capsys, tmp_path):
    code, stdout, _ = run(capsys, "calibrate-cache", "--size", "48x32", "--frames", "5", "--steps", str(STEPS),
                          "--seed", "3", "--no-progress")  # fmt: skip
    assert code == 0
    saved = tmp_path / "cache" / "step_cache" / BUILTIN_KEY / f"magcache-{STEPS}.json"
    assert f"wrote {saved}" in stdout
    data = json.loads(saved.read_text())
    assert data["steps"] == STEPS and len(data["cond"]) == len(data["uncond"]) == STEPS
    assert data["cond"][0] == 1.0 and data["cond"] != data["uncond"] and data["measured"]["size"] == "48x32"
    assert json.loads(stdout.splitlines()[-1])["cond"] == data["cond"]

    out = tmp_path / "v.mp4"
    code, _, _ = run(capsys, *RUN, "--cache", "magcache:0.3", "--out", str(out))
    assert code == 0
    step_cache = json.loads(out.with_suffix(".json").read_text())["step_cache"]
    assert step_cache["settings"]["ratios"] == str(saved) and step_cache["skipped"]["cond"]
    # Other step counts interpolate the calibration.
    code, _, _ = run(
        capsys, *RUN[:-3], "--steps", "20", "--cache", "magcache:0.3", "--out", str(tmp_path / "w.mp4")
    )
    assert code == 0
    assert (
        "12 -> 20 steps" in json.loads((tmp_path / "w.json").read_text())["step_cache"]["settings"]["ratios"]
    )


def test_calibrate_cache_refuses_a_cache(capsys):
    code, _, err = run(capsys, "calibrate-cache", "--cache", "magcache")
    assert code == 2 and "drop --cache" in one_error_line(err)


def test_ctrl_c_and_resume_of_a_cached_run_give_the_uninterrupted_frames(capsys, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    assert run(capsys, *RUN, "--cache", FIRSTBLOCK, "--out", str(reference))[0] == 0
    expected = read_video(reference)
    skipped = json.loads((tmp_path / "reference.json").read_text())["step_cache"]["skipped"]

    out, ckpt = tmp_path / "frames", tmp_path / "frames.ckpt"
    calls = []
    original = WanPipeline.predict_noise

    def interrupt(pipe, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return original(pipe, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(WanPipeline, "predict_noise", interrupt)
        code, _, err = run(capsys, *RUN, "--cache", FIRSTBLOCK, "--out", str(out), "--checkpoint-every", "3")
    assert code == 130 and "interrupted after step 7" in err
    state, request = checkpointing.load(ckpt)
    assert state.step == 7 and request["cache"] == FIRSTBLOCK
    assert state.step_cache.spec == FIRSTBLOCK and state.step_cache.streams["cond"].skipped

    code, _, err = run(capsys, "generate", "--resume", str(ckpt), "--cache", "easycache", "--no-progress")
    assert code == 2 and "whose step cache is firstblock:0.25, not easycache" in one_error_line(err)
    code, _, _ = run(capsys, "generate", "--resume", str(ckpt), "--no-progress")
    assert code == 0
    assert np.array_equal(read_video(out), expected)
    assert json.loads((tmp_path / "frames.json").read_text())["step_cache"]["skipped"] == skipped


def test_plan_shows_the_cache_and_counts_its_memory(capsys):
    code, stdout, _ = run(capsys, "plan", "--json", "--vram", "80GiB")
    plain = json.loads(stdout)
    code, stdout, _ = run(capsys, "plan", "--json", "--vram", "80GiB", "--cache", "MagCache")
    cached = json.loads(stdout)
    assert code == 0 and cached["settings"]["cache"] == "magcache" and plain["settings"]["cache"] is None
    residuals = 2 * 32760 * 1536 * 4  # cond and uncond, [tokens, dim] fp32, 1.3B at 832x480x81
    assert cached["phases"]["denoise"]["cache"] - plain["phases"]["denoise"]["cache"] == residuals
    code, stdout, _ = run(capsys, "plan", "--vram", "80GiB", "--set", "cache=teacache:0.1")
    assert code == 0 and "  cache: teacache:0.1" in stdout


def test_a_lora_gets_its_own_calibration(capsys, tmp_path):
    factors = tiny_lora.random_factors(BUILTIN_DIT.num_layers, BUILTIN_DIT.dim, BUILTIN_DIT.ffn_dim, seed=3, size=0.5)
    lora = tiny_lora.save(tiny_lora.comfy(factors, alpha=2.0), tmp_path / "style.safetensors")
    calibrate = [
        "calibrate-cache",
        "--size",
        "48x32",
        "--frames",
        "5",
        "--steps",
        str(STEPS),
        "--no-progress",
    ]
    assert run(capsys, *calibrate, "--lora", f"{lora}:0.8")[0] == 0
    stored = list((tmp_path / "cache" / "step_cache").iterdir())
    assert [p.name.startswith(f"{BUILTIN_KEY}-lora-") for p in stored] == [True]
    saved = json.loads(next(stored[0].iterdir()).read_text())
    assert saved["measured"]["loras"][0]["strength"] == 0.8

    out = tmp_path / "v.mp4"
    assert run(capsys, *RUN, "--lora", f"{lora}:0.8", "--cache", "magcache:0.3", "--out", str(out))[0] == 0
    assert json.loads(out.with_suffix(".json").read_text())["step_cache"]["settings"]["ratios"].startswith(
        str(stored[0])
    )
    for other in (["--lora", f"{lora}:0.5"], []):  # another strength, or no LoRA: not this calibration
        code, _, err = run(capsys, *RUN, *other, "--cache", "magcache:0.3", "--out", str(tmp_path / "w.mp4"))
        assert code == 2 and "calibrate-cache" in one_error_line(err)
