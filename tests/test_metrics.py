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
    assert s["forgetting"] == pytest.approx(((0.95 - 0.6) + (0.8 - 0.8)) / 2)
    assert s["backward_transfer"] == pytest.approx(((0.6 - 0.7) + (0.8 - 0.8)) / 2)


def test_single_task_has_no_forgetting():
    assert summarize([[0.8]]) == {"final_average_accuracy": 0.8, "average_incremental_accuracy": 0.8,
                                  "forgetting": 0.0, "backward_transfer": 0.0}


def test_partial_matrix_uses_last_row():
    s = summarize(M[:2])
    assert s["final_average_accuracy"] == pytest.approx(0.7)
    assert s["forgetting"] == pytest.approx(0.3)


@pytest.mark.parametrize("bad", [[], [[None]], [[0.5, None], [0.5]], [[1.5]]])
def test_invalid_matrices_raise(bad):
    with pytest.raises(ValueError):
        summarize(bad)
