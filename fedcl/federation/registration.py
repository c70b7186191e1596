"""The clients' SuperNodes: waiting for them, knowing which partition each one simulates, and
Flower's simulation engine made to cost per message rather than per node.

A simulation registers all its nodes at start, so a count below ``num_clients`` that has stopped
growing is final: fail after ``STALL_S`` instead of waiting out the overall bound, and name the
command that sets the federation size (since Flower 1.32 a local simulation has 2 SuperNodes).

Which node simulates which partition: when the simulation engine runs in this process
(``run_simulation``), ``install()`` has it remember the node -> partition map it made, and
registration reads it (no messages). Otherwise (``flwr run``) every node is asked once (a handshake).

``install()`` also replaces two per-node costs of the engine (flwr 1.42, ``vce_api``): a Context
for every node built at start (now on a node's first message) and a message pump that asks the
state for each node's messages, each ask scanning every stored message, ten times a second:
O(nodes x messages), 22 CPU seconds per pass at 100,000 nodes with a round's 100 messages pending
(now one scan of the stored messages per pass).
"""
from __future__ import annotations

import functools
import threading
import time
import weakref

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
    partition_of = engine_partitions(grid, float(wait.get("timeout_s", TIMEOUT_S)))
    if partition_of is None:
        mapping = handshake(grid, wait_for_nodes(grid, num_clients, **wait))
    else:
        mapping = {p: n for n, p in partition_of.items()}
    missing = sorted(set(range(num_clients)) - set(mapping))
    if missing:
        raise ConfigError(f"no node simulates partitions {missing[:10]} of num_clients={num_clients}: the "
                          f"federation's SuperNodes must be numbered 0..{num_clients - 1}; set its size with "
                          f"{federation_size_fix(num_clients)}.")
    return mapping


def handshake(grid: Grid, node_ids: list[int]) -> dict[int, int]:
    """Ask every node which partition it simulates (see ``client_app.identify``)."""
    asks = [Message(RecordDict(), message_type="query", dst_node_id=nid) for nid in node_ids]
    mapping = {}
    for reply in grid.send_and_receive(asks):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed the handshake: {reply.error}")
        mapping[int(reply.content["identity"]["partition-id"])] = reply.metadata.src_node_id
    return mapping


# ---- Flower's simulation engine (flwr 1.42 ``flwr.server.superlink.fleet.vce.vce_api``) -------------
# link state -> {node id: partition id} of the engine that registered the nodes, None while it does
_ENGINE_NODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
ENGINE_START_S = 2.0  # the server thread starts just before the engine: its time to begin registering


def engine_partitions(grid: Grid, timeout_s: float = TIMEOUT_S) -> dict[int, int] | None:
    """node id -> partition id once this process's simulation engine has registered every node;
    None when no engine here registers into this grid's state (``flwr run``, or no ``install()``).
    Waiting for the engine instead of counting nodes: a count costs O(nodes) per poll (most of
    registration's time at 1,000,000 nodes)."""
    from flwr.server.superlink.fleet.vce import vce_api

    state = getattr(grid, "state", None)
    started = time.monotonic()
    while True:
        try:
            known = state in _ENGINE_NODES
        except TypeError:  # not weak-referenceable: not an engine's state
            return None
        if known and _ENGINE_NODES[state] is not None:
            return _ENGINE_NODES[state]
        waited = time.monotonic() - started
        if not getattr(vce_api, "_fedcl_patched", False) or (not known and waited > ENGINE_START_S):
            return None
        if waited > timeout_s:
            raise RuntimeError(f"the simulation engine did not register its SuperNodes within {timeout_s:.0f}s")
        time.sleep(0.01)


def install() -> None:
    """Patch the simulation engine of this process (idempotent; call before ``run_simulation``)."""
    from flwr.server.superlink.fleet.vce import vce_api

    if getattr(vce_api, "_fedcl_patched", False):
        return
    vce_api._register_nodes = _remembering(vce_api._register_nodes)
    vce_api._register_node_info_stores = LazyNodeStores
    vce_api.add_messages_to_queue = functools.partial(pump_messages, original=vce_api.add_messages_to_queue)
    vce_api._fedcl_patched = True


def _remembering(register_nodes):
    @functools.wraps(register_nodes)
    def register(num_nodes, state_factory):
        state = state_factory.state()
        _ENGINE_NODES[state] = None
        try:
            _ENGINE_NODES[state] = mapping = register_nodes(num_nodes, state_factory)
        except BaseException:
            del _ENGINE_NODES[state]  # registration falls back to counting nodes and the handshake
            raise
        return mapping

    return register


class LazyNodeStores(dict):
    """node id -> the node's ``DeprecatedRunInfoStore`` (its Context), made on the node's first
    message instead of for all nodes at start: a run holds Contexts only for the clients sampled."""

    def __init__(self, nodes_mapping: dict[int, int], run, app_dir: str | None = None):
        super().__init__()
        self.partition_of, self.run, self.app_dir = nodes_mapping, run, app_dir
        self.num_partitions = len(set(nodes_mapping.values()))
        self.lock = threading.Lock()  # the engine's worker threads ask concurrently

    def __missing__(self, node_id: int):
        from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
        from flwr.compat.client.run_info_store import DeprecatedRunInfoStore

        with self.lock:
            if node_id not in self:
                store = DeprecatedRunInfoStore(node_id=node_id, node_config={
                    PARTITION_ID_KEY: self.partition_of[node_id], NUM_PARTITIONS_KEY: self.num_partitions})
                store.register_context(run_id=self.run.run_id, run=self.run, app_dir=self.app_dir)
                self[node_id] = store
            return dict.__getitem__(self, node_id)


def pump_messages(state, queue, nodes_mapping, f_stop, original=None) -> None:
    """The engine's message pump: every 0.1 s, hand each node at most one undelivered message, as
    Flower's does, with one scan of the stored messages per pass instead of one per node."""
    from flwr.server.superlink.linkstate import InMemoryLinkState
    from flwr.supercore.date import now

    if not isinstance(state, InMemoryLinkState) and original is not None:
        return original(state, queue, nodes_mapping, f_stop)
    while not f_stop.is_set():
        with state.lock:
            state._check_stored_messages(set(state.message_ins_store))  # drops expired ones, as Flower's does
            batch, served = [], set()
            for msg in state.message_ins_store.values():
                node = msg.metadata.dst_node_id
                if msg.metadata.delivered_at == "" and node in nodes_mapping and node not in served:
                    served.add(node)
                    batch.append(msg)
            delivered_at = now().isoformat()
            for msg in batch:
                msg.metadata.delivered_at = delivered_at
        for msg in batch:
            queue.put(msg)
        f_stop.wait(0.1)
