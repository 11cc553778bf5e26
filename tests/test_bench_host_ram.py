"""The host-RAM benchmark's CPU side: a dry run (predictions, one tiny run measured without a cgroup),
the cgroup bookkeeping on fake files, and the report."""

import json

from benchmarks import bench_host_ram as B

GIB = 1024**3


def test_dry_run_predicts_the_case_and_measures_a_tiny_run(tmp_path, capsys):
    out = tmp_path / "host.json"
    args = ["--dry-run", "--cases", "rtx4090-32gb-14b", "--work", str(tmp_path), "--out", str(out)]
    assert B.main(args) == 0
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    plan = row["plan"]
    assert plan["feasible"] and plan["request"]["model"] == "14B" and plan["request"]["height"] == 720
    assert plan["host_bytes"] <= plan["host_budget_bytes"] and plan["host_budget_source"].startswith("--ram")
    assert row["exit"] == 0 and row["timings"]["denoise_s"] > 0 and row["maxrss_children"] > 0
    printed = capsys.readouterr().out
    assert "| rtx4090-32gb-14b | 32.0 |" in printed and "stream_dit_blocks" in printed


def test_unknown_cases_and_a_machine_without_a_gpu(tmp_path, capsys):
    assert B.main(["--cases", "nope", "--work", str(tmp_path)]) == 2
    assert "unknown case" in capsys.readouterr().err
    assert B.main(["--cases", "t4-colab", "--work", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_a_group_gets_its_limit_and_no_swap_and_reads_its_stats(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory io\n")
    (root / "cgroup.subtree_control").write_text("cpu\n")
    monkeypatch.setattr(B, "CGROUP", root)
    group = B.Group("case", 12_700_000_000)
    (group.path / "memory.swap.max").write_text("max")
    group = B.Group("case", 12_700_000_000)  # the swap file now exists: it is turned off
    assert (root / "cgroup.subtree_control").read_text() == "+memory"
    assert (group.path / "memory.max").read_text() == "12700000000"
    assert (group.path / "memory.swap.max").read_text() == "0"
    (group.path / "memory.stat").write_text("anon 100\nfile 200\nunevictable 7\nactive_anon 1\n")
    assert group.stat() == {"anon": 100, "file": 200, "file_mapped": 0, "shmem": 0, "unevictable": 7}
    for name in ("memory.max", "memory.swap.max", "memory.stat"):
        (group.path / name).unlink()
    group.close()
    assert not group.path.exists()


def test_the_table_sets_predictions_beside_measurements():
    plan = {
        "feasible": True,
        "gave_up": ["stream_text_encoder", "text_encoder_from_file"],
        "host_phases": {"denoise": {"needed": 4 * GIB, "peak": 17 * GIB}},
        "phases": {"denoise": {"peak": 6 * GIB}},
    }
    rows = [
        {"case": "baseline", "ram_limit": None, "predicted_process": 2.5 * GIB, "memory_peak": 2 * GIB,
         "stat_max": {"anon": GIB}, "oom_kill": 0, "exit": 0},
        {"case": "t4-colab", "ram_limit": 12_700_000_000, "plan": plan, "memory_peak": 11 * GIB,
         "stat_max": {"anon": 3 * GIB}, "oom_kill": 0, "exit": 0, "timings": {"denoise_peak_gib": 6.2},
         "per_step_s": 1.5},
    ]  # fmt: skip
    text = B.table(rows)
    assert "| baseline | - | the process alone | 2.50 | - | 2.00 | 1.00 | 0 | 0 |" in text
    assert (
        "| t4-colab | 12.7 | stream_text_encoder, text_encoder_from_file | 4.00 | 17.00 | 11.00 | 3.00 |"
        in text
    )
    assert "6.00 / 6.20" in text and "| 1.50 |" in text


def test_the_sweep_table_counts_anonymous_memory_not_reclaimable_mapped_pages():
    plan = {
        "feasible": True,
        "gave_up": ["stream_dit_blocks"],
        "host_phases": {"denoise": {"needed": 20 * GIB, "peak": 58 * GIB}},
        "phases": {"denoise": {"peak": 20 * GIB}},
    }
    row = {
        "case": "l4-14B-720p", "plan": plan, "memory_peak": 57 * GIB, "exit": 0, "oom_steps": [],
        "stat_max": {"anon": 19 * GIB, "shmem": GIB, "file_mapped": 27 * GIB, "need": 47 * GIB},
        "timings": {"denoise_peak_gib": 20.5},
    }  # fmt: skip
    text = B.sweep_table([row])
    # need = anon + shmem (20), not the 47 that counted the loader's mapped file pages
    assert "| 20.00 / 20.00 | 58.00 / 57.00 | 27.00 | none | 0 |" in text
    assert "| yes |" in text
