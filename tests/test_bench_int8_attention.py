"""The int8 attention benchmark on the CPU (--dry-run: tiny shapes, the torch reference as the kernel)."""

import json

from benchmarks.bench_int8_attention import INPUTS, Run, main, parse_args


def test_dry_run_times_both_shapes_and_measures_every_error(tmp_path, capsys):
    out = tmp_path / "int8.json"
    result = main(["--dry-run", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result, sort_keys=True))
    assert saved["skipped"] == [] and saved["failures"] == {}
    assert set(saved["shapes"]) == {"1.3B_480p", "14B_720p"}
    for entry in saved["shapes"].values():
        assert entry["ms"]["int8_triton"] > 0 and entry["ms"]["sdpa_math"] > 0
    assert set(saved["shapes"]["1.3B_480p"]["errors"]) == set(INPUTS)
    assert set(saved["shapes"]["14B_720p"]["errors"]) == {"random"}
    random = saved["shapes"]["1.3B_480p"]["errors"]["random"]
    assert 1e-3 < random["rel_l2_vs_bf16_exact"] < 6e-2  # lossy, but close
    assert (
        random["kernel_vs_reference_rel_l2_first_300_rows"] == 0.0
    )  # the reference stands in for the kernel
    assert random["bf16_exact_rel_l2_vs_fp32_first_300_rows"] < 5e-3
    assert "wrote" in capsys.readouterr().out


def test_a_stage_past_the_budget_is_skipped_and_said(tmp_path):
    run = Run(parse_args(["--dry-run", "--out", str(tmp_path / "x.json"), "--budget-s", "1"]))
    run.args.dry_run = False  # the budget applies off the dry run only
    assert run.fits("small", 0.1)
    assert not run.fits("14B_720p sdpa_flash", 30.0)
    assert run.result["skipped"][0].startswith("14B_720p sdpa_flash (predicted 30.0 s")
