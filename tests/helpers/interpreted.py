"""Running a helper script under Triton's interpreter, in a process of its own (the interpreter must be
chosen before Triton is first imported), and reading the JSON it prints."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_interpreted(script: str, skip_reason: str) -> dict:
    """tests/helpers/<script>'s JSON output; a pytest skip with `skip_reason` where Triton is absent."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip(skip_reason)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    run = subprocess.run(
        [sys.executable, str(Path(__file__).parent / script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)
