"""Seeds derived from (seed, task, round, client, ...): one seed fixes the whole run."""
from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """An independent 63-bit seed for each (seed, task, round, client, ...) tuple."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)
