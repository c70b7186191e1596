"""Versioned downlink: a client is sent only the global arrays that changed since it last held them.

The server keeps, for every global array, its version: the global round whose aggregation last
replaced it (0: the initial state, which no client is sent: each builds the same initial model
from the run's seed, as the server does). For every client it keeps when it last synced (the round of
its last successful reply) and which keys it was then given. A key changed in round g >= that
round is newer than what the client holds; anything else the client already has. Clients whose
round failed keep their old sync point, so they are sent what they missed next time.

Every message also carries a manifest (each key the client needs this round, with its version):
the client takes the arrays that came with the message and the rest from what it holds (see
``fedcl.client.store.HeldArrays``). Clients that need the same keys in a round share one
serialised ArrayRecord and one manifest: the driver holds one copy per distinct content, not one
per sampled client.

Arrays that only grow by columns (subspace bases: DualLoRA's ``old_basis`` gains task t's new
directions and keeps the old ones exactly) are sent as their new columns alone to a client that
holds an earlier version of the same growth: the server records, per key, the run of versions each
of which starts with the one before (``growth``), and the manifest's ``extends`` names the held
version the sent columns are appended to (-1: the array is sent whole) and ``held_columns`` its
width.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord

from fedcl.client.codec import to_record


@dataclass
class DownlinkState:
    versions: dict[str, int] = field(default_factory=dict)          # global key -> version
    synced: dict[int, tuple[int, int]] = field(default_factory=dict)  # client -> (round, keyset id)
    keysets: list[tuple[str, ...]] = field(default_factory=list)      # interned: few distinct ones per run
    # key -> [(version, columns), ...]: consecutive versions, each the one before plus columns
    growth: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def keyset_id(self, keys) -> int:
        keys = tuple(keys)
        try:
            return self.keysets.index(keys)
        except ValueError:
            self.keysets.append(keys)
            return len(self.keysets) - 1

    def stale(self, client: int, keys) -> list[str]:
        """The keys this client must be sent. Version 0 never: every client builds the same initial
        model from the run's seed, so it holds the initial state from the start."""
        synced = self.synced.get(client)
        if synced is None:
            return [k for k in keys if self.versions.get(k, -1) != 0]
        since, held = synced[0], set(self.keysets[synced[1]])
        return [k for k in keys if self.versions.get(k, -1) != 0
                and (k not in held or self.versions.get(k, since) >= since)]

    def held_prefix(self, client: int, key: str) -> tuple[int, int] | None:
        """(version, columns) of ``key`` this client holds when the current version only appends
        columns to it; None when the client must be sent the whole array."""
        chain = self.growth.get(key)
        if not chain or len(chain) < 2:
            return None
        synced = self.synced.get(client)
        if synced is not None and key in self.keysets[synced[1]]:  # it holds the last version before its sync
            held = [p for p in chain[:-1] if p[0] < synced[0]]
            return held[-1] if held else None
        return chain[0] if chain[0][0] == 0 else None  # what every client holds: the initial state

    def mark_synced(self, client: int, global_round: int, keys) -> None:
        self.synced[client] = (global_round, self.keyset_id(keys))

    def bump(self, before: dict[str, np.ndarray], after: dict[str, np.ndarray], global_round: int) -> list[str]:
        """Version the arrays an aggregation replaced (a new object under a key); returns their keys."""
        changed = [k for k, v in after.items() if before.get(k) is not v]
        for k in changed:
            old, new = before.get(k), after[k]
            if k in self.versions and appends_columns(old, new):
                chain = self.growth.get(k, [])
                if not chain or chain[-1][0] != self.versions[k]:
                    chain = [(self.versions[k], old.shape[1])]
                self.growth[k] = [*chain, (global_round, new.shape[1])]
            else:
                self.growth.pop(k, None)
            self.versions[k] = global_round
        for k in set(before) - set(after):
            self.versions.pop(k, None)
            self.growth.pop(k, None)
        return changed

    def state_dict(self) -> dict:
        return {"versions": dict(self.versions), "synced": {c: list(v) for c, v in self.synced.items()},
                "keysets": [list(k) for k in self.keysets],
                "growth": {k: [list(p) for p in chain] for k, chain in self.growth.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "DownlinkState":
        return cls({k: int(v) for k, v in state["versions"].items()},
                   {int(c): (int(v[0]), int(v[1])) for c, v in state["synced"].items()},
                   [tuple(k) for k in state["keysets"]],
                   {k: [(int(v), int(c)) for v, c in chain] for k, chain in state.get("growth", {}).items()})


def appends_columns(old, new) -> bool:
    """Is ``new`` the 2-D array ``old`` with columns appended (the old ones bit for bit)?"""
    return (isinstance(old, np.ndarray) and isinstance(new, np.ndarray) and old.ndim == new.ndim == 2
            and old.shape[0] == new.shape[0] and new.shape[1] > old.shape[1] and old.dtype == new.dtype
            and np.array_equal(new[:, :old.shape[1]], old))


@dataclass
class Parcel:
    """What one group of clients is sent in a round: shared record + manifest."""

    arrays: object        # flwr ArrayRecord (shared by every message of the group)
    manifest: ConfigRecord
    keys: tuple[str, ...]  # the keys the client needs (sent or held)


def plan_parcels(state: DownlinkState, downlinks: dict[int, dict[str, np.ndarray]]) -> dict[int, Parcel]:
    """client -> its parcel; clients with the same needed and stale keys (and held prefixes of
    growing arrays) share one object."""
    built: dict[tuple, Parcel] = {}
    out = {}
    for client, arrays in downlinks.items():
        keys = tuple(arrays)
        stale = tuple(state.stale(client, keys))
        prefixes = tuple(state.held_prefix(client, k) for k in stale)
        group = (keys, stale, prefixes)
        if group not in built:
            extends, columns, sent = dict.fromkeys(keys, -1), dict.fromkeys(keys, 0), {}
            for k, prefix in zip(stale, prefixes):
                if prefix is None:
                    sent[k] = arrays[k]
                else:
                    extends[k], columns[k] = prefix
                    sent[k] = np.ascontiguousarray(arrays[k][:, columns[k]:])
            manifest = ConfigRecord({"keys": list(keys), "versions": [int(state.versions.get(k, -1)) for k in keys],
                                     "extends": [int(extends[k]) for k in keys],
                                     "held_columns": [int(columns[k]) for k in keys]})
            built[group] = Parcel(to_record(sent), manifest, keys)
        out[client] = built[group]
    return out
