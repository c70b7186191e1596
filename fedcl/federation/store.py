"""Per-client learner state on disk, so the driver holds none of it and Ray workers share it.

One file per client under the run directory, written atomically; a client's state is loaded only
when that client is sampled. On a multi-machine Ray cluster the run directory must be on a shared
file system.

States are stamped with the global round that produced them, and the previous version is kept:
when a killed run is resumed, its interrupted round runs again, and a client that had already
saved that round's state gets the one from before it (``load(client, before_round)``).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch


class ClientStateStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, client: int, previous: bool = False) -> Path:
        return self.root / f"client_{client:06d}{'.prev' if previous else ''}.pt"

    def _read(self, path: Path) -> tuple[int, dict] | None:
        if not path.exists():
            return None
        saved = torch.load(path, weights_only=False)
        return int(saved["round"]), saved["state"]

    def load(self, client: int, before_round: int | None = None) -> dict:
        """The client's latest state produced before global round ``before_round`` (any, if None)."""
        for previous in (False, True):
            saved = self._read(self.path(client, previous))
            if saved is not None and (before_round is None or saved[0] < before_round):
                return saved[1]
        return {}

    def save(self, client: int, state: dict, round: int = 0) -> None:
        """Save the state produced in global round ``round``; the older version becomes ``.prev``."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(client)
        current = self._read(path)
        if current is not None and current[0] < round:
            os.replace(path, self.path(client, previous=True))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        torch.save({"round": int(round), "state": state}, tmp)
        os.replace(tmp, path)


class SharedBlobStore:
    """Content-addressed tensors that many clients hold identical copies of (DualLoRA's frozen
    backbone after the base session): written once per run under ``<run dir>/shared/``, kept in
    each Ray worker's memory after its first read. A client's state keeps only the digest, so its
    file stays small and a worker does not re-read the same megabytes for every client.
    """

    _memory: dict[str, dict[str, torch.Tensor]] = {}  # per process: the worker's cache

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def put(self, tensors: dict[str, torch.Tensor]) -> str:
        """Store (once) and return the digest that names these tensors."""
        digest = hashlib.sha256()
        for key in sorted(tensors):
            value = tensors[key].detach().cpu().contiguous()
            digest.update(key.encode())
            digest.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
            digest.update(value.numpy().tobytes())
        name = digest.hexdigest()[:32]
        path = self.root / f"{name}.pt"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.root)
            os.close(fd)
            torch.save({k: v.detach().cpu().clone() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        return name

    def get(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._memory:
            if len(self._memory) >= 2:  # a run needs one; keep memory bounded across runs
                self._memory.pop(next(iter(self._memory)))
            self._memory[name] = torch.load(self.root / f"{name}.pt", weights_only=True)
        return self._memory[name]
