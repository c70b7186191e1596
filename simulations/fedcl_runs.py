"""Running `fedcl` from the experiment scripts: one subprocess (and one Ray session) per run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_fedcl(overrides: list[str], run_dir: Path, quiet: bool = True, reuse: bool = False) -> dict:
    """Run `fedcl` with these Hydra overrides into ``run_dir`` and return its results.json;
    ``quiet`` hides the run's progress and summary, ``reuse`` keeps a run that already finished."""
    if not (reuse and (run_dir / "results.json").exists()):
        cmd = [sys.executable, "-m", "fedcl.cli", *overrides, f"hydra.run.dir={run_dir}",
               *(["progress=false"] if quiet else [])]
        print("$ fedcl " + " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None)
    return json.loads((run_dir / "results.json").read_text())
