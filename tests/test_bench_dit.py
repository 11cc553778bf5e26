"""The DiT benchmark's CPU-side logic (--dry-run: tiny model on the CPU)."""

import json

import pytest

from benchmarks.bench_dit import latent_shape, main


def test_dry_run_writes_json_and_models_agree(tmp_path, capsys):
    out = tmp_path / "bench_dit.json"
    result = main(["--dry-run", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["latent"] == result["latent"] == [1, 16, 3, 4, 6]
    assert saved["wanfit"]["median_ms"] > 0 and saved["diffusers"]["median_ms"] > 0
    assert saved["rel_l2_wanfit_vs_diffusers"] < 1e-4  # same random weights, fp32 on the CPU
    assert "diffusers/wanfit time ratio" in capsys.readouterr().out


def test_latent_shape_of_the_reference_video():
    assert latent_shape("832x480", 81) == (21, 60, 104)
    with pytest.raises(SystemExit):
        latent_shape("830x480", 81)


def test_dry_run_times_the_gelu_in_place_lever_and_it_changes_no_bit(tmp_path):
    result = main(["--dry-run", "--ffn-gelu-in-place", "--skip-diffusers", "--out", str(tmp_path / "b.json")])
    assert result["wanfit_gelu_in_place"]["median_ms"] > 0
    assert result["gelu_in_place_equal_to_eager"] is True


def test_dry_run_without_cuda_says_the_fused_kernels_were_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = main(["--dry-run", "--fused-elementwise", "--skip-diffusers", "--out", str(tmp_path / "b.json")])
    assert "no CUDA device" in result["wanfit_fused"]["skipped"]
    assert "rel_l2_fused_vs_wanfit" not in result
    assert "wanfit_fused         skipped: no CUDA device" in capsys.readouterr().out
