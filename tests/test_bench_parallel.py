"""The multi-GPU benchmark's logic (--dry-run: tiny model, CPU processes on gloo)."""

import json

from benchmarks.bench_parallel import main, parallel_plans
from tests.helpers.ranks import run_ranks


def test_every_plan_of_the_world_size_is_measured():
    assert parallel_plans(8, 12) == [(2, 4)]  # 1.3B: 12 heads
    assert parallel_plans(8, 40) == [(2, 4), (1, 8)]  # 14B: 40 heads
    assert parallel_plans(3, 12) == [(1, 3)]


def _bench(rank, out):
    main(["--dry-run", "--out", str(out)])
    return rank


def test_dry_run_on_two_processes_writes_json(tmp_path, capfd):
    out = tmp_path / "bench_parallel.json"
    results = run_ranks(_bench, 2, out, in_session=False, timeout=120)
    assert [r.exitcode for r in results] == [0, 0], results
    saved = json.loads(out.read_text())
    assert saved["world_size"] == 2 and saved["backend"] == "gloo"
    assert [p["parallel"] for p in saved["plans"]] == ["cfg2,ulysses1", "cfg1,ulysses2"]
    for plan in saved["plans"]:
        assert plan["rel_error_vs_one_gpu"] < 1e-5  # the same prediction as one process
        assert plan["prediction_ms"] > 0 and plan["speedup_step"] > 0
        assert len(plan["peak_gib_per_gpu"]) == 2 and plan["estimate_gib_per_gpu"] > 0
    assert json.loads(capfd.readouterr().out)["tokens"] == saved["tokens"] == 36  # rank 0 alone printed
