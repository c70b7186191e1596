"""Run a config as a Flower simulation on Ray (a local Ray, or a running cluster)."""
from __future__ import annotations

import logging
import os

from omegaconf import DictConfig

from fedcl.federation.faults import INJECTED_CRASH

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def backend_config(cfg: DictConfig) -> dict:
    """Ray resources per client; ``ray.address=auto`` attaches to an existing cluster."""
    init_args: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if cfg.ray.address:
        init_args["address"] = str(cfg.ray.address)
    else:  # a Ray of our own, even if a `ray start` cluster runs here (ray.init would attach to it)
        init_args["address"] = "local"
        if cfg.ray.num_cpus:
            init_args["num_cpus"] = int(cfg.ray.num_cpus)
    return {"client_resources": {"num_cpus": float(cfg.ray.client_cpus),
                                 "num_gpus": float(cfg.ray.client_gpus)},
            "init_args": init_args}


def hide_injected_faults(record: logging.LogRecord) -> bool:
    """Flower logs every client exception with its traceback; an injected crash (``faults.crash``)
    is reported in the progress line and ``failures`` instead. Real errors still print."""
    return INJECTED_CRASH not in record.getMessage()


def simulate(cfg: DictConfig, run_dir: str, resume: bool = False) -> None:
    from flwr.simulation import run_simulation

    from fedcl.federation.client_app import make_client_app
    from fedcl.federation.server_app import make_server_app

    # Flower logs through its own console handler; without this Hydra's root handler repeats it
    # at DEBUG level.
    logging.getLogger("flwr").propagate = False
    logging.getLogger("flwr").addFilter(hide_injected_faults)
    run_simulation(server_app=make_server_app(cfg, run_dir, resume), client_app=make_client_app(cfg, run_dir),
                   num_supernodes=int(cfg.num_clients), backend_config=backend_config(cfg))
