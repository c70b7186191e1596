"""The server's state between rounds, typed, and its checkpoint form.

``state_dict()`` holds plain types and tensors only, so ``checkpoint/server.pt`` loads with
``torch.load(weights_only=True)``: numpy arrays travel as tensors (with their dtype) and come back
as numpy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedcl.server.downlink import DownlinkState


@dataclass
class ServerState:
    global_arrays: dict[str, np.ndarray]
    downlink: DownlinkState = field(default_factory=DownlinkState)
    matrix: list[list[float | None]] = field(default_factory=list)  # accuracy matrix rows so far
    rows: list[dict] = field(default_factory=list)                  # metrics.csv rows, one per round
    failures: list[dict] = field(default_factory=list)
    uplink: int = 0
    downlink_bytes: int = 0
    elapsed_s: float = 0.0

    @property
    def rounds_done(self) -> int:
        return len(self.rows)

    def state_dict(self) -> dict:
        return pack({"global_arrays": self.global_arrays, "downlink": self.downlink.state_dict(),
                     "matrix": self.matrix, "rows": self.rows, "failures": self.failures,
                     "uplink": self.uplink, "downlink_bytes": self.downlink_bytes, "elapsed_s": self.elapsed_s})

    @classmethod
    def from_state_dict(cls, state: dict) -> "ServerState":
        s = unpack(state)
        return cls(s["global_arrays"], DownlinkState.from_state_dict(s["downlink"]), s["matrix"], s["rows"],
                   s["failures"], int(s["uplink"]), int(s["downlink_bytes"]), float(s["elapsed_s"]))


def pack(obj):
    """Numpy arrays and scalars -> tensors and Python numbers, recursively (for weights_only loads)."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj).copy()) if obj.dtype != np.bool_
                else torch.from_numpy(obj.astype(np.uint8)), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(pack(v) for v in obj)
    return obj


def unpack(obj):
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return obj["__ndarray__"].numpy().astype(obj["dtype"], copy=False)
        return {k: unpack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unpack(v) for v in obj)
    return obj
