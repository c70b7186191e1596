import numpy as np

from fedcl.methods.base import weighted_mean


def test_weighted_mean_is_fedavg():
    a = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(2, np.int64)}
    b = {"w": np.array([3.0, 6.0], np.float32), "n": np.array(4, np.int64)}
    out = weighted_mean([(a, 1), (b, 3)])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32 and out["n"].dtype == np.int64 and int(out["n"]) == 4


def test_replay_with_a_fixed_total_budget_never_holds_more_than_its_share(make_cfg):
    from fedcl.experiment import get_experiment
    from fedcl.federation.client_app import client_round

    cfg = make_cfg("method=replay", "method.memory_total=40", "num_clients=2", "num_tasks=5", "partition=iid")
    method = get_experiment(cfg).method
    state = {}
    sizes = []
    for task in range(1, 5):
        ctx = client_round(cfg, 0, task, 0)
        rows = method.training_rows(ctx, state)
        sizes.append(len(rows) - len(ctx.task_rows(task)))
    assert all(s <= 40 // 2 for s in sizes) and sizes[0] == 20 and sizes[-1] == 20 // 8 * 8
