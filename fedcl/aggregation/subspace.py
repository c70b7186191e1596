"""Feature-subspace bases per adapted layer (GPM style) and their server-side merge.

A task's basis for a layer is the span of the layer's input representations on the task's data:
SVD of the (d x N) representation matrix, kept up to an energy threshold, orthogonal to the bases
of earlier tasks (Saha et al., GPM, ICLR 2021). What stays outside all old bases is where a new
update cannot interfere with old tasks.

Server merges (``strategy.basis_aggregation``):
- ``svd``: each client sends its basis scaled by its singular values, U_k diag(s_k). Stacking them
  gives M with M M^T ~ sum_k F_k^T F_k, so clients count by their data; SVD of M minus its part in
  the old global basis, kept to the threshold.
- ``covariance``: each client sends F_k^T F_k (d x d). The server needs only their sum, so it works
  under secure aggregation; its eigenvectors are exact for the union of the clients' data.
"""
from __future__ import annotations

import numpy as np

BASIS_AGGREGATIONS = ("svd", "covariance")


def _keep(energies: np.ndarray, already: float, total: float, threshold: float) -> int:
    """Fewest leading directions so that (already + their energy) >= threshold * total."""
    if total <= 0:
        return 0
    if already >= threshold * total:
        return 0
    cumulative = already + np.cumsum(energies)
    return int(min(len(energies), np.searchsorted(cumulative, threshold * total - 1e-12) + 1))


def project_out(matrix: np.ndarray, basis: np.ndarray | None) -> np.ndarray:
    """The part of ``matrix`` (d x n) orthogonal to the columns of ``basis`` (d x k)."""
    if basis is None or basis.shape[1] == 0:
        return matrix
    return matrix - basis @ (basis.T @ matrix)


def basis_from_matrix(R: np.ndarray, threshold: float, old: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """New orthonormal directions (d x m) and their singular values for R (d x n), orthogonal to ``old``.

    Kept until the old basis plus the new directions hold ``threshold`` of R's energy.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"basis energy threshold={threshold} must be in (0, 1]")
    R = np.asarray(R, dtype=np.float64)
    total = float((R ** 2).sum())
    residual = project_out(R, old)
    already = total - float((residual ** 2).sum())
    u, s, _ = np.linalg.svd(residual, full_matrices=False)
    m = _keep(s ** 2, already, total, threshold)
    return u[:, :m], s[:m]


def client_basis(features: np.ndarray, threshold: float,
                 old: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Basis of a client's representations ``features`` (N x d) for one layer."""
    return basis_from_matrix(np.asarray(features).T, threshold, old)


def merge_svd(bases: list[tuple[np.ndarray, np.ndarray]], threshold: float,
              old: np.ndarray | None = None) -> np.ndarray:
    """Merge clients' (U_k, s_k) into one orthonormal basis orthogonal to ``old``."""
    parts = [u * s[None, :] for u, s in bases if u.shape[1]]
    if not parts:
        return np.zeros((bases[0][0].shape[0], 0))
    return basis_from_matrix(np.concatenate(parts, axis=1), threshold, old)[0]


def merge_covariance(covariances: list[np.ndarray], threshold: float,
                     old: np.ndarray | None = None) -> np.ndarray:
    """Merge summed covariances F^T F into a basis orthogonal to ``old`` (sums only)."""
    C = np.sum([np.asarray(c, dtype=np.float64) for c in covariances], axis=0)
    total = float(np.trace(C))
    P = np.eye(len(C)) - (old @ old.T if old is not None and old.shape[1] else 0.0)
    Cr = P @ C @ P
    already = total - float(np.trace(Cr))
    vals, vecs = np.linalg.eigh(Cr)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
    m = _keep(vals, already, total, threshold)
    return vecs[:, :m]
