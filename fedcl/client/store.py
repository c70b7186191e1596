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


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file beside ``path``, then rename: a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class ClientStateStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._stamps: dict[int, int | None] = {}  # round of each client's current file, as load saw it

    def path(self, client: int, previous: bool = False) -> Path:
        return self.root / f"client_{client:06d}{'.prev' if previous else ''}.pt"

    def _read(self, path: Path) -> tuple[int, dict] | None:
        if not path.exists():
            return None
        saved = torch.load(path, weights_only=False)
        return int(saved["round"]), saved["state"]

    def load(self, client: int, before_round: int | None = None) -> dict:
        """The client's latest state produced before global round ``before_round`` (any, if None)."""
        current = self._read(self.path(client))
        self._stamps[client] = None if current is None else current[0]
        if current is not None and (before_round is None or current[0] < before_round):
            return current[1]
        previous = self._read(self.path(client, previous=True))
        if previous is not None and (before_round is None or previous[0] < before_round):
            return previous[1]
        return {}

    def save(self, client: int, state: dict, round: int = 0) -> None:
        """Save the state produced in global round ``round``; the older version becomes ``.prev``."""
        path = self.path(client)
        if client in self._stamps:  # load read the current file already: no second read
            stamp = self._stamps[client]
        else:
            current = self._read(path)
            stamp = None if current is None else current[0]
        if stamp is not None and stamp < round:
            os.replace(path, self.path(client, previous=True))
        atomic_save({"round": int(round), "state": state}, path)
        self._stamps[client] = int(round)


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
            atomic_save({k: v.detach().cpu().clone() for k, v in tensors.items()}, path)
        return name

    def get(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._memory:
            if len(self._memory) >= 2:  # a run needs one; keep memory bounded across runs
                self._memory.pop(next(iter(self._memory)))
            self._memory[name] = torch.load(self.root / f"{name}.pt", weights_only=True)
        return self._memory[name]


class HeldArrays:
    """The global arrays clients hold, by (key, version): what a versioned downlink does not resend.

    Every client that holds version v of a key holds the same array, so the simulator stores it
    once per run under ``<run dir>/shared/held/`` (written by the first client that receives it)
    and once per Ray worker's memory, instead of once per client. A client's own state records
    which version of each key it holds (``state["held"]``): the proof that it really received it.
    When version v of a key is written, older versions of that key are deleted: a client holding
    an older one is always sent the new one (see ``fedcl.server.downlink``).
    """

    _memory: dict[tuple[str, str, int], object] = {}  # per process: (root, key, version) -> array
    _memory_limit = 512

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, key: str, version: int) -> Path:
        name = hashlib.sha1(key.encode()).hexdigest()[:20]
        return self.root / f"{name}.v{version}.npy"

    def put(self, key: str, version: int, array) -> None:
        import numpy as np

        path = self._path(key, version)
        if version < 0 or path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
        os.replace(tmp, path)
        for old, stored in self._stored(key).items():
            if old < version:
                stored.unlink(missing_ok=True)

    def _stored(self, key: str) -> dict[int, Path]:
        """version -> file of every stored version of ``key``."""
        name = self._path(key, 0).name.split(".v")[0]
        return {int(p.name.rsplit(".v", 1)[1][:-4]): p for p in self.root.glob(f"{name}.v*.npy")}

    def prefix(self, key: str, version: int, columns: int):
        """Version ``version`` of a growing array (one that only gains columns, see
        ``fedcl.server.downlink``): its file, or the first ``columns`` of a later version's, which
        hold the same values (the server sends a growing array as new columns only if they do)."""
        if self._path(key, version).exists() or (str(self.root), key, int(version)) in self._memory:
            return self.get(key, version)
        later = [v for v in self._stored(key) if v > version]
        if not later:
            return self.get(key, version)  # the error that says it is missing
        return self.get(key, max(later))[:, :columns]

    def get(self, key: str, version: int):
        import numpy as np

        slot = (str(self.root), key, int(version))
        if slot not in self._memory:
            path = self._path(key, version)
            if not path.exists():
                raise RuntimeError(f"a client was not sent {key} (version {version}) and does not hold it: "
                                   f"{path} is missing. The run directory's shared/held folder must not be "
                                   "removed while a run uses it.")
            if len(self._memory) >= self._memory_limit:
                self._memory.pop(next(iter(self._memory)))
            self._memory[slot] = np.load(path, allow_pickle=False)
        return self._memory[slot]
