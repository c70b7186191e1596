"""Moved to ``fedcl.client.app`` and ``fedcl.runtime.flwr_run`` (this name stays: a Flower app's
pyproject.toml may name ``fedcl.federation.client_app:app``, and scripts import ``client_round``)."""
from fedcl.client.app import client_round, make_client_app  # noqa: F401
from fedcl.runtime.flwr_run import client_app as app  # noqa: F401
