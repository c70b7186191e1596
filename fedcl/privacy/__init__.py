"""Per-client privacy: client-level DP on what clients send, per-client budgets with Opacus
accounting, and membership-inference audits (docs/privacy.md). Plugged in as one concern,
``fedcl.privacy.mechanism.Privacy``, named by ``privacy.mechanism`` in ``conf/privacy/*.yaml``.

- ``settings``: the ``privacy=`` config group -> per-client noise, participation rate, budget
- ``client_dp``: clip + noise a client's update (and optionally its bases) before it leaves
- ``accounting``: Opacus accountants per client (RDP or PRV)
- ``ledger``: the server's per-run record: admission of clients with budget left, results
- ``dp_sgd``: record-level DP-SGD inside a client with Opacus (``privacy.local_dp_sgd=true``)
- ``audit``: loss-threshold, difficulty-calibrated and basis-residual membership inference per client
- ``mechanism``: the server callback and client hook that put the above into a run
"""
