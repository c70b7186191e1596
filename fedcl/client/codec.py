"""Named arrays <-> Flower ``ArrayRecord``, and the byte count of what a message carries."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict


def to_record(arrays: dict[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    out = OrderedDict()
    for name, value in arrays.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        out[name] = Array(np.require(value, requirements="C"))  # ascontiguousarray would make 0-d arrays 1-d
    return ArrayRecord(out)


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def content_bytes(content: RecordDict) -> int:
    """Bytes of the serialised arrays in a message (what dominates the wire), all records."""
    return sum(len(array.data) for record in content.array_records.values()
               for array in record.values())
