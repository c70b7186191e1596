import os

import pytest
from omegaconf import DictConfig

from fedcl.config import compose_config

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture(autouse=True)
def _dataset_cache(tmp_path_factory, monkeypatch):
    """Decoded image folders go to a temporary cache, not the user's ~/.cache/fedcl."""
    monkeypatch.setenv("FEDCL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fedcl-cache"))


@pytest.fixture
def make_cfg():
    """The packaged Hydra config with overrides, as `fedcl` would compose it."""
    def _make(*overrides: str) -> DictConfig:
        return compose_config(list(overrides))
    return _make
