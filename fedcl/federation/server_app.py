"""The Flower ``ServerApp`` of fedcl: a ``ContinualStrategy`` driven by ``fedcl.federation.loop``.

``make_server_app`` binds a config (``run_simulation`` leaves ``run_config`` empty); the module's
``app`` reads the config from the run config, for ``flwr run .`` (any federation size: nodes are
execution slots, not clients).
"""
from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fedcl.federation import loop
from fedcl.federation.run_config import config_from_context, run_dir_from_context
from fedcl.federation.strategy import ContinualStrategy


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


# `flwr run .`: the config comes from the run config (see fedcl.federation.run_config).
app = ServerApp()


@app.main()
def _main_from_run_config(grid: Grid, context: Context) -> None:
    run_dir = run_dir_from_context(context)
    print(f"fedcl: writing results to {run_dir}", flush=True)
    run_server(grid, config_from_context(context), run_dir)
