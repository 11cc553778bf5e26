"""The fresh-process benchmark's logic on the CPU (--dry-run: tiny models, 2 steps, three child processes)."""

import json

import pytest

from benchmarks.bench_fresh import (
    CHILDREN,
    FIRST_GUESS_S,
    NEXT_MARGIN,
    child_env,
    kind_of,
    main,
    median_ratios,
    predicted_s,
    ratios,
)


def test_dry_run_runs_each_job_in_its_own_process_on_the_fresh_caches(tmp_path, capsys):
    out = tmp_path / "fresh.json"
    result = main(["--dry-run", "--no-bytecode-cache", "--out", str(out)])  # the warm-up imports take ~20 s
    saved = json.loads(out.read_text())
    assert saved["errors"] == {} and saved["skipped"] == [] and list(saved["children"]) == list(CHILDREN)
    cold, warm, theirs = (saved["children"][name] for name in CHILDREN)
    assert cold["cache_env"]["WANFIT_CACHE_DIR"] == saved["caches"] + "/wanfit"
    assert warm["cache_env"]["TRITON_CACHE_DIR"] == saved["caches"] + "/triton"
    assert cold["spawn_to_job_end_s"] > cold["build_s"] + cold["job_s"] > 0
    assert cold["phases_s"]["plan_s"] > 0 and cold["plan"]["self_attention"] and "plan" not in theirs
    assert cold["tier"] == "exact" and theirs["median_step_s"] > 0
    # Two processes, the same plan and latents: the same video; diffusers' differs but is the job's.
    assert saved["frames_vs_wanfit_cold_mean_abs_uint8"]["wanfit_warm"] == 0.0
    assert 0 <= saved["frames_vs_wanfit_cold_mean_abs_uint8"]["diffusers"] < 32
    assert result["ratios"]["wanfit_cold_job_s_over_diffusers"] > 0
    assert "| wanfit_warm |" in capsys.readouterr().out


def test_a_child_predicted_past_the_budget_is_not_started(tmp_path):
    assert predicted_s(None) == FIRST_GUESS_S and predicted_s(100.0) == 100.0 * NEXT_MARGIN
    result = main(
        [
            "--dry-run",
            "--no-bytecode-cache",
            "--budget-s",
            str(FIRST_GUESS_S - 1),
            "--out",
            str(tmp_path / "f.json"),
        ]
    )
    assert result["children"] == {} and [s["what"] for s in result["skipped"]] == list(CHILDREN)
    assert f"predicted {FIRST_GUESS_S:.0f} s" in result["skipped"][0]["why"]


def test_children_get_the_benchmarks_cache_dirs_and_not_the_users_flash_attn4_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", "/users/own")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    env = child_env(tmp_path, None)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and "PYTHONPYCACHEPREFIX" not in env
    env = child_env(tmp_path, tmp_path / "bytecode")
    # Every child reads the bytecode the warm-up wrote, as where pip compiled the packages at install.
    assert "PYTHONDONTWRITEBYTECODE" not in env and env["PYTHONPYCACHEPREFIX"] == str(tmp_path / "bytecode")
    assert env["WANFIT_CACHE_DIR"] == str(tmp_path / "wanfit")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR" not in env


def test_repeated_children_are_compared_with_the_median_diffusers_run():
    assert kind_of("diffusers_r2") == "diffusers" and kind_of("wanfit_warm") == "wanfit_warm"
    children = {
        "wanfit_warm": {"job_s": 50.0, "spawn_to_job_end_s": 60.0},
        "diffusers": {"job_s": 60.0, "spawn_to_job_end_s": 70.0},
        "wanfit_warm_r2": {"job_s": 52.0, "spawn_to_job_end_s": 62.0},
        "diffusers_r2": {"job_s": 64.0, "spawn_to_job_end_s": 74.0},
    }
    r = ratios(children)
    assert r["wanfit_warm_job_s_over_diffusers"] == 50.0 / 62.0  # the median of 60 and 64
    assert r["wanfit_warm_r2_spawn_to_job_end_s_over_diffusers"] == 62.0 / 72.0
    assert "diffusers_r2_job_s_over_diffusers" not in r
    assert median_ratios(children) == {"wanfit_warm": 51.0 / 62.0}


def test_unknown_or_repeated_child_names_are_refused():
    for names in ("wanfit_cold,cold_wanfit", "diffusers,diffusers"):
        with pytest.raises(SystemExit, match="--children takes distinct names"):
            main(["--dry-run", "--children", names])
