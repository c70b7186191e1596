import math

import pytest

from fedcl.metrics import summarize

# after task 0: [0.9]; after task 1: [0.6, 0.8]; after task 2: [0.5, 0.7, 0.9]
M = [[0.9, None, None], [0.6, 0.8, None], [0.5, 0.7, 0.9]]


def test_hand_checked_3x3():
    s = summarize(M)
    assert s["final_average_accuracy"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)        # 0.7
    # row means: 0.9, 0.7, 0.7 -> 0.7667
    assert s["average_incremental_accuracy"] == pytest.approx((0.9 + 0.7 + 0.7) / 3)
    # task 0: max(0.9, 0.6) - 0.5 = 0.4; task 1: max(0.8) - 0.7 = 0.1 -> 0.25
    assert s["forgetting"] == pytest.approx(0.25)
    # task 0: 0.5 - 0.9 = -0.4; task 1: 0.7 - 0.8 = -0.1 -> -0.25
    assert s["backward_transfer"] == pytest.approx(-0.25)


def test_forgetting_is_max_based_not_last_minus_final():
    # task 0 peaks after task 1 (0.95), then drops: Chaudhry uses the peak
    m = [[0.7, None, None], [0.95, 0.8, None], [0.6, 0.8, 0.9]]
    s = summarize(m)
    assert s["forgetting"] == pytest.approx(((0.95 - 0.6) + (0.8 - 0.8)) / 2)        # 0.175
    assert s["backward_transfer"] == pytest.approx(((0.6 - 0.7) + (0.8 - 0.8)) / 2)  # -0.05


def test_positive_backward_transfer_and_negative_forgetting():
    # task 0 improves after task 1: forgetting 0.4 - 0.6 = -0.2, BWT 0.6 - 0.4 = +0.2
    s = summarize([[0.4, None], [0.6, 1.0]])
    assert s["forgetting"] == pytest.approx(-0.2)
    assert s["backward_transfer"] == pytest.approx(0.2)
    assert s["final_average_accuracy"] == pytest.approx(0.8)
    assert s["average_incremental_accuracy"] == pytest.approx((0.4 + 0.8) / 2)       # 0.6


def test_single_task_has_no_forgetting():
    assert summarize([[0.8]]) == {"final_average_accuracy": 0.8, "average_incremental_accuracy": 0.8,
                                  "forgetting": 0.0, "backward_transfer": 0.0}


def test_partial_matrix_uses_last_row():
    # two of three rows: final row [0.6, 0.8] -> 0.7; row means 0.9, 0.7 -> 0.8
    s = summarize(M[:2])
    assert s["final_average_accuracy"] == pytest.approx(0.7)
    assert s["average_incremental_accuracy"] == pytest.approx(0.8)
    assert s["forgetting"] == pytest.approx(0.9 - 0.6)                                 # 0.3
    assert s["backward_transfer"] == pytest.approx(0.6 - 0.9)                          # -0.3


def test_rows_may_be_ragged_and_accept_numpy_like_numbers():
    import numpy as np
    s = summarize([[np.float32(0.5)], [np.float64(0.25), 0.75]])
    assert s["final_average_accuracy"] == pytest.approx(0.5)
    assert all(type(v) is float for v in s.values())


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    ([[None]], "row 0"),
    ([[0.5, None], [0.5]], "row 1"),
    ([[0.5], [0.5, None]], "row 1"),
    ([[1.5]], "outside"),
    ([[-0.1]], "outside"),
    ([[math.nan]], "outside"),
    ([["a"]], "non-numeric"),
    ([[[0.5]]], "non-numeric"),
])
def test_invalid_matrices_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        summarize(bad)
