import numpy as np
import pytest

from fedcl.aggregation.subspace import client_basis, merge_covariance, merge_svd, project_out


def low_rank_features(rng, n, d, directions, noise=0.01):
    coeffs = rng.normal(size=(n, directions.shape[1])) * 3
    return coeffs @ directions.T + noise * rng.normal(size=(n, d))


def orthonormal(rng, d, k):
    return np.linalg.qr(rng.normal(size=(d, k)))[0]


def test_client_basis_finds_the_subspace_and_respects_the_old_basis():
    rng = np.random.default_rng(0)
    d, dirs = 20, orthonormal(rng, 20, 5)
    feats = low_rank_features(rng, 200, d, dirs)
    u, s = client_basis(feats, 0.99)
    assert u.shape == (d, 5)
    np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-10)
    assert np.linalg.norm(project_out(dirs, u)) < 0.05  # spans the true directions
    old = dirs[:, :2]
    new, _ = client_basis(feats, 0.99, old)
    assert new.shape[1] == 3 and np.abs(old.T @ new).max() < 1e-10


@pytest.mark.parametrize("scheme", ["svd", "covariance"])
def test_merged_basis_is_orthonormal_spans_clients_and_avoids_old(scheme):
    rng = np.random.default_rng(1)
    d = 24
    old = orthonormal(rng, d, 3)
    shared = project_out(orthonormal(rng, d, 4), old)
    shared = np.linalg.qr(shared)[0]
    client_dirs = [np.linalg.qr(np.hstack([shared[:, :2], shared[:, 2 + k:3 + k]]))[0] for k in range(2)]
    feats = [low_rank_features(rng, 150, d, cd) for cd in client_dirs]
    if scheme == "svd":
        merged = merge_svd([client_basis(f, 0.99, old) for f in feats], 0.99, old)
    else:
        merged = merge_covariance([f.T @ f for f in feats], 0.99, old)
    np.testing.assert_allclose(merged.T @ merged, np.eye(merged.shape[1]), atol=1e-8)
    assert np.abs(old.T @ merged).max() < 1e-8
    for cd in client_dirs:  # each client's dominant directions lie in the merged span
        assert np.linalg.norm(project_out(cd, merged)) < 0.1
    assert merged.shape[1] <= 6


def test_svd_and_covariance_merges_agree():
    rng = np.random.default_rng(2)
    dirs = orthonormal(rng, 16, 3)
    feats = [low_rank_features(rng, 100, 16, dirs, noise=0.0) for _ in range(3)]
    a = merge_svd([client_basis(f, 1.0) for f in feats], 0.999)
    b = merge_covariance([f.T @ f for f in feats], 0.999)
    np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-6)  # same projector
