"""Faults, screening, robust aggregation rules, checkpoints and resume."""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fedcl.aggregation.lora import aggregate_lora
from fedcl.aggregation.rules import Krum, Median, TrimmedMean
from fedcl.cli import run_experiment
from fedcl.client.store import ClientStateStore
from fedcl.config import validate
from fedcl.errors import ConfigError
from fedcl.faults import corrupt, fault_plan
from fedcl.methods.base import role_of, weighted_mean
from fedcl.server.screening import screen


def test_fault_plan_is_seeded_and_gives_each_kind_its_fraction(make_cfg):
    cfg = make_cfg("faults.crash=0.2", "faults.corrupt=0.1", "faults.corrupt_kinds=[nan]")
    sampled = list(range(10))
    plan = fault_plan(cfg, 1, 2, sampled)
    assert sorted(plan.values()) == ["corrupt:nan", "crash", "crash"]
    assert plan == fault_plan(cfg, 1, 2, sampled)
    assert any(fault_plan(cfg, 1, r, sampled) != plan for r in range(3, 8))
    assert fault_plan(make_cfg(), 1, 2, sampled) == {}


@pytest.mark.parametrize("overrides, message", [
    (("faults.dropout=0.1",), "faults.deadline_s"),
    (("faults.crash=0.7", "faults.corrupt=0.5"), "sum to at most 1"),
    (("faults.corrupt_kinds=[nan,bits]",), "corrupt_kinds"),
    (("aggregator=trimmed_mean", "aggregator.trim_fraction=0.7"), "trim_fraction"),
    (("aggregator=krum", "aggregator._target_=fedcl.aggregation.rules.Nope"), "aggregator"),
    (("strategy.max_norm_ratio=0.5",), "max_norm_ratio"),
])
def test_bad_fault_or_robustness_settings_are_rejected(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        validate(make_cfg(*overrides))


def honest_replies(k=4, seed=0):
    rng = np.random.default_rng(seed)
    return [(c, {"w": rng.normal(1.0, 0.05, (3, 4)).astype(np.float32),
                 "b": rng.normal(0.0, 0.05, 3).astype(np.float32)}, 10 + c) for c in range(k)]


@pytest.mark.parametrize("how", ["nan", "inf", "shape", "norm"])
def test_screening_rejects_each_corruption_and_keeps_the_honest(how):
    replies = honest_replies()
    bad = corrupt({k: torch.from_numpy(v) for k, v in replies[1][1].items()}, how)
    replies[1] = (1, {k: v.numpy() for k, v in bad.items()}, 11)
    glob = {"w": np.ones((3, 4), np.float32), "b": np.zeros(3, np.float32)}
    accepted, rejected = screen(replies, glob, max_norm_ratio=10.0)
    assert [c for c, _, _ in accepted] == [0, 2, 3]
    assert [(c, kind) for c, kind, _ in rejected] == [(1, how)]


def test_a_wrong_shape_cannot_outvote_the_global_state():
    honest = honest_replies(2)
    bad = (0, {"w": honest[0][1]["w"].reshape(-1), "b": honest[0][1]["b"]}, 10)  # first, and half the round
    glob = {"w": np.ones((3, 4), np.float32), "b": np.zeros(3, np.float32)}
    accepted, rejected = screen([bad, honest[1]], glob, max_norm_ratio=10.0)
    assert [c for c, _, _ in accepted] == [1] and [(c, k) for c, k, _ in rejected] == [(0, "shape")]


def test_robust_rules_resist_one_byzantine_client_that_passes_screening():
    replies = [(arrays, n) for _, arrays, n in honest_replies(5)]
    replies[2] = ({"w": np.full((3, 4), 4.0, np.float32), "b": np.full(3, 3.0, np.float32)}, 1000)
    plain = weighted_mean(replies)["w"]
    median = weighted_mean(replies, Median())["w"]
    a, b = aggregate_lora([(r["w"], r["b"][:, None]) for r, _ in replies], [n for _, n in replies], "fedit", Median())
    trimmed = weighted_mean(replies, TrimmedMean(0.2))["w"]
    krum = weighted_mean(replies, Krum(byzantine=1))
    assert np.abs(plain - 1).max() > 2  # the liar's count drags FedAvg
    assert np.abs(median - 1).max() < 0.15 and np.abs(trimmed - 1).max() < 0.15
    assert np.abs(a - 1).max() < 0.15 and np.abs(b).max() < 0.15
    # Krum returns one honest client's whole update, unchanged
    assert any(all(np.array_equal(krum[k], r[k]) for k in r) for i, (r, _) in enumerate(replies) if i != 2)


def test_krum_picks_the_update_closest_to_its_neighbours_and_multi_krum_averages():
    updates = [{"w": np.array([x, 0.0])} for x in (0.0, 0.1, 0.2, 0.3, 50.0)]
    assert Krum(byzantine=1).combine(updates, [1] * 5)["w"].tolist() == [0.1, 0.0] or \
        Krum(byzantine=1).combine(updates, [1] * 5)["w"].tolist() == [0.2, 0.0]
    multi = Krum(byzantine=1, multi=3).combine(updates, [1] * 5)["w"]
    assert abs(multi[0] - 0.2) < 0.11  # three honest updates averaged, the outlier never in


def test_corrupt_duallora_updates_never_change_the_global_adapters(make_cfg):
    from fedcl.client.app import client_round
    from fedcl.experiment import get_experiment

    cfg = make_cfg("method=duallora", "num_clients=3", "num_tasks=2", "model.depth=1", "model.embed_dim=16")
    exp = get_experiment(cfg)
    method = exp.method
    model = exp.new_model()
    glob = method.init_global(model)
    payload = method.payload(model, client_round(cfg, 0, 1, 0, "train"))
    torch.manual_seed(0)
    honest = [(c, {k: (v + 0.01 * torch.randn_like(v)).numpy() for k, v in payload.items()}, 20) for c in range(3)]
    bad = [(3 + i, {k: v.numpy() for k, v in corrupt(payload, how).items()}, 20)
           for i, how in enumerate(["nan", "inf", "shape", "norm"])]
    accepted, rejected = screen(honest + bad, glob, 10.0, functools.partial(role_of, method))
    assert [c for c, _, _ in accepted] == [0, 1, 2] and [c for c, _, _ in rejected] == [3, 4, 5, 6]
    clean = method.aggregate(glob, [(a, n) for _, a, n in honest], 1, "train")
    screened = method.aggregate(glob, [(a, n) for _, a, n in accepted], 1, "train")
    adapters = [k for k in clean if ".orth_" in k or ".res_" in k or k.startswith("head.")]
    assert adapters and all(np.array_equal(clean[k], screened[k]) for k in adapters)
    assert screen(bad, glob, 10.0, functools.partial(role_of, method))[0] == []  # nothing to aggregate


def test_client_store_rolls_back_a_round_that_did_not_complete(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save(7, {"v": 3}, round=3)
    store.save(7, {"v": 5}, round=5)        # the server was killed before it checkpointed round 5
    assert store.load(7, before_round=5) == {"v": 3}
    store.save(7, {"v": 55}, round=5)       # round 5 runs again after the resume
    assert store.load(7, before_round=5) == {"v": 3}
    assert store.load(7, before_round=6) == {"v": 55}
    assert store.load(8, before_round=6) == {}


FAULTY = ("dataset=digits", "method=replay", "method.memory_total=400", "num_clients=10",
          "num_tasks=5", "rounds_per_task=5", "local_epochs=2", "ray.num_cpus=2", "progress=false")


def test_run_with_crashes_and_nan_updates_completes_close_to_the_clean_run(tmp_path, make_cfg):
    clean = run_experiment(make_cfg(*FAULTY), str(tmp_path / "clean"))
    faulty = run_experiment(make_cfg(*FAULTY, "faults.crash=0.2", "faults.corrupt=0.1",
                                     "faults.corrupt_kinds=[nan]"), str(tmp_path / "faulty"))
    rounds = len(faulty["communication"]["per_round"])
    assert rounds == 25
    kinds = [f["kind"] for f in faulty["failures"]]
    assert kinds.count("crash") == 2 * rounds and kinds.count("nan") == rounds
    assert all(f["reason"] for f in faulty["failures"])
    assert "crash" in (tmp_path / "faulty" / "metrics.csv").read_text()
    assert clean["failures"] == []
    assert abs(faulty["final_average_accuracy"] - clean["final_average_accuracy"]) < 0.05


def test_dropped_and_straggling_clients_miss_the_deadline_and_the_run_goes_on(tmp_path, make_cfg):
    cfg = make_cfg("dataset=digits", "method=finetune", "num_clients=3", "num_tasks=2", "rounds_per_task=1",
                   "local_epochs=1", "ray.num_cpus=2", "progress=false", "faults.dropout=0.34",
                   "faults.straggle=0.34", "faults.deadline_s=30", "faults.late_by_s=1")
    results = run_experiment(cfg, str(tmp_path))
    failures = results["failures"]
    assert [f["kind"] for f in failures] == ["timeout"] * 4
    assert sum("dropped out" in f["reason"] for f in failures) == 2
    assert sum("arrived after" in f["reason"] for f in failures) == 2  # the stragglers' replies came late
    assert [r["clients_ok"] for r in results["communication"]["per_round"]] == [1, 1]
    assert results["wall_time_s"] < 300  # late clients hold no Ray worker for the deadline


def fedcl(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fedcl.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


RESUMABLE = ("dataset=digits", "method=replay", "method.memory_total=60", "num_clients=3",
             "num_tasks=2", "rounds_per_task=4", "local_epochs=2", "fraction_train=0.67",
             "faults.crash=0.34", "ray.num_cpus=2", "progress=false")


def test_run_killed_mid_task_and_resumed_matches_the_uninterrupted_run(tmp_path, make_cfg):
    run = tmp_path / "run"
    proc = fedcl(*RESUMABLE, f"hydra.run.dir={run}")
    metrics = run / "metrics.csv"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().strip().splitlines()) >= 6:  # task 1, round 1
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "results.json").exists()
    resumed = fedcl(f"resume={run}", f"hydra.run.dir={tmp_path / 'resume_log'}")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    after = json.loads((run / "results.json").read_text())
    whole = run_experiment(make_cfg(*RESUMABLE), str(tmp_path / "whole"))
    assert after["accuracy_matrix"] == whole["accuracy_matrix"]
    assert after["failures"] == whole["failures"]
    assert len(after["communication"]["per_round"]) == 8
