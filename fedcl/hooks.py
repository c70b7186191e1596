"""The two small interfaces for cross-cutting concerns: server callbacks and client hooks.

A concern (privacy, fault injection, checkpoints, progress, metrics files, results) is one object
behind one of these interfaces, never code inside the round. The strategy calls every server
callback at fixed points of a round; the ClientApp calls every client hook before and after the
method trains. Like Flower's mods and pfl-research's callbacks, each method has a do-nothing
default, so a concern overrides only what it needs.

A concern that needs both sides (client-level DP: the server admits and accounts, the client
clips and noises) is a class with ``server_callback()`` and ``client_hook()``, named in its config
group by class path (``privacy.mechanism: fedcl.privacy.mechanism.Privacy``): one class plus one
yaml, nothing else to touch.
"""
from __future__ import annotations

import importlib

from fedcl.errors import ConfigError


class ServerCallback:
    """Called by ``ContinualStrategy`` (server side). What a callback is given is read-only
    (``fedcl.server.reports``): the round's plan, its metrics row, the global arrays."""

    # screening's norm check of rounds with fewer than 3 replies compares with the global arrays;
    # a callback that noises updates (client-level DP) makes that comparison meaningless
    noisy_updates = False

    def on_run_start(self, run) -> None:
        """Before the first round (also when resuming): a ``RunInfo``."""

    def admit(self, clients: list[int], plan) -> list[int]:
        """The asked clients that may take part in this round (e.g. those with privacy budget left)."""
        return clients

    def client_config(self, client: int, plan) -> dict:
        """Extra entries for this client's round config (e.g. a fault to act out)."""
        return {}

    def on_reply(self, plan, client: int, content) -> None:
        """Every reply that arrived (before screening): its RecordDict."""

    def on_round_end(self, report) -> dict:
        """After aggregation and evaluation (a ``RoundReport``); returns extra columns for the
        round's metrics row."""
        return {}

    def on_checkpoint(self, report) -> None:
        """After the round's row is recorded (a ``RoundReport``, with the whole row): persist what
        must survive a kill."""

    def on_run_end(self, end, results: dict) -> None:
        """After the last round (a ``RunEnd``), with results.json's content (may add keys to it)
        before it is written."""

    def state_dict(self) -> dict:
        """What a resumed run needs of this callback (plain types, tensors, numpy arrays)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ClientHook:
    """Called by the ClientApp around the method's training (client side)."""

    def before_round(self, ctx, state: dict, config: dict) -> str | None:
        """None: go on. "skip": train nothing and reply with no arrays. "drop": the reply never
        arrives. May set ``ctx.trainer`` (the local training loop, e.g. DP-SGD's). May raise."""
        return None

    def after_round(self, ctx, state: dict, config: dict, received: dict, payload: dict,
                    num_examples: int) -> tuple[dict, dict]:
        """The payload to send (possibly changed) and extra reply metrics."""
        return payload, {}


def load_class(path: str, key: str):
    """The class at ``path`` (``package.module.Class``); ``key`` names the config entry in errors."""
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{key}={path!r} cannot be imported; give a class path that exists "
                          "(package.module.Class).") from None


def mechanisms(cfg) -> list:
    """The two-sided concerns a config names (today: ``privacy.mechanism``), built from the config."""
    found = []
    privacy = cfg.get("privacy", None)
    if privacy is not None and privacy.get("mechanism", None):
        found.append(load_class(privacy.mechanism, "privacy.mechanism")(cfg))
    return found
