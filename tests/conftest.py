"""Test-wide settings: one CPU thread (tiny matmuls on a busy 2-core box run far faster) and a private cache."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "wanfit-cache"))
