"""A memory budget nothing fits: one sentence naming the smallest budget, exit 2, no output."""

from wanfit.cli import main


def test_generate_with_an_impossible_budget_names_the_smallest_one(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    code = main(
        ["generate", "--vram", "1MiB", "--size", "64x48", "--frames", "5", "--steps", "2", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("wanfit: error:") and "budget" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
