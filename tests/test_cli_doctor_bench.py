"""`wanfit doctor` and `wanfit bench attention`, run in-process."""

import json
import re

import pytest
import torch

import wanfit.attention as wa
from benchmarks.bench_attention import main as bench_script
from wanfit.attention.ranking import load_measured
from wanfit.cli import main
from wanfit.hardware import probe


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for var in ("WANFIT_EMULATE", "WANFIT_ATTENTION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path / "cache"))
    yield
    wa.reset()


def _json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_doctor_json_under_t4_emulation(capsys):
    data = _json(capsys, "doctor", "--json", "--emulate", "t4")
    assert data["device"]["name"] == "Tesla T4" and data["device"]["compute_capability"] == [7, 5]
    assert data["compute_dtype"] == "float16"
    att = data["attention"]
    assert att["selected"] == "sdpa_efficient" and att["selection"]["kernel_dtype"] == "float16"
    assert att["call"]["q_len"] == 32760 and att["call"]["heads"] == 12 and att["call"]["head_dim"] == 128
    by_name = {c["name"]: c for c in att["candidates"]}
    assert set(by_name) == {"flash_attn4", "flash_attn3", "flash_attn3_fp8", "flash_attn2", "sage", "int8_triton",
                            "xformers", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "chunked"}  # fmt: skip
    assert all(set(c) >= {"name", "available", "reason"} for c in att["candidates"])
    assert not by_name["sdpa_flash"]["available"] and "sm_75" in by_name["sdpa_flash"]["reason"]
    assert not by_name["sdpa_math"]["available"] and "48.0 GiB" in by_name["sdpa_math"]["reason"]


def test_doctor_json_on_cpu(capsys):
    data = _json(capsys, "doctor", "--json", "--emulate", "cpu")
    assert data["device"]["type"] == "cpu" and data["compute_dtype"] == "float32"
    assert data["storage_dtype"] == "bfloat16"
    assert data["attention"]["selected"] == "chunked"
    chunked = next(c for c in data["attention"]["candidates"] if c["name"] == "chunked")
    assert chunked["available"] and chunked["smoke_test"] == "passed"
    assert data["host"]["ram_total"] > 0


def test_doctor_text_report(capsys):
    assert main(["doctor", "--emulate", "v100", "--dtype", "bf16"]) == 0
    text = capsys.readouterr().out
    assert "Tesla V100-SXM2-16GB (cuda, sm_70)" in text and "compute bfloat16" in text
    assert "selected    sdpa_efficient (float16, cast from bfloat16)" in text
    assert "32,760 tokens, 12 heads of 128" in text
    assert re.search(r"\n +flash_attn2 +no +needs compute capability 8\.0 \(Ampere\) or newer", text)


def test_doctor_errors_are_one_sentence_and_exit_2(capsys):
    assert main(["doctor", "--emulate", "t4", "--attention", "flash_attn2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wanfit: error: The attention backend flash_attn2 was asked for but needs compute")
    assert main(["doctor", "--emulate", "k80"]) == 2
    assert "Unknown card to emulate 'k80'" in capsys.readouterr().err


def test_bench_attention_on_cpu_times_usable_backends_and_saves_the_ranking(capsys, tmp_path):
    out = tmp_path / "bench.json"
    data = _json(capsys, "bench", "attention", "--seq", "48", "--kv-seq", "40", "--heads", "2", "--head-dim", "8",
                 "--warmup", "0", "--runs", "1", "--json", "--out", str(out))  # fmt: skip
    assert json.loads(out.read_text()) == data
    rows = {r["name"]: r for r in data["results"]}
    fastest = min(("sdpa_math", "chunked"), key=lambda n: rows[n]["ms"])  # the only two a CPU runs
    assert (
        data["selected"] == fastest and rows[fastest]["selected"] and data["ranking"] == "measured just now"
    )
    for name in ("sdpa_math", "chunked"):
        assert rows[name]["status"] == "ok" and rows[name]["ms"] > 0 and rows[name]["tflops"] > 0
        assert rows[name]["max_abs_diff"] < 1e-5
    assert rows["sdpa_flash"]["status"] == "skipped" and "CUDA" in rows["sdpa_flash"]["reason"]
    assert data["flops"] == 4 * 1 * 2 * 48 * 40 * 8
    assert set(load_measured(probe())) == {"sdpa_math", "chunked"}
    assert wa.Dispatcher(probe()).ranking_source == "measured on this card"


def test_bench_attention_table_and_backend_filter(capsys):
    assert main(["bench", "attention", "--seq", "32", "--heads", "1", "--head-dim", "8", "--runs", "1",
                 "--backends", "chunked,sdpa_efficient", "--no-save"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "chunked" in text and "sdpa_efficient" in text and "skipped: needs a CUDA device" in text
    assert not any(line.lstrip().startswith("sdpa_math") for line in text.splitlines())
    assert main(["bench", "attention", "--backends", "flash", "--seq", "8"]) == 2
    assert main(["bench", "attention", "--emulate", "t4"]) == 2
    assert "Cannot time an emulated Tesla T4" in capsys.readouterr().err


def test_benchmark_script_wraps_the_command(capsys, tmp_path):
    out = tmp_path / "bench_attention.json"
    assert (
        bench_script(["--out", str(out), "--seq", "24", "--heads", "1", "--head-dim", "8", "--runs", "1"])
        == 0
    )
    printed = capsys.readouterr().out.strip().splitlines()
    saved = json.loads(out.read_text())
    # The selection follows what was just measured (math or chunked, whichever ran faster here).
    assert saved["selected"] in ("sdpa_math", "chunked")
    assert printed[-1].startswith(f"selected backend: {saved['selected']} (float32)")
    assert saved["shape"]["q_len"] == 24


def test_bench_attention_selects_by_what_it_measured(capsys, monkeypatch):
    # The CPU numbers: math 135 ms, chunked 85 ms; sdpa_math used to stay selected.
    from wanfit.commands import bench

    times = iter([135.0, 85.0])  # in rank order: sdpa_math, then chunked
    monkeypatch.setattr(bench, "_time_ms", lambda fn, runs, on_gpu: (fn(), next(times))[1])
    data = _json(capsys, "bench", "attention", "--seq", "32", "--heads", "1", "--head-dim", "8", "--warmup", "0",
                 "--runs", "1", "--json")  # fmt: skip
    rows = {r["name"]: r for r in data["results"]}
    assert (rows["sdpa_math"]["ms"], rows["chunked"]["ms"]) == (135.0, 85.0)
    assert data["selected"] == "chunked" and rows["chunked"]["selected"] and not rows["sdpa_math"]["selected"]
    d = wa.Dispatcher(probe())  # a later run ranks by the stored times
    assert d.order.index("chunked") < d.order.index("sdpa_math")
    assert d.select(d.call_on_probe(torch.float32, 32, heads=1, head_dim=8)).backend == "chunked"


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--seq", "0"], "--seq must be a positive integer, not 0."),
        (["--runs", "0"], "--runs must be a positive integer, not 0."),
        (["--kv-seq", "0"], "--kv-seq must be a positive integer, not 0."),
        (["--warmup", "-1"], "--warmup must be 0 or a positive integer, not -1."),
    ],
)
def test_bench_attention_refuses_zero_lengths_and_runs(capsys, monkeypatch, flags, expected):
    from wanfit.commands import bench

    monkeypatch.setattr(bench, "_time_ms", lambda *a: pytest.fail("a refused setting was timed"))
    assert main(["bench", "attention", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"wanfit: error: {expected}\n" and captured.out == ""
    assert load_measured(probe()) == {}  # nothing saved


def test_a_faster_fallback_is_ranked_after_fused_kernels_and_the_bench_says_why():
    from wanfit.attention.backends import builtin_backends
    from wanfit.attention.ranking import rank
    from wanfit.commands.bench import _ranking_notes

    order = rank(builtin_backends(), {"chunked": 85.0, "sdpa_math": 135.0, "sdpa_efficient": 200.0}, False)
    assert order.index("sdpa_efficient") < order.index("chunked") < order.index("sdpa_math")
    assert rank(builtin_backends(), {}, False)[-5:] == ["sdpa_math", "chunked", "flash_attn3_fp8", "int8_triton", "sage"]
    fallbacks = ["sdpa_math", "chunked"]
    notes = _ranking_notes(
        "sdpa_efficient", {"chunked": 85.0, "sdpa_math": 135.0, "sdpa_efficient": 200.0}, fallbacks
    )
    assert len(notes) == 2 and notes[0].startswith(
        "sdpa_math measured faster than sdpa_efficient at this shape"
    )
    assert "the fallbacks rank after every fused kernel" in notes[0]
    assert _ranking_notes("chunked", {"chunked": 85.0, "sdpa_math": 135.0}, fallbacks) == []
