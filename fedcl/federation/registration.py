"""Waiting for the clients' SuperNodes: one node per client, with a bound and the fix in the message.

A simulation registers all its nodes at start, so a count below ``num_clients`` that has stopped
growing is final: fail after ``STALL_S`` instead of waiting out the overall bound, and name the
command that sets the federation size (since Flower 1.32 a local simulation has 2 SuperNodes).
"""
from __future__ import annotations

import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedcl.errors import ConfigError

TIMEOUT_S = 300.0  # overall: a slow start (thousands of nodes, a busy or remote Ray cluster)
STALL_S = 5.0      # no new node for this long while some have registered: the federation is complete
POLL_S = 0.2


def federation_size_fix(num_clients: int) -> str:
    """The commands (flwr 1.42) that give a local simulation ``num_clients`` SuperNodes."""
    return (f'`flwr run . --federation-config "num-supernodes={num_clients}" ...` for one run, or '
            f"`flwr federation simulation-config @none/default local --num-supernodes {num_clients}` "
            "to keep it for later runs on that SuperLink")


def wait_for_nodes(grid: Grid, num_clients: int, timeout_s: float = TIMEOUT_S, stall_s: float = STALL_S,
                   poll_s: float = POLL_S) -> list[int]:
    """Node ids once ``num_clients`` have registered; ConfigError when the count stalls short of it."""
    started = changed = time.monotonic()
    count = 0
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        now = time.monotonic()
        if len(node_ids) != count:
            count, changed = len(node_ids), now
        stalled = count > 0 and now - changed > stall_s  # none at all: still starting, use the overall bound
        if stalled or now - started > timeout_s:
            waited = f"no new one for {stall_s:.0f}s" if stalled else f"within {timeout_s:.0f}s"
            fewer = f"; or run with num_clients={count}" if count else ""
            raise ConfigError(
                f"only {count} SuperNodes registered for num_clients={num_clients} ({waited}); fedcl needs one "
                f"SuperNode per client. Under `flwr run`, set the federation size with "
                f"{federation_size_fix(num_clients)}{fewer}.")
        time.sleep(poll_s)
    return node_ids


def register_clients(grid: Grid, num_clients: int, **wait) -> dict[int, int]:
    """Wait until every simulated client has registered; map partition id -> node id."""
    node_ids = wait_for_nodes(grid, num_clients, **wait)
    asks = [Message(RecordDict(), message_type="query", dst_node_id=nid) for nid in node_ids]
    mapping = {}
    for reply in grid.send_and_receive(asks):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed the handshake: {reply.error}")
        mapping[int(reply.content["identity"]["partition-id"])] = reply.metadata.src_node_id
    missing = sorted(set(range(num_clients)) - set(mapping))
    if missing:
        raise ConfigError(f"no node simulates partitions {missing[:10]} of num_clients={num_clients}: the "
                          f"federation's SuperNodes must be numbered 0..{num_clients - 1}; set its size with "
                          f"{federation_size_fix(num_clients)}.")
    return mapping
