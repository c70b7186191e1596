"""Moved to ``fedcl.hooks`` (this name stays for existing imports)."""
import sys

import fedcl.hooks

sys.modules[__name__] = fedcl.hooks
