"""`flwr run .` from the repository runs the same apps (config composed from the run config)."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

FLWR = shutil.which("flwr") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "flwr")


@pytest.mark.skipif(os.environ.get("FEDCL_TEST_FLWR_RUN") != "1" or not Path(FLWR).exists(),
                    reason="opt-in (FEDCL_TEST_FLWR_RUN=1): `flwr run` builds the app's own environment "
                           "with uv first, which takes minutes")
def test_flwr_run_from_the_repository(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{Path(FLWR).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run_dir = tmp_path / "run"
    overrides = "num_tasks=2 rounds_per_task=1 local_epochs=1 method=finetune"
    try:
        proc = subprocess.run([FLWR, "run", str(repo), "--run-config",
                               f'overrides="{overrides}" run-dir="{run_dir}"'],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        deadline = time.monotonic() + 400  # the first run builds the app's environment
        while not (run_dir / "results.json").exists():
            assert time.monotonic() < deadline, "flwr run did not finish in time"
            time.sleep(2)
        time.sleep(0.5)
        results = json.loads((run_dir / "results.json").read_text())
        assert len(results["accuracy_matrix"]) == 2
        assert results["config"]["method"]["name"] == "finetune"
        assert results["num_clients"] == 10
    finally:
        stop_superlinks_under(tmp_path / "flwr")


def stop_superlinks_under(flwr_home: Path) -> None:
    """`flwr run` leaves its local SuperLink running: stop the ones that use our FLWR_HOME."""
    out = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True, text=True)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
