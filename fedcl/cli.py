"""The ``fedcl`` command: a Hydra app that validates the config, runs the federated simulation
and prints a summary. Bad input exits with status 2 and a one-paragraph message, no traceback."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedcl.errors import ConfigError, RuntimeLost


def run_experiment(cfg: DictConfig, run_dir: str, resume: bool = False) -> dict:
    """Validate, simulate, and return results.json's content (with end-to-end wall time).
    ``resume=True`` continues the killed run in ``run_dir`` from its last checkpointed round."""
    from fedcl import config, report
    from fedcl.data.datasets import load_dataset
    from fedcl.experiment import get_experiment
    from fedcl.runtime.simulation import SimulationProcess, simulate

    started = time.monotonic()
    config.validate(cfg)
    process = SimulationProcess()  # it boots while the config is checked against the data
    try:
        # the data alone first (a missing folder fails before Ray starts): the scenario's partition
        # costs time per client, so the client count is checked against the data before it
        data = load_dataset(cfg.dataset, int(cfg.seed))
        config.validate_against_data(cfg, data.num_classes, len(data.y_train))
        get_experiment(cfg).new_model()  # a model the method cannot adapt is a ConfigError here, not in a Ray worker
    except BaseException:
        process.cancel()
        raise
    path = Path(run_dir) / "results.json"
    simulate(cfg, run_dir, resume, process)
    if not path.exists():
        raise RuntimeError(f"the simulation ended without writing {path}; see the log above")
    results = json.loads(path.read_text())
    # end to end; a resumed run also counts the time its first process had spent
    results["wall_time_s"] = max(results["wall_time_s"], time.monotonic() - started)
    report.write_json(path, results)
    return results


def resumed_config(run_dir: str) -> DictConfig:
    """``fedcl resume=<run dir>``: the config that run was started with (other overrides are
    ignored: a resumed run must be the same run)."""
    from fedcl.server.checkpoint import load_config

    if not Path(run_dir).is_dir():
        raise ConfigError(f"resume={run_dir}: no such directory. Give the run directory of the run "
                          "to continue (it holds metrics.csv and checkpoint/).")
    return load_config(run_dir)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fedcl import report

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        resume = bool(cfg.get("resume"))
        if resume:
            run_dir = str(cfg.resume)
            cfg = resumed_config(run_dir)
            print(f"fedcl: resuming {run_dir} with the config it was started with", flush=True)
        results = run_experiment(cfg, run_dir, resume=resume)
    except ConfigError as err:
        print(f"fedcl: configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    except RuntimeLost as err:  # runtime faults: Ray died under the run; the checkpoint is intact
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"fedcl: runtime lost: {err}", file=sys.stderr)
        sys.exit(3)
    print(report.format_summary_table(results))
    print(f"results: {run_dir}/results.json")


if __name__ == "__main__":
    main()
