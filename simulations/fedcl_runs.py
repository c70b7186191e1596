"""Running `fedcl` from the experiment scripts: one subprocess (and one Ray session) per run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUNTIME_LOST = 3  # fedcl's exit status when the Ray runtime under a run failed; its checkpoint is intact


def run_fedcl(overrides: list[str], run_dir: Path, quiet: bool = True, reuse: bool = False, retries: int = 2) -> dict:
    """Run `fedcl` with these Hydra overrides into ``run_dir`` and return its results.json;
    ``quiet`` hides the run's progress and summary, ``reuse`` keeps a run that already finished and
    resumes one that was interrupted (a checkpoint but no results.json). A run whose Ray runtime was
    lost is resumed from its checkpoint up to ``retries`` times."""
    results = run_dir / "results.json"
    if reuse and results.exists():
        return json.loads(results.read_text())
    resume = reuse and (run_dir / "checkpoint").is_dir()
    for attempt in range(retries + 1):
        args = [f"resume={run_dir}"] if resume else [*overrides, f"hydra.run.dir={run_dir}"]
        cmd = [sys.executable, "-m", "fedcl.cli", *args, *(["progress=false"] if quiet else [])]
        print("$ fedcl " + " ".join(cmd[3:]), flush=True)
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None)
        if done.returncode == 0:
            return json.loads(results.read_text())
        if done.returncode != RUNTIME_LOST or attempt == retries:
            raise subprocess.CalledProcessError(done.returncode, cmd)
        resume = True
    raise AssertionError("unreachable")
