"""Per-client privacy (issue 6): client-level DP on what clients send, per-client budgets with
Opacus accounting, and membership-inference audits. See the README's "Privacy (issue 6)".

- ``settings``: the ``privacy=`` config group -> per-client noise, participation rate, budget
- ``client_dp``: clip + noise a client's update (and optionally its bases) before it leaves
- ``accounting``: Opacus accountants per client (RDP or PRV)
- ``ledger``: the server's per-run record: admission of clients with budget left, results
- ``dp_sgd``: record-level DP-SGD inside a client with Opacus (``privacy.local_dp_sgd=true``)
- ``audit``: loss-threshold, difficulty-calibrated and basis-residual membership inference per client
"""
from fedcl.privacy.client_dp import begin_round, privatize_payload, refuses
from fedcl.privacy.ledger import PrivacyLedger, ledger_of

__all__ = ["PrivacyLedger", "begin_round", "ledger_of", "privatize_payload", "refuses"]
