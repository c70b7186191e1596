from types import SimpleNamespace

import numpy as np
import pytest

from fedcl.data.scenario import build_scenario, check_task_split, partition_rows
from fedcl.errors import ConfigError


def labels(n_classes=10, per_class=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(n_classes), per_class))


@pytest.mark.parametrize("part", [SimpleNamespace(name="iid"),
                                  SimpleNamespace(name="dirichlet", alpha=0.5),
                                  SimpleNamespace(name="shards", shards_per_client=2)])
def test_partition_is_a_disjoint_cover(part):
    y = labels()
    rows = np.flatnonzero(y < 4)
    parts = partition_rows(rows, y[rows], 5, part, np.random.default_rng(0))
    assert len(parts) == 5
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == sorted(rows.tolist())  # every row once, nothing else


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_balanced():
    y = labels(10, 200)
    rows = np.arange(len(y))

    def mean_classes_per_client(alpha):
        parts = partition_rows(rows, y, 10, SimpleNamespace(name="dirichlet", alpha=alpha),
                               np.random.default_rng(1))
        return np.mean([np.sum(np.bincount(y[p], minlength=10) > 10) for p in parts])

    assert mean_classes_per_client(0.05) < 4 < mean_classes_per_client(100.0)


def test_shards_give_few_labels_per_client():
    y = labels(10, 100)
    rows = np.arange(len(y))
    parts = partition_rows(rows, y, 10, SimpleNamespace(name="shards", shards_per_client=2),
                           np.random.default_rng(0))
    assert max(len(np.unique(y[p])) for p in parts) <= 4


def test_scenario_tasks_are_disjoint_contiguous_labels_and_seeded():
    ytr, yte = labels(10, 30, 0), labels(10, 10, 1)
    part = SimpleNamespace(name="iid")
    a = build_scenario(ytr, yte, 10, 5, 3, part, seed=4)
    b = build_scenario(ytr, yte, 10, 5, 3, part, seed=4)
    c = build_scenario(ytr, yte, 10, 5, 3, part, seed=5)
    assert np.array_equal(a.class_order, b.class_order)
    assert not np.array_equal(a.class_order, c.class_order)
    for t in range(5):
        task_labels = np.unique(np.concatenate([a.y_train[r] for r in a.client_indices[t]]))
        assert task_labels.tolist() == [2 * t, 2 * t + 1]
        assert set(np.unique(a.y_test[a.test_indices[t]])) == {2 * t, 2 * t + 1}
        assert all(np.array_equal(x, y) for x, y in zip(a.client_indices[t], b.client_indices[t]))
    # re-indexing follows the class order: new label 0 is original class class_order[0]
    assert np.all(ytr[a.y_train == 0] == a.class_order[0])
    assert a.seen_classes(2) == 6 and a.task_starts == [0, 2, 4, 6, 8, 10]


@pytest.mark.parametrize("tasks", [0, 3, 11])
def test_bad_task_split_names_the_allowed_counts(tasks):
    with pytest.raises(ConfigError, match=r"num_tasks=.*\[1, 2, 5, 10\]"):
        check_task_split(10, tasks)


def test_base_session_can_hold_more_classes():
    ytr, yte = labels(10, 30, 0), labels(10, 10, 1)
    s = build_scenario(ytr, yte, 10, 3, 2, SimpleNamespace(name="iid"), seed=0, base_classes=6)
    assert s.task_starts == [0, 6, 8, 10]
    assert set(np.unique(s.y_test[s.test_indices[0]])) == set(range(6))
    assert s.task_of_label(np.array([0, 5, 6, 9])).tolist() == [0, 0, 1, 2]
    with pytest.raises(ConfigError, match=r"base_classes=6 with num_tasks=4.*\[2, 3, 5\]"):
        build_scenario(ytr, yte, 10, 4, 2, SimpleNamespace(name="iid"), seed=0, base_classes=6)
