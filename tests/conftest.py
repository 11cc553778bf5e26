"""Test-wide settings: one CPU thread (tiny matmuls on a busy 2-core box run far faster) and a private cache."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "wanfit-cache"))


@pytest.fixture
def one_process_env(monkeypatch):
    """No emulation, forced backend or rank variables from the environment, and the attention
    module's process-wide state reset after: for tests that start processes of a run themselves."""
    import wanfit.attention as wa

    for var in ("WANFIT_EMULATE", "WANFIT_ATTENTION", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    yield
    wa.reset()
