"""The memory benchmark's CPU-side logic: predictions for every plan, the key mapping, the report."""

import json
from pathlib import Path

from benchmarks import bench_memory

MANIFESTS = Path(__file__).parent / "data" / "manifests"


def test_dry_run_writes_predictions(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_memory.main(["--dry-run", "--layers", "4", "--te-layers", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["phase"] for r in rows} == {"denoise", "vae_decode", "text_encoder"}
    assert data["request"]["layers"] == 4 and data["request"]["tokens"] == 32760
    by_plan = {r["plan"]: r["predicted"] for r in rows if r["phase"] == "denoise"}
    assert by_plan["streamed k=0"] < by_plan["resident"] < by_plan["resident, CFG batched"]
    assert by_plan["resident, CFG batched"] < by_plan["fast tier compiled, CFG batched"]
    assert by_plan["resident"] < by_plan["fast tier eager"]
    decode = [r["predicted"] for r in rows if r["phase"] == "vae_decode"]
    assert decode == sorted(decode, reverse=True)
    assert "predicted" in capsys.readouterr().out
