"""Moved to ``fedcl.server.evaluation`` (this name stays for existing imports)."""
import sys

import fedcl.server.evaluation

sys.modules[__name__] = fedcl.server.evaluation
