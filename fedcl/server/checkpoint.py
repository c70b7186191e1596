"""The server's checkpoint: everything needed to continue a killed run from its last round.

Written atomically after every round to ``<run dir>/checkpoint/``: ``server.pt`` (global arrays,
per-round metrics, accuracy matrix, byte counters, failures, the position in the schedule, RNG
states) and ``config.yaml`` (the run's resolved config, so ``fedcl resume=<run dir>`` needs
nothing else). Client states live beside it in ``client_state/``, versioned by round (see
``ClientStateStore``), so a client that had already trained in the interrupted round is rolled
back to its state before that round.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedcl.client.store import atomic_save
from fedcl.errors import ConfigError
from fedcl.report import atomic_write
from fedcl.server.server_state import pack, unpack

FOLDER = "checkpoint"


def save_config(run_dir: str | os.PathLike, cfg: DictConfig) -> None:
    atomic_write(Path(run_dir) / FOLDER / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def load_config(run_dir: str | os.PathLike) -> DictConfig:
    """The config a checkpointed run was started with; a clear error if there is none."""
    path = Path(run_dir) / FOLDER / "config.yaml"
    if not path.exists():
        raise ConfigError(f"resume={run_dir}: no {FOLDER}/config.yaml there. Point resume at the run "
                          "directory of an earlier fedcl run (the one holding results/metrics.csv).")
    return OmegaConf.load(path)


def save(run_dir: str | os.PathLike, state: dict) -> None:
    """``state``: plain types and tensors (``ServerState.state_dict()`` and the callbacks' states)."""
    rng = pack({"torch": torch.get_rng_state(), "numpy": np.random.get_state()})
    atomic_save({**state, "rng": rng}, Path(run_dir) / FOLDER / "server.pt")


def load(run_dir: str | os.PathLike) -> dict | None:
    """The last saved state (RNG states restored), or None if no round completed yet."""
    path = Path(run_dir) / FOLDER / "server.pt"
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a checkpoint of another fedcl version or a broken file
        raise ConfigError(f"resume={run_dir}: {path} cannot be read ({type(err).__name__}); it was written by "
                          "another version of fedcl or is damaged. Start the run again without resume.") from None
    rng = unpack(state.pop("rng"))
    torch.set_rng_state(rng["torch"])
    np.random.set_state(tuple(rng["numpy"]))
    return state
