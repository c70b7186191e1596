"""Per-client learner state on disk, so the driver holds none of it and Ray workers share it.

One file per client under the run directory, written atomically; a client's state is loaded only
when that client is sampled. On a multi-machine Ray cluster the run directory must be on a shared
file system.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


class ClientStateStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, client: int) -> Path:
        return self.root / f"client_{client:06d}.pt"

    def load(self, client: int) -> dict:
        path = self.path(client)
        return torch.load(path, weights_only=False) if path.exists() else {}

    def save(self, client: int, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(client)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)
