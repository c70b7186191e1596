"""The Flower ``ServerApp`` of fedcl: a ``ContinualStrategy`` driven by ``fedcl.server.loop``.

``make_server_app`` binds a config (``run_simulation`` leaves ``run_config`` empty); the app
``flwr run .`` starts reads it from the run config instead (``fedcl.runtime.flwr_run``).
"""
from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fedcl.server import loop
from fedcl.server.strategy import ContinualStrategy


def run_server(grid: Grid, cfg: DictConfig, run_dir: str, resume: bool = False, min_nodes: int = 1) -> dict:
    """The whole federated continual-learning run; writes and returns results.json's content."""
    return loop.run(ContinualStrategy(cfg, run_dir, resume, min_nodes=min_nodes), grid)


def make_server_app(cfg: DictConfig, run_dir: str, resume: bool = False, on_results=None,
                    min_nodes: int = 1) -> ServerApp:
    """A ServerApp bound to a config; ``on_results()`` runs once results.json is written;
    ``min_nodes``: the SuperNodes the simulation was started with (wait for all of them)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, run_dir, resume, min_nodes)
        if on_results is not None:
            on_results()

    return app

