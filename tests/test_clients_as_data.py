"""Many clients cost data, not nodes: a partition of many clients is two arrays (fedcl.data.scenario).
That a message names its logical client is tested in test_strategy.py, with Flower's own loop on
fewer SuperNodes than clients."""
from types import SimpleNamespace

import numpy as np
import pytest

from fedcl.data.scenario import partition_rows


def test_iid_partition_of_many_clients_matches_array_split_and_costs_two_arrays():
    rows = np.arange(0, 300000, 3)
    part = partition_rows(rows, np.zeros(len(rows), np.int64), 40000, SimpleNamespace(name="iid"),
                          np.random.default_rng(5))
    reference = np.array_split(np.random.default_rng(5).permutation(rows), 40000)
    assert len(part) == 40000 and part.sizes().tolist() == [len(r) for r in reference]
    for c in (0, 1, 19999, 39999, -1):
        assert np.array_equal(part[c], np.sort(reference[c]))
    assert part[3].base is not None  # a view of the partition's one array
    with pytest.raises(IndexError):
        part[40000]
