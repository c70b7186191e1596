"""Moved to ``fedcl.aggregation.lora`` (this name stays for existing imports)."""
import sys

import fedcl.aggregation.lora

sys.modules[__name__] = fedcl.aggregation.lora
