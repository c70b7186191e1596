"""Moved to ``fedcl.config`` (composing) and ``fedcl.runtime.flwr_run`` (this name stays for existing imports)."""
from fedcl.config import CONF_DIR, compose_config  # noqa: F401
from fedcl.runtime.flwr_run import config_from_context, run_dir_from_context  # noqa: F401
