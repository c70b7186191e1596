"""Flower's Ray backend as fedcl sets it up: resources per client, how Ray starts, how many
SuperNodes a simulation has, and what happens when a Ray worker dies.

Clients are data, not nodes: a message names the logical client it is for (``config["client"]``),
so the federation's SuperNodes are execution slots and any number of them serves any number of
clients. A simulation started by fedcl gets as many as a round has messages in flight (capped):
Flower's engine hands each node at most one message per 0.1 s pass, so fewer nodes than a round's
messages would only spread its delivery over several passes.

A Ray worker that serves clients can die (the OOM killer, a segfault in a native library, a node
that leaves the cluster). Flower creates its actors with ``ClientAppActor.options(**client_resources)``,
so the resources below also carry Ray's own actor options: Ray restarts a dead actor
(``max_restarts``) and runs the message it was processing again (``max_task_retries``). The
client's state on disk is from before the round, so the retry is the same computation; the client
reports that it ran on a restarted worker (``fedcl.client.app.worker_restarted``). Whatever cannot be repaired that way
(the node's raylet, the GCS) ends the run with ``fedcl.errors.RuntimeLost``; see
``fedcl.runtime.simulation``.
"""
from __future__ import annotations

import logging

from omegaconf import DictConfig

MAX_SLOTS = 1000         # SuperNodes of a simulation fedcl starts, at most
MAX_WORKER_RETRIES = 2   # times Ray runs one message again after its worker died
log = logging.getLogger(__name__)


def backend_config(cfg: DictConfig) -> dict:
    """The ``backend_config`` of ``run_simulation``: Ray resources per client (plus the actor
    restart options Flower passes on to Ray with them), and how Ray starts."""
    return {"client_resources": {"num_cpus": float(cfg.ray.client_cpus), "num_gpus": float(cfg.ray.client_gpus),
                                 "max_restarts": -1, "max_task_retries": MAX_WORKER_RETRIES},
            "init_args": ray_init_args(cfg)}


def ray_init_args(cfg: DictConfig) -> dict:
    """``ray.init`` arguments of the run (``simulation.start_local_ray`` starts Ray with them before
    Flower's backend would)."""
    init_args: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if cfg.ray.address:
        init_args["address"] = str(cfg.ray.address)
    else:  # a Ray of our own, even if a `ray start` cluster runs here (ray.init would attach to it)
        init_args["address"] = "local"
        if cfg.ray.num_cpus:
            init_args["num_cpus"] = int(cfg.ray.num_cpus)
    return init_args


def num_slots(largest_round: int) -> int:
    """SuperNodes for a simulation whose largest round asks ``largest_round`` clients."""
    return max(1, min(int(largest_round), MAX_SLOTS))

