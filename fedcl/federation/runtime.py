"""Faults of the Ray runtime under a simulation, as opposed to faults of the clients themselves.

A Ray worker that serves clients can die (the OOM killer, a segfault in a native library, a node
that leaves the cluster). Flower's actor pool (flwr 1.42, ``BasicActorPool``) puts the dead actor
back and sends it every later message, so its clients fail in every round. ``install()`` replaces
that pool with one that swaps a dead actor for a fresh one; the strategy then asks the clients
whose reply was ``worker_lost`` again (their state on disk is from before the round, so the retry
is the same computation). Whatever cannot be repaired that way (the node's raylet, the GCS) ends
the run with ``fedcl.errors.RuntimeLost``; see ``fedcl.federation.simulation``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re

from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Ray's exceptions that mean the process running the client is gone, not that the client raised
# (a client's own exception reaches the server as flwr's ClientAppException).
LOST = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
                  "NodeDiedError", "LocalRayletDiedError", "RaySystemError", "OutOfMemoryError",
                  "ObjectLostError", "OwnerDiedError", "ObjectReconstructionFailedError"})
# Flower's simulation engine writes an error reply's reason as "<class 'module.Name'>:<'message'>"
_TYPE = re.compile(r"<class 'ray\.exceptions\.(\w+)'>")


def worker_lost(reason: str) -> bool:
    """Does this error reply's reason say the client's Ray actor, worker or node died?"""
    match = _TYPE.match(reason.strip())
    return bool(match) and match.group(1) in LOST


def install() -> None:
    """Make Flower's Ray backend replace dead actors (idempotent; call before ``run_simulation``)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    raybackend.BasicActorPool = _replacing_pool_class()


@functools.cache  # one class, however often install() runs
def _replacing_pool_class():
    import ray
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    class ReplacingActorPool(BasicActorPool):
        """``BasicActorPool`` (flwr 1.42) that swaps an actor whose worker died for a new one.

        ``RayBackend.process_message`` calls ``fetch_result_and_return_actor_to_pool`` and, when it
        raises, ``add_actor_back_to_pool(future)``, which appends whatever actor ``_future_to_actor``
        holds for the future: putting a fresh actor there is all it takes.
        """

        def fetch_result_and_return_actor_to_pool(self, future):
            try:
                return super().fetch_result_and_return_actor_to_pool(future)
            except ray.exceptions.RayActorError:
                dead = self._future_to_actor[future]
                with contextlib.suppress(Exception):  # an "unavailable" actor may still hold its CPUs
                    ray.kill(dead, no_restart=True)
                self._future_to_actor[future] = self.create_actor_fn()
                log.warning("a Ray worker serving clients died; started a new one in its place")
                raise

    return ReplacingActorPool


def backend_config(cfg: DictConfig) -> dict:
    """Ray resources per client; ``ray.address=auto`` attaches to an existing cluster.

    Also installs fedcl's actor pool in Flower's Ray backend (``install``), so any
    simulation started with this config gets a new Ray worker when one dies.
    """
    install()
    from fedcl.federation import registration

    registration.install()  # Flower's engine without per-node costs per message (100,000 clients)
    return {"client_resources": {"num_cpus": float(cfg.ray.client_cpus),
                                 "num_gpus": float(cfg.ray.client_gpus)},
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
