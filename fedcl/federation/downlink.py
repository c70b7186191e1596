"""Versioned downlink: a client is sent only the global arrays that changed since it last held them.

The server keeps, for every global array, its version: the global round whose aggregation last
replaced it (0: the initial state, which no client is sent: each builds the same initial model
from the run's seed, as the server does). For every client it keeps when it last synced (the round of
its last successful reply) and which keys it was then given. A key changed in round g >= that
round is newer than what the client holds; anything else the client already has. Clients whose
round failed keep their old sync point, so they are sent what they missed next time.

Every message also carries a manifest (each key the client needs this round, with its version):
the client takes the arrays that came with the message and the rest from what it holds (see
``fedcl.federation.store.HeldArrays``). Clients that need the same keys in a round share one
serialised ArrayRecord and one manifest: the driver holds one copy per distinct content, not one
per sampled client.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord

from fedcl.federation.codec import to_record


@dataclass
class DownlinkState:
    versions: dict[str, int] = field(default_factory=dict)          # global key -> version
    synced: dict[int, tuple[int, int]] = field(default_factory=dict)  # client -> (round, keyset id)
    keysets: list[tuple[str, ...]] = field(default_factory=list)      # interned: few distinct ones per run

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

    def mark_synced(self, client: int, global_round: int, keys) -> None:
        self.synced[client] = (global_round, self.keyset_id(keys))

    def bump(self, before: dict[str, np.ndarray], after: dict[str, np.ndarray], global_round: int) -> list[str]:
        """Version the arrays an aggregation replaced (a new object under a key); returns their keys."""
        changed = [k for k, v in after.items() if before.get(k) is not v]
        for k in changed:
            self.versions[k] = global_round
        for k in set(before) - set(after):
            self.versions.pop(k, None)
        return changed

    def state_dict(self) -> dict:
        return {"versions": dict(self.versions), "synced": {c: list(v) for c, v in self.synced.items()},
                "keysets": [list(k) for k in self.keysets]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "DownlinkState":
        return cls({k: int(v) for k, v in state["versions"].items()},
                   {int(c): (int(v[0]), int(v[1])) for c, v in state["synced"].items()},
                   [tuple(k) for k in state["keysets"]])


@dataclass
class Parcel:
    """What one group of clients is sent in a round: shared record + manifest."""

    arrays: object        # flwr ArrayRecord (shared by every message of the group)
    manifest: ConfigRecord
    keys: tuple[str, ...]  # the keys the client needs (sent or held)


def plan_parcels(state: DownlinkState, downlinks: dict[int, dict[str, np.ndarray]]) -> dict[int, Parcel]:
    """client -> its parcel; clients with the same needed and stale keys share one object."""
    built: dict[tuple, Parcel] = {}
    out = {}
    for client, arrays in downlinks.items():
        keys = tuple(arrays)
        stale = tuple(state.stale(client, keys))
        group = (keys, stale)
        if group not in built:
            manifest = ConfigRecord({"keys": list(keys), "versions": [int(state.versions.get(k, -1)) for k in keys]})
            built[group] = Parcel(to_record({k: arrays[k] for k in stale}), manifest, keys)
        out[client] = built[group]
    return out
