"""Client side of client-level DP: what leaves a client is clipped and noised there.

``privatize_payload`` takes the method's payload (named arrays) and the arrays the server sent
this round, and treats each array by the role its method declares (``Method.array_role``):
- *updates* (and *head rows*): their differences to what they update in what was received (the
  same global array; head rows: rows first_class..seen_classes-1, or 0..seen_classes-1, of their
  ``Method.counterpart``), taken together as one vector, are clipped to ``clip_norm`` in L2 and
  get Gaussian noise of std ``sigma_k * clip_norm``; integer arrays (e.g. BatchNorm counters) are
  sent back as received. An update with nothing received to differ from goes out as it is and is
  counted as an uncovered release in the ledger;
- *releases* (bases, covariances, other statistics of the client's data): covariances are
  trace-normalised (PSD with unit trace => Frobenius norm <= 1) and get symmetric Gaussian noise
  when ``privacy.bases=noisy_covariance``; anything else is sent raw and counted as an uncovered
  release in the ledger.

The client keeps its own accountant history in its state and refuses to train once its next
message would exceed its budget (``refuses``), so a client enforces its budget even if a server
asks again.
"""
from __future__ import annotations

import numpy as np
import torch

from fedcl.methods.base import COVARIANCE, HEAD_ROWS, RELEASES, role_of
from fedcl.privacy.accounting import ClientAccount, add_step, epsilon_of
from fedcl.privacy.settings import PrivacySettings, privacy_settings
from fedcl.seeding import derive_seed

NOISE_TAG, COIN_TAG = 61, 67  # keep the privacy RNG streams apart from training's


def _np(v) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def references(method, payload: dict, received: dict, ctx) -> dict[str, np.ndarray]:
    """For each update (or head rows) in ``payload``: what it updates in ``received``, by the roles
    ``method`` declares. Releases have none, nor has an update whose counterpart was not received."""
    refs = {}
    for key, value in payload.items():
        role = role_of(method, key)
        full = received.get(method.counterpart(key))
        if role in RELEASES or full is None:
            continue
        shape = tuple(np.shape(value))
        if role == HEAD_ROWS:
            for lo in (ctx.first_class, 0):  # the current task's rows, or all seen rows
                if tuple(full[lo:ctx.seen_classes].shape) == shape:
                    refs[key] = np.asarray(full[lo:ctx.seen_classes])
                    break
        elif tuple(np.shape(full)) == shape:
            refs[key] = np.asarray(full)
    return refs


def clip_and_noise(deltas: dict[str, np.ndarray], clip_norm: float, noise_std: float,
                   rng: np.random.Generator, keep: bool = True) -> tuple[dict[str, np.ndarray], float]:
    """Clip the concatenation of ``deltas`` to ``clip_norm`` (L2), add N(0, noise_std^2) to every
    coordinate; ``keep=False`` sends the noise alone (the participation coin came up tails).
    Returns the noisy deltas (float64) and the norm before clipping."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in deltas.values())))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for key, d in deltas.items():
        kept = d.astype(np.float64) * scale if keep else np.zeros(d.shape)
        out[key] = kept + rng.normal(0.0, noise_std, size=d.shape) if noise_std > 0 else kept
    return out, norm


def noisy_covariance(cov: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Trace-normalised covariance plus symmetric Gaussian noise (upper triangle iid, mirrored):
    the "Analyze Gauss" mechanism (Dwork et al., STOC 2014) with sensitivity 1 per matrix."""
    cov = np.asarray(cov, dtype=np.float64)
    tr = float(np.trace(cov))
    normalised = cov / tr if tr > 0 else np.zeros_like(cov)
    upper = np.triu(rng.normal(0.0, noise_std, size=cov.shape))
    return normalised + upper + np.triu(upper, 1).T


def begin_round(cfg, ctx, state: dict) -> bool:
    """Before training: False when the client's budget forbids this round's message (it then
    neither trains nor sends anything); with ``local_dp_sgd`` DP-SGD becomes the round's trainer."""
    if refuses(cfg, ctx.client, ctx.task, state, ctx.phase):
        return False
    s = privacy_settings(cfg)
    if s.private_task(ctx.task) and s.local_dp_sgd:
        from fedcl.privacy.dp_sgd import DPSGD, dp_fit

        ctx.trainer = dp_fit  # the local training loop: Opacus' DP-SGD instead of plain SGD
        c = s.client(ctx.client)
        ctx.dp_sgd = DPSGD(c.dp_sgd_noise_multiplier, s.dp_sgd_max_grad_norm, c.dp_sgd_target_epsilon,
                           s.delta, s.accountant)
        ctx.dp_sgd_history = [tuple(h) for h in state.get("dp_sgd_history", [])]
    return True


def refuses(cfg, client: int, task: int, state: dict, phase: str = "train") -> bool:
    """Whether this client's own accountant says its next message would exceed its budget."""
    s = privacy_settings(cfg)
    if not s.private_task(task):
        return False
    from fedcl.experiment import get_experiment

    update = get_experiment(cfg).method.sends_update(phase)
    return not client_account(s, client, state).can_afford(next_steps(s, client, update))


def next_steps(s: PrivacySettings, client: int, update: bool) -> list[tuple[float, float]]:
    """The accounted mechanism of a message: an update (the method's ``sends_update`` phases), or
    bases (e.g. DualLoRA's ``basis_*``), accounted only when they are noised."""
    if update:
        c = s.client(client)
        return [(c.noise_multiplier, c.sample_rate)] if s.client_level else []
    return [(s.basis_noise_multiplier, 1.0)] if s.bases == "noisy_covariance" else []


def client_account(s: PrivacySettings, client: int, state: dict) -> ClientAccount:
    acc = ClientAccount(client, s.client(client).target_epsilon, s.delta, s.accountant)
    acc.history = [list(h) for h in state.get("privacy_history", [])]
    return acc


def privatize_payload(cfg, ctx, received: dict, payload: dict, state: dict, num_examples: int,
                      method) -> tuple[dict, dict]:
    """The arrays to send and the metrics that describe the mechanism applied (for the ledger;
    with ``uniform_weights`` they also replace ``num-examples`` by 1).

    Without privacy, in a public task, or when the client had no data this round (the server
    drops such replies), the payload goes out unchanged and the metrics are empty.
    """
    s = privacy_settings(cfg)
    if not s.private_task(ctx.task) or num_examples <= 0:
        return payload, {}
    c = s.client(ctx.client)
    rng = np.random.default_rng(derive_seed(ctx.seed, ctx.task, ctx.round, ctx.client, NOISE_TAG))
    refs = references(method, payload, received, ctx)
    out: dict[str, np.ndarray] = {}
    deltas = {}
    for key, value in payload.items():
        v = _np(value)
        if key in refs and np.issubdtype(v.dtype, np.integer):
            out[key] = np.asarray(refs[key]).copy()  # counters: send back what was received
        elif key in refs:
            deltas[key] = v.astype(np.float64) - np.asarray(refs[key], dtype=np.float64)
    metrics = {"dp-update": 0, "dp-basis": 0, "dp-raw": 0}
    taken = getattr(ctx, "dp_sgd_taken", None)
    if taken is not None:  # record-level DP-SGD ran in fit: compose its steps in the client's accountant
        q, steps, exhausted = taken
        history = [list(h) for h in state.get("dp_sgd_history", [])]
        for _ in range(steps):
            history = add_step(history, ctx.dp_sgd.noise_multiplier, q)
        state["dp_sgd_history"] = history
        metrics.update({"dpsgd-epsilon": epsilon_of(history, s.delta, s.accountant),
                        "dpsgd-steps": int(sum(h[2] for h in history)), "dpsgd-exhausted": int(exhausted),
                        "dpsgd-history": [float(v) for h in history for v in h]})  # (sigma, q, steps) flattened
    if deltas and not s.client_level:  # record-level DP only: the update goes out as trained
        for key in deltas:
            out[key] = _np(payload[key])
        deltas = {}
    if deltas:
        # the participation coin: private to the client (seeded here for reproducibility)
        coin = np.random.default_rng(derive_seed(ctx.seed, ctx.task, ctx.round, ctx.client, COIN_TAG))
        keep = bool(coin.random() < c.sample_rate)
        noisy, norm = clip_and_noise(deltas, s.clip_norm, c.noise_multiplier * s.clip_norm, rng, keep)
        for key, d in noisy.items():
            out[key] = (np.asarray(refs[key], dtype=np.float64) + d).astype(_np(payload[key]).dtype)
        metrics["dp-update"] = 1
        state["privacy_last_norm"] = norm
    releases = [k for k in payload if k not in refs]
    covs = [k for k in releases if role_of(method, k) == COVARIANCE]
    if s.bases == "noisy_covariance" and covs:
        # all matrices of one message together have L2 sensitivity sqrt(len(covs))
        std = s.basis_noise_multiplier * float(np.sqrt(len(covs)))
        for key in covs:
            out[key] = noisy_covariance(_np(payload[key]), std, rng)
        metrics["dp-basis"] = 1
    for key in releases:
        if key not in out:
            out[key] = _np(payload[key])
            metrics["dp-raw"] += 1
    if metrics["dp-update"] or metrics["dp-basis"]:
        acc = client_account(s, ctx.client, state)
        if metrics["dp-update"]:
            acc.step(c.noise_multiplier, c.sample_rate, "update")
        if metrics["dp-basis"]:
            acc.step(s.basis_noise_multiplier, 1.0, "basis")
        state["privacy_history"] = acc.history
    if s.uniform_weights:
        metrics["num-examples"] = 1
    return {k: out[k] for k in payload}, metrics
