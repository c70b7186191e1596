"""The papers' protocols as presets (conf/experiment/): they compose with the values they claim,
each runs a real round on the CPU at its image size, and the paper-scale scripts work."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedcl.cli import run_experiment

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "simulations"))

FEDERATED = {"num_tasks": 10, "num_clients": 10, "partition.name": "dirichlet", "partition.alpha": 0.5,
             "fraction_train": 1.0, "ray.client_gpus": 0.25, "precision": "auto", "scenario.base_classes": None}
VIT = {**FEDERATED, "method.name": "duallora", "model.name": "timm", "model.arch": "vit_base_patch16_224",
       "model.pretrained": True, "dataset.image_size": 224, "optimizer": "adam", "lr": 0.0005, "batch_size": 128,
       "method.rank": 10, "method.task_key": "features"}
RESNET = {**FEDERATED, "method.name": "dlc", "model.name": "resnet18", "method.base": "replay",
          "optimizer": "sgd", "lr": 0.1, "batch_size": 128, "method.memory_total": 2000}
PRESETS = {
    "duallora_cifar100_vitb16": {**VIT, "dataset.name": "cifar100", "rounds_per_task": 10, "local_epochs": 2},
    "duallora_imagenetr_vitb16": {**VIT, "dataset.name": "imagefolder", "rounds_per_task": 10, "local_epochs": 5},
    "dlc_cifar100_resnet18": {**RESNET, "dataset.name": "cifar100", "model.stem": "cifar"},
    "dlc_imagenet100_resnet18": {**RESNET, "dataset.name": "imagefolder", "model.stem": "imagenet",
                                 "dataset.image_size": 224},
}
CPU = ("ray.client_gpus=0", "ray.client_cpus=1", "ray.num_cpus=2", "progress=false", "dataset.root=null")


def value(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_with_the_values_it_claims(make_cfg, preset):
    cfg = make_cfg(f"+experiment={preset}")
    for key, expected in PRESETS[preset].items():
        assert value(cfg, key) == expected, f"{preset}: {key}"
    # PyCIL's 2,000 exemplars in total, spread over the clients
    if preset.startswith("dlc"):
        assert cfg.method.memory_total == 2000
    # a command-line override still wins over the preset
    assert make_cfg(f"+experiment={preset}", "num_clients=3").num_clients == 3


def test_every_preset_is_documented():
    files = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    assert files == set(PRESETS)
    doc = (ROOT / "docs" / "presets.md").read_text()
    assert all(f"`{name}`" in doc for name in files)


@pytest.fixture(scope="module")
def tiny_vit_checkpoint(tmp_path_factory):
    from paper_scale import random_checkpoint

    return random_checkpoint("vit_tiny_patch16_224", tmp_path_factory.mktemp("weights"))


# duallora_cifar100_vitb16 runs end to end in test_paper_scale_reports_parts_and_the_summary_line
@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"duallora_cifar100_vitb16"}))
def test_preset_runs_a_round_per_task_on_cpu(tmp_path, make_cfg, tiny_vit_checkpoint, preset):
    """Two clients, two tasks of two classes, one round each, at the preset's image size; a ViT
    preset on a random vit_tiny file (pretrained-shaped: no base session)."""
    size = PRESETS[preset].get("dataset.image_size", 32)
    overrides = [f"+experiment={preset}", "dataset=synthetic", "dataset.num_classes=4", "dataset.channels=3",
                 f"dataset.image_size={size}", "dataset.train_per_class=2", "dataset.test_per_class=1",
                 "num_tasks=2", "num_clients=2", f"rounds_per_task={2 if preset.startswith('dlc') else 1}",
                 "local_epochs=1", *CPU]
    if preset.startswith("duallora"):
        overrides += ["model.arch=vit_tiny_patch16_224", "model.pretrained=false",
                      f"model.checkpoint={tiny_vit_checkpoint}"]
    results = run_experiment(make_cfg(*overrides), str(tmp_path))
    matrix = results["accuracy_matrix"]
    assert len(matrix) == 2 and matrix[1][1] is not None
    rounds = results["communication"]["per_round"]
    if preset.startswith("duallora"):  # with weights there is no base session: basis, train, basis per task
        assert [r["phase"] for r in rounds] == ["basis_start", "train", "basis_end"] * 2
        # adapters and bases only: far less than the ViT crosses the wire in any round
        assert max(r["uplink_bytes"] for r in rounds) < results["communication"]["full_model_bytes"]
    else:  # DLC: plugin + weighting unit, then the calibration, beside the base in its two rounds of a task
        assert [r["phase"] for r in rounds] == ["train+plugin+weighting", "train+calibrate"] * 2
        assert all(r["clients_ok"] >= 1 for r in rounds)
    assert results["config"]["dataset"]["image_size"] == size


def test_paper_scale_reports_parts_and_the_summary_line(tmp_path):
    """simulations/paper_scale.py end to end on a small ViT: per-part client timings from the Ray
    workers, server rounds, and the one-line summary with sane numbers."""
    cmd = [sys.executable, str(ROOT / "simulations" / "paper_scale.py"), "--preset", "duallora_cifar100_vitb16",
           "--arch", "vit_tiny_patch16_224", "--tasks", "2", "--out", str(tmp_path), "--infer-batch", "2",
           "--infer-repeats", "1", "dataset.num_classes=4", "ray.num_cpus=2", "progress=false"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"preset=duallora_cifar100_vitb16 state_ratio=(\S+) infer_ratio=(\S+) infer_vs_plain=(\S+) "
                     r"down_up_ratio=(\S+) overhead_fraction=(\S+) wall_s=(\S+)", last)
    assert m, last
    state, infer, vs_plain, down_up, overhead, wall = map(float, m.groups())
    assert state > 1.0            # DualLoRA's bases and task keys sit beside the backbone
    assert infer > 0 and vs_plain > 1.0  # two passes (task confidence, then the weighted model)
    assert down_up > 0 and 0.0 < overhead < 1.0 and wall > 0
    timings = (tmp_path / "timing").glob("worker_*.jsonl")
    records = [line for f in timings for line in f.read_text().splitlines()]
    assert len(records) == 2 * 3 * 2  # 2 clients x 3 phases x 2 tasks, each timed inside a worker
    parts = [set(json.loads(r)) for r in records]  # the client functions were found and wrapped where they live
    assert all({"decode", "build", "load_state", "save_state"} <= p for p in parts), parts[0]
    assert "client-rounds (mean per phase" in proc.stdout and "basis_end" in proc.stdout


def test_gpu_check_dry_run_prints_the_gpu_workload():
    """The GPU script cannot run here; its dry run shows the command it would run."""
    proc = subprocess.run(["bash", str(ROOT / "simulations" / "gpu_check.sh")], check=False, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "GPU_CHECK_DRY_RUN": "1"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "paper_scale.py --preset duallora_cifar100_vitb16" in proc.stdout
    assert "ray.client_gpus=0.25" in proc.stdout and "precision=auto" in proc.stdout
    assert "--one-process" in proc.stdout
