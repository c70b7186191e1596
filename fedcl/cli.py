"""The ``fedcl`` command: a Hydra app that validates the config, runs the federated simulation
and prints a summary. Bad input exits with status 2 and a one-paragraph message, no traceback."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedcl.errors import ConfigError


def run_experiment(cfg: DictConfig, run_dir: str) -> dict:
    """Validate, simulate, and return results.json's content (with end-to-end wall time)."""
    from fedcl import config, report
    from fedcl.experiment import get_experiment
    from fedcl.federation.simulation import simulate

    started = time.monotonic()
    config.validate(cfg)
    exp = get_experiment(cfg)  # loads data now: a missing folder fails before Ray starts
    config.validate_against_data(cfg, exp.data.num_classes)
    path = Path(run_dir) / "results.json"
    simulate(cfg, run_dir)
    if not path.exists():
        raise RuntimeError(f"the simulation ended without writing {path}; see the log above")
    results = json.loads(path.read_text())
    results["wall_time_s"] = time.monotonic() - started
    report.write_json(path, results)
    return results


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fedcl import report

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        results = run_experiment(cfg, run_dir)
    except ConfigError as err:
        print(f"fedcl: configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    print(report.format_summary_table(results))
    print(f"results: {run_dir}/results.json")


if __name__ == "__main__":
    main()
