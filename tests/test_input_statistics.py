"""Bases from x^T x summed as batches stream past equal the bases of all raw inputs at once."""
import numpy as np
import pytest
import torch

from fedcl import subspace
from fedcl.subspace import InputStatistics, client_basis


def _streamed(x: torch.Tensor, batch: int, **kw) -> InputStatistics:
    stats = InputStatistics(**kw)
    for i in range(0, len(x), batch):
        stats.append(x[i:i + batch])
    return stats


@pytest.mark.parametrize("threshold", [0.9, 0.999, 1.0])
def test_streamed_gram_basis_equals_raw_basis(threshold):
    rng = np.random.default_rng(0)
    # token-level inputs (N x tokens x d) with a decaying spectrum: rows are every (image, token)
    x = torch.from_numpy((rng.standard_normal((37, 5, 12)) * np.geomspace(3, 0.01, 12)).astype(np.float32))
    raw = x.reshape(-1, 12).double().numpy()
    old_u, old_s = client_basis(raw, threshold)
    stats = _streamed(x, batch=8)
    u, s = stats.basis(threshold)
    assert u.shape == old_u.shape and stats.rows == 37 * 5
    np.testing.assert_allclose(s, old_s, rtol=1e-9)
    np.testing.assert_allclose(u @ u.T, old_u @ old_u.T, atol=1e-9)  # same subspace (signs may differ)
    np.testing.assert_allclose(stats.covariance(), raw.T @ raw, rtol=1e-12)

    protected = np.linalg.qr(rng.standard_normal((12, 3)))[0]  # orthogonal to an old basis too
    old_u, old_s = _significant(*client_basis(raw, threshold, protected))
    u, s = _significant(*stats.basis(threshold, protected))
    np.testing.assert_allclose(s, old_s, rtol=1e-8)
    np.testing.assert_allclose(u @ u.T, old_u @ old_u.T, atol=1e-8)


def _significant(u, s):
    """Without rounding-noise directions (inside the old basis' span), which a threshold of 1.0
    may keep from either decomposition."""
    keep = s > 1e-9 * s[0]
    return u[:, keep], s[keep]


def test_wide_inputs_keep_a_bounded_sketch(monkeypatch):
    """Inputs wider than a d x d sum allows: a Frequent Directions sketch of at most 2 x sketch_rows
    rows, exact for data of lower rank than the sketch."""
    monkeypatch.setattr(subspace, "GRAM_MAX_WIDTH", 16)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((300, 5)) @ rng.standard_normal((5, 40)))
    stats = _streamed(x, batch=64, sketch_rows=8)
    assert stats.gram is None and len(stats.sketch) <= 16
    u, s = stats.basis(0.999)
    old_u, old_s = client_basis(x.numpy(), 0.999)
    np.testing.assert_allclose(u @ u.T, old_u @ old_u.T, atol=1e-8)
    np.testing.assert_allclose(s, old_s, rtol=1e-8)
    with pytest.raises(ValueError, match="basis_aggregation=svd"):
        stats.covariance()
