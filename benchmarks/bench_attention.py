"""Attention backends at the default job's shape (32,760 tokens, 12 heads of 128) on this GPU.

    python3 benchmarks/bench_attention.py --out $OUT/bench_attention.json
    python3 benchmarks/bench_attention.py --emulate t4 --out $OUT/bench_attention_t4.json

Wraps `wanfit bench attention` (every other flag passes through: --seq, --backends, ...). Under
`--emulate t4` the run follows T4 rules (fp16, sm_75 kernels only) with memory capped at 15 GiB;
speed is not emulated. The last lines are the table and the selected backend's peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wanfit.cli import main as wanfit_main  # noqa: E402

PEAK_GOAL_MIB = 1024  # the selected backend under T4 emulation at 32,760 tokens; math needs ~48 GiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    args, rest = parser.parse_known_args(argv)
    rc = wanfit_main(["bench", "attention", *rest, "--out", str(args.out)])
    if rc != 0 or not args.out.is_file():
        return rc or 1
    result = json.loads(args.out.read_text())
    chosen = next((r for r in result["results"] if r["selected"]), None)
    if chosen is None or chosen["status"] != "ok":
        print(f"selected backend: {result['selected']} (not timed)")
        return 0
    peak = "n/a on a CPU" if chosen["peak_mib"] is None else f"{chosen['peak_mib']:.0f} MiB"
    line = (
        f"selected backend: {chosen['name']} ({chosen['kernel_dtype']}), {chosen['ms']:.2f} ms, peak {peak}"
    )
    if result["emulated"] and chosen["peak_mib"] is not None:
        verdict = "within" if chosen["peak_mib"] < PEAK_GOAL_MIB else "OVER"
        line += f" ({verdict} the {PEAK_GOAL_MIB} MiB goal)"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
