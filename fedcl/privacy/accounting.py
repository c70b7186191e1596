"""Per-client privacy accounting with Opacus' accountants.

Accounting unit (client-level DP): the neighbouring datasets differ in one client's *entire*
data. Each message a client sends in a private task is one step of a Gaussian mechanism on that
client's data:

- an update message: the clipped update delta (L2 <= clip_norm) plus N(0, (sigma_k clip_norm)^2)
  noise, where the client first flips its own participation coin (rate q_k) and, on tails, sends
  the noise alone. That is exactly the Poisson-subsampled Gaussian mechanism Opacus analyses
  (one step with noise_multiplier=sigma_k, sample_rate=q_k), against an adversary who sees every
  message (the server included); the server's own client sampling is not credited (it knows whom
  it asked);
- a basis message with ``privacy.bases=noisy_covariance``: trace-normalised covariances
  (Frobenius norm <= 1 each) plus symmetric Gaussian noise, one step with
  (basis_noise_multiplier, sample_rate=1).

A client's accountant composes every step it took, over rounds and tasks (``history`` holds the
(sigma, rate, steps) segments exactly as Opacus stores them). Epsilon always comes from Opacus.
"""
from __future__ import annotations

import math
import warnings

from opacus.accountants import PRVAccountant, RDPAccountant

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def make_accountant(name: str, history: list[tuple[float, float, int]] | None = None):
    acc = ACCOUNTANTS[name]()
    acc.history = [tuple(h) for h in (history or [])]
    return acc


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Opacus' epsilon at ``delta`` for a list of (noise_multiplier, sample_rate, steps) segments."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf  # a noiseless release: no finite guarantee (Opacus' RDP says inf too)
    acc = make_accountant(accountant, history)
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": tiny epsilons, fine
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # PRV at sample_rate=1: log(1 - q) = -inf, handled
        if accountant == "prv":
            return float(acc.get_epsilon(delta=delta, eps_error=0.01))
        return float(acc.get_epsilon(delta=delta))


def add_step(history: list, noise_multiplier: float, sample_rate: float) -> list:
    """``history`` with one more step appended the way Opacus' accountants do it."""
    acc = RDPAccountant()  # step() bookkeeping is the same for every Opacus accountant
    acc.history = [tuple(h) for h in history]
    acc.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))
    return [list(h) for h in acc.history]


class ClientAccount:
    """One client's composed history and budget."""

    def __init__(self, client: int, budget: float | None, delta: float, accountant: str):
        self.client, self.budget, self.delta, self.accountant = client, budget, delta, accountant
        self.history: list[list] = []
        self.update_steps = 0       # update messages (clipped + noised)
        self.basis_steps = 0        # noisy-basis messages
        self.raw_releases = 0       # data-dependent messages sent without noise (not covered)
        self.exhausted = False
        self.exhausted_at: dict | None = None
        self.epsilon = 0.0
        self.epsilon_per_task: dict[int, float] = {}
        self.epsilon_per_round: list[float] = []

    def step(self, noise_multiplier: float, sample_rate: float, kind: str) -> None:
        self.history = add_step(self.history, noise_multiplier, sample_rate)
        if kind == "update":
            self.update_steps += 1
        else:
            self.basis_steps += 1
        self.epsilon = epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_after(self, steps: list[tuple[float, float]]) -> float:
        history = self.history
        for sigma, q in steps:
            history = add_step(history, sigma, q)
        return epsilon_of(history, self.delta, self.accountant)

    def can_afford(self, steps: list[tuple[float, float]]) -> bool:
        """Whether each of the given possible next steps stays within the budget."""
        if self.budget is None:
            return True
        return all(self.epsilon_after([s]) <= self.budget + 1e-9 for s in steps)
