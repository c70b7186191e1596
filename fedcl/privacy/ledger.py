"""The server's per-run privacy ledger: who may be sampled, what each client spent, the audit.

The privacy server callback (``fedcl.privacy.mechanism``) calls ``admit`` before a round (clients
that cannot afford another message are not asked: they have exhausted their budget and stop),
``observe`` for every reply, and ``end_round`` after aggregation (its dict goes into metrics.csv).
``results`` is results.json's
``privacy`` key. With ``privacy=none`` every call is a no-op and ``results`` is None.
"""
from __future__ import annotations

import math

import numpy as np

from fedcl.client.codec import from_record
from fedcl.privacy.accounting import ClientAccount
from fedcl.privacy.client_dp import next_steps
from fedcl.privacy.settings import privacy_settings


def coverage(s) -> str:
    """What the reported epsilons cover, in words."""
    parts = []
    if s.client_level:
        parts.append("client level: each update is clipped + noised on the client")
    if s.local_dp_sgd:
        parts.append("record level: DP-SGD inside each client (the per-client epsilon; updates leave "
                     "the client without further noise)" if not s.client_level else
                     "record level: DP-SGD inside each client (see dp_sgd per client)")
    parts.append("bases: trace-normalised covariances + symmetric Gaussian noise" if s.bases == "noisy_covariance"
                 else "bases: sent raw, NOT covered by epsilon (see raw_releases)")
    return "; ".join(parts)


class PrivacyLedger:
    def __init__(self, cfg):
        self.cfg = cfg  # picklable (no data): the ledger travels in the server's checkpoint
        self.s = privacy_settings(cfg)
        self.enabled = self.s.enabled
        self.accounts = {c.client: ClientAccount(c.client, c.target_epsilon, self.s.delta, self.s.accountant)
                         for c in self.s.clients}
        self.last_update: dict[int, tuple[int, dict]] = {}
        self.last_basis: dict[int, tuple[int, dict]] = {}   # task key basis releases, for the audit
        self.dp_sgd: dict[int, dict] = {}   # record-level DP-SGD, as each client's accountant reports it
        # screening: a noised update's norm is mostly noise, so rounds with fewer than 3 replies
        # (no median to compare with) skip the norm check
        self.noisy_updates = bool(self.enabled and self.s.client_level
                                  and any(c.noise_multiplier > 0 for c in self.s.clients))

    # ---- during the run -------------------------------------------------------------------
    def admit(self, sampled: list[int], task: int, rnd: int, phase: str = "train") -> list[int]:
        """The sampled clients that can still afford this round's message; marks the others
        exhausted (an exhausted client is never asked again)."""
        if not self.s.private_task(task):
            return sampled
        from fedcl.experiment import get_experiment

        keep, update = [], get_experiment(self.cfg).method.sends_update(phase)
        for c in sampled:
            acc = self.accounts[c]
            if acc.exhausted or not acc.can_afford(next_steps(self.s, c, update)):
                if not acc.exhausted:
                    acc.exhausted, acc.exhausted_at = True, {"task": task, "round": rnd}
                continue
            keep.append(c)
        return keep

    def observe(self, task: int, content) -> None:
        """One reply (its RecordDict): step the sender's accountant with the mechanisms it applied.
        Every reply counts, also one the server later rejects: the server has seen it."""
        if not self.s.private_task(task):
            return
        metrics = content["metrics"]
        if int(metrics["num-examples"]) <= 0:
            return
        c = int(metrics["client"])
        acc, me = self.accounts[c], self.s.client(c)
        if int(metrics.get("dp-update", 0)):
            acc.step(me.noise_multiplier, me.sample_rate, "update")
        if int(metrics.get("dp-update", 0)) or "dpsgd-epsilon" in metrics:
            if "arrays" in content and self.s.audit and c < self.s.audit_max_clients:
                self.last_update[c] = (task, from_record(content["arrays"]))
        if int(metrics.get("dp-basis", 0)):
            acc.step(self.s.basis_noise_multiplier, 1.0, "basis")
        acc.raw_releases += int(metrics.get("dp-raw", 0))
        if "dpsgd-epsilon" in metrics:
            self.dp_sgd[c] = {"epsilon": float(metrics["dpsgd-epsilon"]), "steps": int(metrics["dpsgd-steps"]),
                              "noise_multiplier": me.dp_sgd_noise_multiplier,
                              "max_grad_norm": self.s.dp_sgd_max_grad_norm,
                              "target_epsilon": me.dp_sgd_target_epsilon,
                              "exhausted": bool(int(metrics["dpsgd-exhausted"])),
                              "history": [[s, q, int(n)] for s, q, n
                                          in np.reshape(metrics["dpsgd-history"], (-1, 3)).tolist()]}
            if self.dp_sgd[c]["exhausted"] and not acc.exhausted:  # record-level budget spent
                acc.exhausted, acc.exhausted_at = True, {"task": task, "reason": "dp_sgd budget"}
        if (int(metrics.get("dp-basis", 0)) or int(metrics.get("dp-raw", 0))) and "arrays" in content \
                and self.s.audit and c < self.s.audit_max_clients:
            from fedcl.experiment import get_experiment

            release = get_experiment(self.cfg).method.task_key_release(from_record(content["arrays"]))
            if release:  # the method says which arrays span the client's task subspace
                self.last_basis[c] = (task, release)
        if acc.budget is not None and acc.epsilon > acc.budget + 1e-9:
            raise RuntimeError(f"client {c} spent epsilon {acc.epsilon:.3f} over its budget {acc.budget}")

    def state_dict(self) -> dict:
        """Plain types only (the checkpoint loads with ``weights_only=True``)."""
        return {"accounts": {c: dict(vars(a)) for c, a in self.accounts.items()},
                "last_update": {c: [t, arrays] for c, (t, arrays) in self.last_update.items()},
                "last_basis": {c: [t, arrays] for c, (t, arrays) in self.last_basis.items()},
                "dp_sgd": self.dp_sgd}

    def load_state_dict(self, state: dict) -> None:
        for c, fields in state["accounts"].items():
            self.accounts[int(c)].__dict__.update(fields)
        self.last_update = {int(c): (t, a) for c, (t, a) in state["last_update"].items()}
        self.last_basis = {int(c): (t, a) for c, (t, a) in state["last_basis"].items()}
        self.dp_sgd = dict(state["dp_sgd"])

    def end_round(self, task: int) -> dict:
        """After a round: epsilon per task snapshot; a few columns for metrics.csv."""
        if not self.enabled:
            return {}
        eps = [self.epsilon(c) for c in self.accounts]
        for a, e in zip(self.accounts.values(), eps):
            a.epsilon_per_task[task] = e
            a.__dict__.setdefault("epsilon_per_round", []).append(e)  # (a checkpoint from before it)
        return {"eps_max": max(eps), "eps_mean": float(np.mean(eps)),
                "clients_exhausted": sum(a.exhausted for a in self.accounts.values())}

    def epsilon(self, c: int) -> float:
        """The client's reported epsilon: client level, or DP-SGD's when that is the only mechanism."""
        if self.s.local_dp_sgd and not self.s.client_level:
            return (self.dp_sgd.get(c) or {}).get("epsilon", 0.0)
        return self.accounts[c].epsilon

    # ---- at the end -----------------------------------------------------------------------
    def results(self, exp=None, global_arrays: dict | None = None) -> dict | None:
        """results.json's ``privacy``: per client the accountant's inputs and outputs, the audit."""
        if not self.enabled:
            return None
        audits = {}
        if self.s.audit and exp is not None and global_arrays is not None:
            from fedcl.privacy.audit import audit_basis, audit_client

            final = int(self.cfg.num_tasks) - 1
            for c, (task, reply) in sorted(self.last_update.items()):
                try:  # an audit that fails (e.g. a method with its own payload layout) must not lose the run
                    audits[c] = audit_client(exp, global_arrays, reply, task, c, final)
                except Exception as err:  # noqa: BLE001
                    audits[c] = {"audit_error": f"{type(err).__name__}: {err}"[:300]}
            for c, (task, arrays) in sorted(self.last_basis.items()):
                try:
                    audits.setdefault(c, {}).update(audit_basis(exp, arrays, task, c))
                except Exception as err:  # noqa: BLE001
                    audits.setdefault(c, {})["basis_audit_error"] = f"{type(err).__name__}: {err}"[:300]
        clients = {}
        for c, acc in self.accounts.items():
            me = self.s.client(c)
            entry = {
                "epsilon": acc.epsilon, "delta": self.s.delta,
                "noise_multiplier": me.noise_multiplier, "sample_rate": me.sample_rate,
                "steps": acc.update_steps, "exhausted": acc.exhausted,
                "mia_auc": None, "mia_tpr_at_1fpr": None,
                "target_epsilon": me.target_epsilon, "noise_calibrated": me.calibrated,
                "basis_steps": acc.basis_steps, "raw_releases": acc.raw_releases,
                "history": [list(h) for h in acc.history],  # (noise_multiplier, sample_rate, steps) segments
                "exhausted_at": acc.exhausted_at,
                "epsilon_per_task": {str(t): e for t, e in sorted(acc.epsilon_per_task.items())},
                "epsilon_per_round": list(acc.epsilon_per_round),  # after each global round, in order
            }
            if self.s.local_dp_sgd:
                entry["dp_sgd"] = self.dp_sgd.get(c)
            if self.s.local_dp_sgd and not self.s.client_level:  # the guarantee is DP-SGD's: report its inputs
                dp = self.dp_sgd.get(c) or {"epsilon": 0.0, "steps": 0, "history": []}
                entry.update({"level": "record", "epsilon": dp["epsilon"], "steps": dp["steps"],
                              "noise_multiplier": me.dp_sgd_noise_multiplier,
                              "sample_rate": dp["history"][-1][1] if dp["history"] else None,
                              "target_epsilon": me.dp_sgd_target_epsilon, "history": dp["history"]})
            else:
                entry["level"] = "client"
            entry.update(audits.get(c, {}))
            clients[str(c)] = entry
        eps = [e["epsilon"] for e in clients.values()]
        aucs = [a["mia_auc"] for a in audits.values() if "mia_auc" in a and not math.isnan(a["mia_auc"])]
        cal = [a["mia_calibrated_auc"] for a in audits.values()
               if "mia_calibrated_auc" in a and not math.isnan(a["mia_calibrated_auc"])]
        basis = [a["basis_mia_auc"] for a in audits.values()
                 if "basis_mia_auc" in a and not math.isnan(a["basis_mia_auc"])]
        return {
            "mode": self.cfg.privacy.name, "client_level": self.s.client_level,
            "local_dp_sgd": self.s.local_dp_sgd, "accountant": self.s.accountant, "delta": self.s.delta,
            "clip_norm": self.s.clip_norm, "start_task": self.s.start_task, "bases": self.s.bases,
            "basis_noise_multiplier": self.s.basis_noise_multiplier if self.s.bases != "raw" else None,
            "uniform_weights": self.s.uniform_weights, "covers": coverage(self.s),
            "unit": "client level: one step per message a client sends in a private task (update: its "
                    "noise multiplier and participation rate; noisy basis: basis_noise_multiplier, rate 1); "
                    "record level (DP-SGD): one step per local optimiser step, rate batch_size / rows",
            "epsilon_max": max(eps), "epsilon_mean": float(np.mean(eps)),
            "exhausted_clients": sorted(c for c, a in self.accounts.items() if a.exhausted),
            "mia_auc_mean": float(np.mean(aucs)) if aucs else None,
            "mia_calibrated_auc_mean": float(np.mean(cal)) if cal else None,
            "basis_mia_auc_mean": float(np.mean(basis)) if basis else None,
            "clients": clients,
        }
