"""Moved to ``fedcl.aggregation.subspace`` (this name stays for existing imports)."""
import sys

import fedcl.aggregation.subspace

sys.modules[__name__] = fedcl.aggregation.subspace
