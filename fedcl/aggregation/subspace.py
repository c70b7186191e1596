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

Clients never hold all their representations at once: ``InputStatistics`` sums F^T F as batches
stream past (d x d, whatever the data's size), and the basis comes from its eigendecomposition
(eigenvalues are the squared singular values of F: the same subspace as the SVD of F). Inputs too
wide for a d x d matrix (a 224 px image as a task key: d = 150,528) keep a Frequent Directions
sketch of a few rows instead (Liberty, KDD 2013), an approximation with a bounded error.
"""
from __future__ import annotations

import numpy as np
import torch

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


def basis_from_gram(C: np.ndarray, threshold: float, old: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``basis_from_matrix`` of any R with R R^T = C (d x d), without R: the eigenvectors of C minus
    its part in ``old``, and the square roots of their eigenvalues as singular values."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"basis energy threshold={threshold} must be in (0, 1]")
    C = np.asarray(C, dtype=np.float64)
    total = float(np.trace(C))
    if old is not None and old.shape[1]:
        P = np.eye(len(C)) - old @ old.T
        C = P @ C @ P
    already = total - float(np.trace(C))
    vals, vecs = np.linalg.eigh((C + C.T) / 2)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
    m = _keep(vals, already, total, threshold)
    return vecs[:, :m], np.sqrt(vals[:m])


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
    return basis_from_gram(C, threshold, old)[0]


GRAM_MAX_WIDTH = 8192  # widest input summed as F^T F (512 MB in float64); wider ones are sketched


class InputStatistics:
    """What a basis needs of the rows (n x d) that stream past a layer, in memory independent of
    their number: F^T F in float64, or for d > ``GRAM_MAX_WIDTH`` a Frequent Directions sketch of
    ``sketch_rows`` rows (B^T B approximates F^T F from below, off by at most
    ||F - F_k||_F^2 / (sketch_rows - k) in spectral norm for any k < sketch_rows)."""

    def __init__(self, sketch_rows: int = 64):
        self.sketch_rows = int(sketch_rows)
        self.gram: torch.Tensor | None = None     # d x d
        self.sketch: torch.Tensor | None = None   # up to 2 * sketch_rows rows of width d
        self.energy = 0.0                          # squared Frobenius norm of every row seen
        self.rows = 0

    def append(self, x: torch.Tensor) -> None:
        """Add rows (n x d, or (..., d): every leading index is a row, as tokens are)."""
        x = x.detach().reshape(-1, x.shape[-1])
        self.rows += len(x)
        if x.shape[1] <= GRAM_MAX_WIDTH:
            x = x.double()
            self.gram = x.T @ x if self.gram is None else self.gram.addmm_(x.T, x)
            return
        for i in range(0, len(x), self.sketch_rows):  # the buffer never exceeds 2 * sketch_rows rows
            part = x[i:i + self.sketch_rows].double()  # a few wide rows in float64 at a time
            self.energy += float(part.pow(2).sum())
            self.sketch = part.clone() if self.sketch is None else torch.cat([self.sketch, part])
            if len(self.sketch) >= 2 * self.sketch_rows:
                self._shrink()

    def _shrink(self) -> None:
        """Keep the sketch's top ``sketch_rows`` directions, each shrunk by the next one's energy.
        Through the small (r x r) Gram: the wide side is never decomposed."""
        B = self.sketch
        vals, vecs = torch.linalg.eigh(B @ B.T)  # B B^T = W diag(s^2) W^T; right vectors: B^T W / s
        vals, vecs = vals.flip(0).clamp_min(0.0), vecs.flip(1)
        k = min(self.sketch_rows, len(vals))
        cut = vals[k] if k < len(vals) else vals.new_zeros(())
        keep = vals[:k] > cut
        v, s2 = vecs[:, :k][:, keep], vals[:k][keep]
        rows = (v.T @ B) / s2.sqrt()[:, None]      # orthonormal right singular vectors
        self.sketch = rows * (s2 - cut).sqrt()[:, None]

    def basis(self, threshold: float, old: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Orthonormal directions (d x m) and singular values, as ``client_basis`` of the rows."""
        if self.gram is not None:
            return basis_from_gram(self.gram.cpu().numpy(), threshold, old)
        if self.sketch is None:
            raise ValueError("no rows were added")
        if len(self.sketch) > self.sketch_rows:
            self._shrink()
        u, s = basis_from_matrix(self.sketch.T.cpu().numpy(), 1.0, old)
        # the threshold counts every row's energy, not the sketch's shrunken part of it
        m = _keep(s ** 2, 0.0, self.energy, threshold) if old is None or not old.shape[1] else len(s)
        return u[:, :m], s[:m]

    def covariance(self) -> np.ndarray:
        """F^T F (d x d); only for inputs narrow enough to sum it."""
        if self.gram is None:
            raise ValueError(f"inputs wider than {GRAM_MAX_WIDTH} have no covariance here: use "
                             "strategy.basis_aggregation=svd")
        return self.gram.cpu().numpy()
