"""Per-client privacy as one two-sided concern (``privacy.mechanism`` in ``conf/privacy/*.yaml``).

Server side (a ``ServerCallback``): the ledger admits only clients with budget left, steps every
sender's accountant with the mechanisms its reply says it applied, adds epsilon columns to
metrics.csv, and writes results.json's ``privacy`` key with the membership-inference audit.
Client side (a ``ClientHook``): a client whose own accountant forbids the next message neither
trains nor sends; record-level DP-SGD replaces the local training loop (``ctx.trainer``); what
leaves the client is clipped and noised (``privatize_payload``).
"""
from __future__ import annotations

from fedcl.hooks import ClientHook, ServerCallback
from fedcl.privacy.client_dp import begin_round, privatize_payload
from fedcl.privacy.ledger import PrivacyLedger
from fedcl.privacy.settings import PrivacyConfig


class Privacy:
    settings = PrivacyConfig  # the keys of its yaml, typed (checked by fedcl.config before anything starts)

    def __init__(self, cfg):
        self.cfg = cfg

    def server_callback(self) -> ServerCallback:
        return PrivacyServer(self.cfg)

    def client_hook(self) -> ClientHook:
        return PrivacyClient(self.cfg)


class PrivacyServer(ServerCallback):
    def __init__(self, cfg):
        self.ledger = PrivacyLedger(cfg)
        self.noisy_updates = self.ledger.noisy_updates

    def admit(self, clients, plan):
        return self.ledger.admit(clients, plan.task, plan.round, plan.phase)

    def on_reply(self, plan, client, content):
        self.ledger.observe(plan.task, content)

    def on_round_end(self, report):
        return self.ledger.end_round(report.plan.task)

    def on_run_end(self, end, results):
        privacy = self.ledger.results(end.experiment, dict(end.global_arrays))
        if privacy is not None:
            results["privacy"] = privacy

    def state_dict(self):
        return self.ledger.state_dict()

    def load_state_dict(self, state):
        self.ledger.load_state_dict(state)


class PrivacyClient(ClientHook):
    def __init__(self, cfg):
        self.cfg = cfg

    def before_round(self, ctx, state, config):
        return None if begin_round(self.cfg, ctx, state) else "skip"

    def after_round(self, ctx, state, config, received, payload, num_examples):
        from fedcl.experiment import get_experiment

        return privatize_payload(self.cfg, ctx, received, payload, state, num_examples,
                                 get_experiment(self.cfg).method)
