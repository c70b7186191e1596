"""The experiment config for apps started by ``flwr run``, where only ``run_config`` reaches them.

``run_simulation`` (what ``fedcl`` uses) passes the config to the apps through a closure. Under
``flwr run`` the apps compose the same Hydra config from the packaged ``conf/`` with the overrides
given as one string: ``flwr run . --run-config 'overrides="num_clients=4 method=finetune"'``.
Any federation size works (Flower's default of 2 SuperNodes included): a message names its
client, and nodes are execution slots (see docs/flwr_run.md).
"""
from __future__ import annotations

import functools
import os
import shlex
import tempfile
from pathlib import Path

from flwr.app import Context
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def config_from_context(context: Context) -> DictConfig:
    """The run's config, validated like the ``fedcl`` command's (a bad override fails the run with
    a ConfigError naming it). Composed once per process (every client message asks for it) and
    read-only, as ``fedcl.federation.client_app.worker_config``."""
    return _validated_config(str(context.run_config.get("overrides", "")))


@functools.lru_cache(maxsize=4)
def _validated_config(overrides: str) -> DictConfig:
    from fedcl.config import validate  # here: fedcl.config imports parts of fedcl.federation

    cfg = compose_config(shlex.split(overrides))
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def run_dir_from_context(context: Context) -> str:
    """``run-dir`` from the run config, else a folder named after Flower's run id."""
    default = os.path.join(tempfile.gettempdir(), "fedcl-runs", str(context.run_id))
    return str(context.run_config.get("run-dir", "") or default)
