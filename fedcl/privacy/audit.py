"""Membership-inference audits: privacy loss measured, not only promised.

Per client, the attacker holds what the server saw from that client: its last uploaded update
(the final global model with the client's last reply loaded over it). Members are the client's
training rows of the task that update was trained on; non-members are the test rows of the same
task's classes (never trained on by anyone), weighted to the members' class mix.

Two attacks, both reported as ROC AUC and TPR at 1% FPR:
- ``loss``: loss-threshold attack (Yeom et al., CSF 2018): score = -loss of the client's model.
- ``calibrated``: difficulty-calibrated loss (Watson et al., ICLR 2022): score = loss under the
  final global model minus loss under the client's model, i.e. how much the client's own update
  lowered the example's loss. Stronger on examples that are easy or hard for everyone.
With few members per client, TPR at 1% FPR is coarse (it needs >= 100 non-members to resolve
1%); ``n_members``/``n_nonmembers`` are reported beside it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve

from fedcl.methods.base import BASIS, COVARIANCE, HEAD_ROWS, RELEASES, role_of


def roc_summary(member_scores, nonmember_scores, member_labels=None, nonmember_labels=None,
                fpr_at: float = 0.01) -> tuple[float, float]:
    """(AUC, TPR at ``fpr_at`` FPR) of scores where larger means 'member'.

    With labels, non-members are importance-weighted to the members' class mix (members of a
    class with no non-member are left out): a client's non-IID data would otherwise turn a
    per-class loss difference into a fake (or inverted) membership signal.
    """
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    wm, wn = np.ones(len(m)), np.ones(len(n))
    if member_labels is not None and nonmember_labels is not None and len(m) and len(n):
        ml, nl = np.asarray(member_labels), np.asarray(nonmember_labels)
        classes, counts = np.unique(nl, return_counts=True)
        per_class = dict(zip(classes.tolist(), counts.tolist()))
        wm = np.array([1.0 if c in per_class else 0.0 for c in ml.tolist()])
        kept = {c: float(np.sum(ml == c)) for c in per_class}
        wn = np.array([kept[c] / per_class[c] for c in nl.tolist()])
    if wm.sum() <= 0 or wn.sum() <= 0:
        return float("nan"), float("nan")
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    s, w = np.r_[m, n], np.r_[wm, wn]
    fpr, tpr, _ = roc_curve(y, s, sample_weight=w)
    return float(roc_auc_score(y, s, sample_weight=w)), float(tpr[fpr <= fpr_at + 1e-12].max())


@torch.no_grad()
def per_example_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, first: int, end: int,
                     batch_size: int = 512) -> np.ndarray:
    """Cross-entropy over classes first..end-1 (the task's own head rows), per example."""
    model.eval()
    out = [F.cross_entropy(model(x[i:i + batch_size])[:, first:end], y[i:i + batch_size] - first,
                           reduction="none") for i in range(0, len(x), batch_size)]
    return torch.cat(out).cpu().numpy() if out else np.empty(0)


def apply_reply(method, arrays: dict[str, np.ndarray], reply: dict[str, np.ndarray], first: int, end: int) -> dict:
    """Global arrays with a client's reply loaded over them, by the roles ``method`` declares: an
    update replaces its global array, head rows rows first..end-1 of theirs (or 0..end-1, when all
    seen rows were sent); releases (bases, statistics) are not model arrays."""
    out = dict(arrays)
    for key, value in reply.items():
        role, target = role_of(method, key), method.counterpart(key)
        if role in RELEASES or target not in out:
            continue
        if role == HEAD_ROWS:
            out[target] = np.array(out[target], copy=True)
            lo = first if len(value) == end - first else 0
            out[target][lo:end] = value
        else:
            out[target] = value
    return out


def audit_client(exp, global_arrays: dict, reply: dict, task: int, client: int, final_task: int) -> dict:
    """Both attacks on one client's last update (trained on task ``task``)."""
    method, scenario = exp.method, exp.scenario
    first, end = scenario.task_starts[task], scenario.task_starts[task + 1]
    members = scenario.client_indices[task][client]
    nonmembers = scenario.test_indices[task]
    seen = scenario.seen_classes(final_task)
    xm, ym = exp.train_images(members, torch.device("cpu")), exp.train_labels(members, torch.device("cpu"))
    xn = exp.test_images(nonmembers)
    yn = torch.from_numpy(scenario.y_test[nonmembers])
    losses = {}
    for name, arrays in (("global", global_arrays), ("client", apply_reply(method, global_arrays, reply, first, end))):
        model = exp.new_model()
        method.load_payload(model, arrays)
        method.predict(model, xn[:1], seen)  # puts a method's layers in inference mode (e.g. DualLoRA's task)
        losses[name] = (per_example_loss(model, xm, ym, first, end), per_example_loss(model, xn, yn, first, end))
    (gm, gn), (cm, cn) = losses["global"], losses["client"]
    labels = (ym.numpy(), yn.numpy())
    auc, tpr = roc_summary(-cm, -cn, *labels)
    cal_auc, cal_tpr = roc_summary(gm - cm, gn - cn, *labels)
    return {"mia_auc": auc, "mia_tpr_at_1fpr": tpr, "mia_calibrated_auc": cal_auc,
            "mia_calibrated_tpr_at_1fpr": cal_tpr, "mia_task": task,
            "mia_n_members": int(len(members)), "mia_n_nonmembers": int(len(nonmembers))}


def basis_release(arrays: dict[str, np.ndarray], role: Callable[[str], str], threshold: float,
                  fallback_rank: int = 16) -> np.ndarray | None:
    """The orthonormal basis a server reads from a client's basis message (its arrays' roles by
    ``role``): the basis directly, or the top eigenvectors (to ``threshold`` energy) of the
    covariance, exactly as the server's covariance merge would compute them from that one client;
    when noise leaves that rule nothing (e.g. a negative noisy trace), the attacker takes the top
    ``fallback_rank``."""
    from fedcl.aggregation.subspace import merge_covariance

    for key, value in arrays.items():
        if role(key) == BASIS and np.ndim(value) == 2:  # the directions (beside them: singular values)
            return np.asarray(value, dtype=np.float64)
    for key, value in arrays.items():
        if role(key) == COVARIANCE:
            cov = np.asarray(value, dtype=np.float64)
            basis = merge_covariance([cov], threshold)
            if not basis.shape[1]:
                vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
                basis = vecs[:, np.argsort(vals)[::-1][:min(fallback_rank, len(vals))]]
            return basis
    return None


def basis_residual_scores(basis: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Membership score of each row of ``features`` against a released basis: minus the fraction
    of the row's norm outside the basis' span, ||(I - U U^T) f|| / ||f||."""
    f = np.asarray(features, dtype=np.float64)
    residual = f - (f @ basis) @ basis.T
    return -np.linalg.norm(residual, axis=1) / np.maximum(np.linalg.norm(f, axis=1), 1e-12)


@torch.no_grad()
def audit_basis(exp, arrays: dict[str, np.ndarray], task: int, client: int) -> dict:
    """Basis-residual membership inference on a client's task key basis (DualLoRA with
    ``task_key=input``: the basis spans the client's flattened training images)."""
    method, scenario = exp.method, exp.scenario
    if getattr(method, "task_key", None) != "input":
        return {}
    basis = basis_release(arrays, functools.partial(role_of, method), float(getattr(method, "feature_threshold", 0.9)),
                          int(getattr(method, "max_client_basis", 16)))
    if basis is None:
        return {}
    members, nonmembers = scenario.client_indices[task][client], scenario.test_indices[task]
    cpu = torch.device("cpu")
    fm = exp.train_images(members, cpu).flatten(1).double().numpy()
    fn = exp.test_images(nonmembers).flatten(1).double().numpy()
    auc, tpr = roc_summary(basis_residual_scores(basis, fm), basis_residual_scores(basis, fn),
                           scenario.y_train[members], scenario.y_test[nonmembers])
    return {"basis_mia_auc": auc, "basis_mia_tpr_at_1fpr": tpr, "basis_mia_task": task,
            "basis_rank": int(basis.shape[1])}
