import numpy as np
import pytest

from fedcl.methods.base import weighted_mean


def test_weighted_mean_is_fedavg():
    a = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(2, np.int64)}
    b = {"w": np.array([3.0, 6.0], np.float32), "n": np.array(4, np.int64)}
    out = weighted_mean([(a, 1), (b, 3)])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32 and out["n"].dtype == np.int64 and int(out["n"]) == 4


def test_reservoir_keeps_a_uniform_sample_within_capacity():
    from fedcl.methods.replay import reservoir

    rng = np.random.default_rng(0)
    held, seen = reservoir(np.empty(0, np.int64), 0, np.arange(5), 10, rng)
    assert held.tolist() == [0, 1, 2, 3, 4] and seen == 5             # below capacity: everything
    counts = np.zeros(100)
    for trial in range(2000):
        held, seen = reservoir(np.empty(0, np.int64), 0, np.arange(100), 10, np.random.default_rng(trial))
        assert len(held) == 10 and len(set(held.tolist())) == 10 and seen == 100
        counts[held] += 1
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()  # each item ~10% of the time


def test_replay_memory_is_a_fixed_share_of_the_federation_budget(make_cfg):
    from fedcl.client.app import client_round
    from fedcl.experiment import get_experiment

    cfg = make_cfg("method=replay", "method.memory_total=40", "num_clients=2", "num_tasks=5", "partition=iid")
    exp = get_experiment(cfg)
    state, sizes = {}, []
    for task in range(1, 5):
        memory = exp.method.memory(client_round(cfg, 0, task, 0), state)
        sizes.append(len(memory))
        old = set(np.concatenate([exp.scenario.client_indices[t][0] for t in range(task)]).tolist())
        assert set(memory.tolist()) <= old                       # only this client's rows of earlier tasks
    assert sizes == [20, 20, 20, 20]
    tasks = exp.scenario.task_of_label(exp.scenario.y_train[memory])
    assert len(set(tasks.tolist())) == 4                          # the reservoir spans every old task


def test_every_er_batch_pairs_new_rows_with_as_many_memory_rows(make_cfg):
    from fedcl.client.app import client_round
    from fedcl.methods.base import local_batches

    cfg = make_cfg("method=replay", "num_clients=2", "num_tasks=5", "batch_size=8", "local_epochs=2")
    ctx = client_round(cfg, 0, 2, 0)
    rows, memory = np.arange(100, 120), np.arange(0, 50)
    seen_rows = []
    ctx.labels = lambda batch: batch  # rows as labels: the test sees which rows each batch holds
    for _, batch in local_batches(rows, ctx, memory):
        batch = np.asarray(batch)
        new, old = batch[batch >= 100], batch[batch < 100]
        assert len(new) == len(old) and len(set(old.tolist())) == len(old)  # drawn without replacement
        seen_rows += new.tolist()
    assert sorted(seen_rows) == sorted(rows.tolist() * 2)       # every new row once per epoch


def test_icarl_distils_old_logits_only_after_the_first_task(make_cfg):
    import torch

    from fedcl.client.app import client_round
    from fedcl.experiment import get_experiment

    cfg = make_cfg("method=icarl", "num_clients=2", "num_tasks=5")
    exp = get_experiment(cfg)
    model, state = exp.new_model(), {}
    x = exp.test_images(np.arange(8))
    ctx0 = client_round(cfg, 0, 0, 0)
    exp.method.begin_round(model, ctx0, state)
    assert exp.method.extra_loss(model, x, model(x), ctx0, state) is None
    ctx1 = client_round(cfg, 0, 1, 0)
    exp.method.begin_round(model, ctx1, state)
    logits = model(x)
    assert float(exp.method.extra_loss(model, x, logits[:, :4], ctx1, state)) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.head.bias[0] += 1.0                                  # the student moves on an old class
    assert float(exp.method.extra_loss(model, x, model(x)[:, :4], ctx1, state)) > 1e-3
