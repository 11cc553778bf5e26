"""benchmarks/bench_vae.py on the CPU with the tiny model: the script's logic, not its timings."""

import json

import torch

from benchmarks.bench_vae import main


def test_dry_run_writes_rows_that_agree(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        results = main(
            ["--dry-run", "--dtypes", "fp32", "--layouts", "contiguous", "--out", str(tmp_path / "b.json")]
        )
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    rows = {(r["impl"], r["mode"]): r for r in results["rows"]}
    assert set(rows) == {
        ("diffusers", "untiled"),
        ("diffusers", "enable_tiling()"),
        ("wanfit", "untiled"),
        ("wanfit", "tile 2x2 (2 tiles)"),
    }
    assert all("error" not in r and r["seconds"] > 0 for r in rows.values())
    # same random weights: wanfit, tiled or not, agrees with diffusers' untiled decode in fp32
    assert rows["wanfit", "untiled"]["rel_err"] <= 1e-4
    assert rows["wanfit", "tile 2x2 (2 tiles)"]["rel_err"] <= 1e-4
    # the planner's estimate is reported; tiling never raises it (tiny frames: margins cover the frame)
    assert (
        0 < rows["wanfit", "tile 2x2 (2 tiles)"]["estimate_gib"] <= rows["wanfit", "untiled"]["estimate_gib"]
    )
    assert "VAE decode" in capsys.readouterr().out
