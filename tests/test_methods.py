import numpy as np

from fedcl.methods.base import weighted_mean


def test_weighted_mean_is_fedavg():
    a = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(2, np.int64)}
    b = {"w": np.array([3.0, 6.0], np.float32), "n": np.array(4, np.int64)}
    out = weighted_mean([(a, 1), (b, 3)])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32 and out["n"].dtype == np.int64 and int(out["n"]) == 4
