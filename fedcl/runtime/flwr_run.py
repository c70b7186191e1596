"""The apps ``flwr run .`` starts (pyproject.toml's ``[tool.flwr.app.components]``), where only
``run_config`` reaches them.

``run_simulation`` (what ``fedcl`` uses) passes the config to the apps through a closure
(``fedcl.server.app.make_server_app``, ``fedcl.client.app.make_client_app``). Under ``flwr run`` the
apps compose the same Hydra config from the packaged ``conf/`` with the overrides given as one
string: ``flwr run . --run-config 'overrides="num_clients=4 method=finetune"'``. Any federation
size works (Flower's default of 2 SuperNodes included): a message names its client, and nodes are
execution slots (see docs/flwr_run.md).
"""
from __future__ import annotations

import functools
import os
import shlex
import tempfile

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from fedcl.client import app as client
from fedcl.config import compose_config, validate


def config_from_context(context: Context) -> DictConfig:
    """The run's config, validated like the ``fedcl`` command's (a bad override fails the run with
    a ConfigError naming it). Composed once per process (every client message asks for it) and
    read-only, as ``fedcl.client.app.worker_config``."""
    return _validated_config(str(context.run_config.get("overrides", "")))


@functools.lru_cache(maxsize=4)
def _validated_config(overrides: str) -> DictConfig:
    cfg = compose_config(shlex.split(overrides))
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def run_dir_from_context(context: Context) -> str:
    """``run-dir`` from the run config, else a folder named after Flower's run id."""
    default = os.path.join(tempfile.gettempdir(), "fedcl-runs", str(context.run_id))
    return str(context.run_config.get("run-dir", "") or default)


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    from fedcl.server.app import run_server  # here: a process that only runs clients never loads the server

    run_dir = run_dir_from_context(context)
    print(f"fedcl: writing results to {run_dir}", flush=True)
    run_server(grid, config_from_context(context), run_dir)


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return client.train(config_from_context(context), run_dir_from_context(context), msg, context)
