"""The ``privacy=`` config group read into per-client settings, and per-client noise calibration.

Every client gets a ``ClientPrivacy``: its noise multiplier, its participation (sample) rate and
its budget. Defaults come from the top of the group; ``groups`` override them for listed clients:

    privacy.groups=[{clients: [0, 1], noise_multiplier: 2.0}, {clients: [2, 3], target_epsilon: 4.0}]

A client with ``target_epsilon`` and no ``noise_multiplier`` gets the smallest sigma whose planned
messages stay within the budget (binary search over sigma, epsilon from Opacus' accountant). The
plan is deterministic (server sampling depends on (seed, task, round) only), so server and client
derive the same sigma from the config alone.
"""
from __future__ import annotations

import functools
import importlib
import json
import math
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from fedcl.errors import ConfigError
from fedcl.privacy.accounting import epsilon_of

BASES = ("raw", "noisy_covariance")


@dataclass(frozen=True)
class DpSgdSettings:
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None


@dataclass(frozen=True)
class RunPrivacy:
    """What client-level DP applies to every client alike: keys of the yaml (``PrivacyConfig``)
    that a run's settings (``PrivacySettings``) keep as they are, with one default each."""

    clip_norm: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    start_task: int = 0
    bases: str = "raw"
    basis_noise_multiplier: float = 1.0
    uniform_weights: bool = True
    client_level: bool = True         # clip + noise the update each client sends
    local_dp_sgd: bool = False        # record-level DP-SGD (Opacus) inside each client
    audit: bool = True
    audit_max_clients: int = 20


@dataclass(frozen=True)
class PrivacyConfig(RunPrivacy):
    """The keys of ``conf/privacy/client_dp.yaml`` (and ``dp_sgd.yaml``) with their types: what
    ``fedcl.privacy.mechanism.Privacy`` reads (``Privacy.settings``). Beside the run-wide ones, the
    defaults of every client's own settings and the groups that override them."""

    noise_multiplier: float | None = 1.0
    target_epsilon: float | None = None
    sample_rate: float = 1.0
    groups: list | None = None
    dp_sgd: DpSgdSettings | None = None


@dataclass(frozen=True)
class ClientPrivacy:
    client: int
    noise_multiplier: float       # sigma of the update mechanism (noise std = sigma * clip_norm)
    sample_rate: float            # the client's participation coin (Poisson subsampling rate)
    target_epsilon: float | None  # budget; None: unlimited
    calibrated: bool              # sigma came from target_epsilon
    dp_sgd_noise_multiplier: float = 0.0      # record-level DP-SGD (privacy.local_dp_sgd)
    dp_sgd_target_epsilon: float | None = None


@dataclass(frozen=True)
class PrivacySettings(RunPrivacy):
    """A run's settings: the run-wide ones, checked, and every client's own (``clients``)."""

    enabled: bool = False
    dp_sgd_max_grad_norm: float = 1.0
    clients: tuple[ClientPrivacy, ...] = ()

    def client(self, c: int) -> ClientPrivacy:
        return self.clients[c]

    def private_task(self, task: int) -> bool:
        return self.enabled and task >= self.start_task


def privacy_settings(cfg: DictConfig) -> PrivacySettings:
    """Settings of a run (cached per config content: the client calls this on every message).
    Enabled where ``privacy.mechanism`` is fedcl's own ``Privacy``; another mechanism class reads
    its own settings."""
    p = cfg.get("privacy", None)
    if p is None or not reads_these_settings(p.get("mechanism", None)):
        return PrivacySettings(enabled=False)
    return _settings(json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def reads_these_settings(mechanism: str | None) -> bool:
    """Is ``mechanism`` (a class path) one whose yaml is a ``PrivacyConfig``, i.e. fedcl's own DP?"""
    if not mechanism:
        return False
    module, _, name = str(mechanism).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False  # fedcl.config names the class path that does not import
    return getattr(cls, "settings", None) is PrivacyConfig


@functools.lru_cache(maxsize=8)
def _settings(key: str) -> PrivacySettings:
    cfg = OmegaConf.create(json.loads(key))
    p = cfg.privacy
    n = int(cfg.num_clients)
    clip, delta = float(p.clip_norm), float(p.delta)
    if not clip > 0:
        raise ConfigError(f"privacy.clip_norm={clip} must be > 0.")
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.delta={delta} must be in (0, 1); use delta < 1/num_clients.")
    accountant = str(p.get("accountant", "rdp"))
    if accountant not in ("rdp", "prv"):
        raise ConfigError(f"privacy.accountant={accountant!r} is unknown. Choose 'rdp' or 'prv'.")
    bases = str(p.get("bases", "raw"))
    if bases not in BASES:
        raise ConfigError(f"privacy.bases={bases!r} is unknown. Choose one of {list(BASES)}.")
    if bases == "noisy_covariance" and str(cfg.get("strategy", {}).get("basis_aggregation", "svd")) != "covariance":
        raise ConfigError("privacy.bases=noisy_covariance noises the clients' covariances: set "
                          "strategy.basis_aggregation=covariance as well.")
    basis_sigma = float(p.get("basis_noise_multiplier", 1.0))
    if bases == "noisy_covariance" and not basis_sigma > 0:
        raise ConfigError(f"privacy.basis_noise_multiplier={basis_sigma} must be > 0.")
    client_level = bool(p.get("client_level", True))
    dp = p.get("dp_sgd", None) or {}
    local_dp_sgd = bool(p.get("local_dp_sgd", False))
    if local_dp_sgd:
        from fedcl.experiment import get_experiment
        from fedcl.privacy.dp_sgd import check_supported

        check_supported(get_experiment(cfg).method)
    base = dict(noise_multiplier=p.get("noise_multiplier", None) if client_level else 0.0,
                target_epsilon=p.get("target_epsilon", None) if client_level else None,
                sample_rate=p.get("sample_rate", 1.0),
                dp_sgd_noise_multiplier=dp.get("noise_multiplier", 1.0),
                dp_sgd_target_epsilon=dp.get("target_epsilon", None))
    per_client = [dict(base) for _ in range(n)]
    for g, group in enumerate(p.get("groups", None) or []):
        members = group.get("clients", None)
        if members is None:
            raise ConfigError(f"privacy.groups[{g}] has no `clients` list.")
        allowed = {"clients", "noise_multiplier", "target_epsilon", "sample_rate", "dp_sgd_noise_multiplier",
                   "dp_sgd_target_epsilon"}
        unknown = set(group) - allowed
        if unknown:
            raise ConfigError(f"privacy.groups[{g}] has unknown keys {sorted(unknown)}; allowed: "
                              f"{', '.join(sorted(allowed))}.")
        for c in members:
            if not 0 <= int(c) < n:
                raise ConfigError(f"privacy.groups[{g}] names client {c}, but num_clients={n}.")
            per_client[int(c)].update({k: group[k] for k in group if k != "clients"})
    settings = PrivacySettings(
        enabled=True, clip_norm=clip, delta=delta, accountant=accountant,
        start_task=int(p.get("start_task", 0)), bases=bases, basis_noise_multiplier=basis_sigma,
        uniform_weights=bool(p.get("uniform_weights", True)), audit=bool(p.get("audit", True)),
        audit_max_clients=int(p.get("audit_max_clients", 20)), client_level=client_level,
        local_dp_sgd=local_dp_sgd, dp_sgd_max_grad_norm=float(dp.get("max_grad_norm", 1.0)))
    plan = planned_messages(cfg, settings.start_task)
    clients = []
    for c, s in enumerate(per_client):
        sigma, eps, q = s["noise_multiplier"], s["target_epsilon"], float(s["sample_rate"])
        if not 0 < q <= 1:
            raise ConfigError(f"privacy sample_rate={q} of client {c} must be in (0, 1].")
        if eps is not None and not float(eps) > 0:
            raise ConfigError(f"privacy target_epsilon={eps} of client {c} must be > 0.")
        if client_level and sigma is None and eps is None:
            raise ConfigError(f"client {c} has neither a noise_multiplier nor a target_epsilon: set one "
                              "(privacy.noise_multiplier / privacy.target_epsilon or in privacy.groups).")
        calibrated = sigma is None
        if calibrated:
            updates, releases = plan[c]
            extra = ((basis_sigma, 1.0, releases),) if bases == "noisy_covariance" and releases else ()
            sigma = calibrate_noise(float(eps), delta, q, updates, extra, accountant)
        if float(sigma) < 0:
            raise ConfigError(f"privacy noise_multiplier={sigma} of client {c} must be >= 0.")
        dp_sigma, dp_eps = float(s["dp_sgd_noise_multiplier"]), s["dp_sgd_target_epsilon"]
        if local_dp_sgd and not dp_sigma > 0:
            raise ConfigError(f"privacy.dp_sgd.noise_multiplier={dp_sigma} of client {c} must be > 0.")
        clients.append(ClientPrivacy(c, float(sigma), q, None if eps is None else float(eps), calibrated,
                                     dp_sigma, None if dp_eps is None else float(dp_eps)))
    return PrivacySettings(**{**settings.__dict__, "clients": tuple(clients)})


def planned_messages(cfg: DictConfig, start_task: int) -> list[tuple[int, int]]:
    """Per client: (update messages, other data-dependent messages) the server's schedule asks
    for in private tasks, if nobody stops early. The method says which phases carry updates
    (``sends_update``); every other phase (e.g. DualLoRA's ``basis_*``) is counted as a basis release."""
    from fedcl.experiment import get_experiment
    from fedcl.server.schedule import asked, schedule

    method = get_experiment(cfg).method
    counts = [[0, 0] for _ in range(int(cfg.num_clients))]
    for plan in schedule(cfg, method):
        if plan.task >= start_task:
            for c in asked(cfg, method, plan):
                counts[c][0 if method.sends_update(plan.phase) else 1] += 1
    return [tuple(c) for c in counts]


@functools.lru_cache(maxsize=256)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    extra: tuple[tuple[float, float, int], ...] = (), accountant: str = "rdp",
                    tolerance: float = 0.01) -> float:
    """Smallest sigma (to ``tolerance`` in epsilon) whose ``steps`` messages at ``sample_rate``,
    composed with the ``extra`` (sigma, rate, steps) segments, spend at most ``target_epsilon``.
    Epsilon comes from Opacus' accountant; this only searches sigma."""
    if steps <= 0:
        return 0.0
    fixed = epsilon_of(list(extra), delta, accountant) if extra else 0.0
    if fixed >= target_epsilon:
        raise ConfigError(f"target_epsilon={target_epsilon} is spent by the basis releases alone "
                          f"(epsilon {fixed:.2f}); raise privacy.basis_noise_multiplier or the budget.")
    spend = lambda s: epsilon_of([(s, sample_rate, steps), *extra], delta, accountant)  # noqa: E731
    lo, hi = 0.0, 1.0
    while spend(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ConfigError(f"target_epsilon={target_epsilon} cannot be met with delta={delta}.")
    while hi - lo > 1e-3 * max(hi, 1e-3):
        mid = (lo + hi) / 2
        if spend(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
        if not math.isfinite(spend(hi)) or target_epsilon - spend(hi) < tolerance:
            break
    return hi
