"""Real data, end to end: Split Fashion-MNIST as Debian ships it (skipped where it is not installed)."""
import os

import pytest

from fedcl.cli import run_experiment

FASHION = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.skipif(not os.path.isdir(FASHION), reason="real Fashion-MNIST not installed (apt-get install "
                                "dataset-fashion-mnist; .ci/run installs it where apt is available)")


def test_replay_on_fashion_mnist_keeps_the_old_task(tmp_path, make_cfg):
    """Fine-tuning ends an old task at ~0% here (class-incremental, 5 new classes take over); ER keeps it."""
    cfg = make_cfg("dataset=fashion_mnist", f"dataset.root={FASHION}", "dataset.train_per_class=100",
                   "dataset.test_per_class=50", "method=replay", "method.memory_total=300", "num_clients=3",
                   "num_tasks=2", "rounds_per_task=3", "local_epochs=1", "ray.num_cpus=2", "progress=false")
    results = run_experiment(cfg, str(tmp_path))
    m = results["accuracy_matrix"]
    assert m[0][0] > 0.4, m                     # it learns the first task (5 classes; measured 0.50)
    assert m[1][0] > 0.25 and m[1][1] > 0.5, m  # and keeps it (measured 0.40; fine-tuning: 0.00)
