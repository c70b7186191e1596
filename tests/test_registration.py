"""Registration and Flower's simulation engine at many clients: no per-node cost where a per-message
one will do (fedcl.federation.registration), and a partition that is two arrays (fedcl.data.scenario)."""
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api

from fedcl.data.scenario import partition_rows
from fedcl.federation import registration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "simulations"))
from scale_clients import in_memory_engine  # noqa: E402 - the engine scale_clients.py --pieces times


@pytest.fixture
def engine():
    """An in-memory link state and grid as run_simulation sets them up, with the engine patched."""
    return in_memory_engine()


class Queue:
    def __init__(self):
        self.items = []

    def put(self, msg):
        self.items.append(msg)


def passes(n):
    """An f_stop for the pump that lets it run ``n`` passes."""
    answers = iter([False] * n + [True])
    return SimpleNamespace(is_set=lambda: next(answers), wait=lambda seconds: None)


def test_registration_waits_for_the_engines_node_map_without_a_message_or_a_node_count(engine):
    def counted():
        raise AssertionError("registration counted the nodes")  # O(nodes) per poll

    engine.grid.get_node_ids = counted
    made = {}
    later = threading.Timer(0.3, lambda: made.update(vce_api._register_nodes(50, engine.factory)))
    later.start()  # the engine starts registering after the server thread has begun to wait
    mapping = registration.register_clients(engine.grid, 50)
    later.join()
    assert mapping == {p: n for n, p in made.items()} and sorted(mapping) == list(range(50))
    assert not engine.state.message_ins_store  # no handshake was sent


def test_without_the_engine_in_this_process_registration_asks_every_node():
    class RemoteGrid:  # what `flwr run` gives a ServerApp: no engine state here
        def get_node_ids(self):
            return [11, 12]

        def send_and_receive(self, asks):
            self.asked = sorted(m.metadata.dst_node_id for m in asks)
            return [SimpleNamespace(has_error=lambda: False, content={"identity": {"partition-id": p}},
                                    metadata=SimpleNamespace(src_node_id=n)) for p, n in enumerate(self.asked)]

    grid = RemoteGrid()
    assert registration.register_clients(grid, 2) == {0: 11, 1: 12} and grid.asked == [11, 12]


def test_node_contexts_are_made_on_a_nodes_first_message_with_its_partition(engine):
    nodes = vce_api._register_nodes(1000, engine.factory)
    stores = vce_api._register_node_info_stores(nodes_mapping=nodes, run=engine.run)
    assert len(stores) == 0  # nothing per node at start
    node = next(n for n, p in nodes.items() if p == 7)
    context = stores[node].retrieve_context(run_id=engine.run.run_id)
    assert context.node_config["partition-id"] == 7 and context.node_config["num-partitions"] == 1000
    assert stores[node] is stores[node] and len(stores) == 1
    with pytest.raises(KeyError):
        stores[12345]  # not a node of this federation


def test_the_pump_hands_each_node_one_message_per_pass_and_scans_messages_not_nodes(engine):
    nodes = vce_api._register_nodes(20000, engine.factory)
    by_partition = {p: n for n, p in nodes.items()}
    sent = [Message(RecordDict(), message_type="train", dst_node_id=by_partition[c]) for c in [*range(100), 5]]
    engine.grid.push_messages(sent)
    queue = Queue()
    started = time.process_time()
    vce_api.add_messages_to_queue(engine.state, queue, nodes, passes(1))
    first_pass = time.process_time() - started
    assert [m.metadata.message_id for m in queue.items] == [m.metadata.message_id for m in sent[:100]]
    assert all(m.metadata.delivered_at for m in queue.items)
    vce_api.add_messages_to_queue(engine.state, queue, nodes, passes(2))
    assert queue.items[100:] == [sent[100]]  # node 5's second message, in the next pass, once
    assert first_pass < 0.5  # Flower's own pump: about 5 CPU s per pass (it scans every message for each node)


def test_iid_partition_of_many_clients_matches_array_split_and_costs_two_arrays():
    rows = np.arange(0, 300000, 3)
    part = partition_rows(rows, np.zeros(len(rows), np.int64), 40000, SimpleNamespace(name="iid"),
                          np.random.default_rng(5))
    reference = np.array_split(np.random.default_rng(5).permutation(rows), 40000)
    assert len(part) == 40000 and part.sizes().tolist() == [len(r) for r in reference]
    for c in (0, 1, 19999, 39999, -1):
        assert np.array_equal(part[c], np.sort(reference[c]))
    assert part[3].base is not None  # a view of the partition's one array
    with pytest.raises(IndexError):
        part[40000]
