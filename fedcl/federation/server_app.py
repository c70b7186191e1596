"""Moved to ``fedcl.server.app`` and ``fedcl.runtime.flwr_run`` (this name stays: a Flower app's
pyproject.toml may name ``fedcl.federation.server_app:app``)."""
from fedcl.runtime.flwr_run import server_app as app  # noqa: F401
from fedcl.server.app import make_server_app, run_server  # noqa: F401
