"""ContinualStrategy: a Flower Strategy whose round is testable with fake replies, and a user's own ServerApp."""
import json

import numpy as np
import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedcl.client.codec import to_record

TINY = ["method=finetune", "num_clients=4", "num_tasks=2", "rounds_per_task=1", "local_epochs=1",
        "dataset=digits", "ray.num_cpus=2", "progress=false", "model.width=8"]


def test_continual_strategy_is_a_flower_strategy():
    from fedcl import ContinualStrategy

    assert issubclass(ContinualStrategy, Strategy)


def reply(msg, arrays, n=10, client=0):
    content = RecordDict({"arrays": to_record(arrays),
                          "metrics": MetricRecord({"num-examples": n, "client": client, "synced": 1})})
    return Message(content, reply_to=msg)


@pytest.fixture(autouse=True)
def server_identity():
    """What a running ServerApp has set before a strategy builds messages (Flower's own tests do the same)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: getattr(TaskIdentity, f"_{k}", None) for k in ("run_id", "node_id", "task_id")}
    for k, v in {"run_id": 1, "node_id": 0, "task_id": 1}.items():
        setattr(TaskIdentity, f"_{k}", v)
    yield
    for k, v in saved.items():
        setattr(TaskIdentity, f"_{k}", v)


def pushed(messages):
    """Give messages ids as a grid's push does (error replies name their client only by the id of
    the message they answer)."""
    for i, m in enumerate(messages):
        m.metadata.__dict__["_message_id"] = f"message-{i}"
    return messages


@pytest.fixture
def strategy(tmp_path):
    from fedcl import ContinualStrategy

    return ContinualStrategy.from_overrides(TINY, run_dir=str(tmp_path))


def test_aggregate_train_screens_fake_replies_and_averages_the_rest(strategy):
    messages = pushed(strategy.configure_train(1, None, None, grid=None))
    assert [m.content["config"]["client"] for m in messages] == [0, 1, 2, 3]  # clients are data, not nodes
    g = strategy.state.global_arrays
    key = next(k for k, v in g.items() if v.dtype == np.float32 and v.size > 1)
    ups = [{k: v + c for k, v in g.items()} for c in range(4)]
    ups[2][key] = np.full_like(g[key], np.nan)
    replies = [reply(messages[0], ups[0], 10, 0), reply(messages[1], ups[1], 30, 1), reply(messages[2], ups[2], 10, 2),
               Message(Error(code=0, reason="Exception: the client raised"), reply_to=messages[3])]
    arrays, counters = strategy.aggregate_train(1, replies)
    new = strategy.state.global_arrays
    assert np.allclose(new[key], g[key] + 0.75)  # (0 * 10 + 1 * 30) / 40: the NaN reply never counts
    assert [(f["client"], f["kind"]) for f in strategy.state.failures] == [(2, "nan"), (3, "crash")]
    assert counters["clients-ok"] == 2 and set(arrays.keys()) == set(new)  # every global array, as Flower expects
    assert np.array_equal(arrays[key].numpy(), new[key])
    assert strategy.state.downlink.versions[key] == 1 and not new[key].flags.writeable
    # round 2: the crashed client was never synced, so it gets everything; so do the others (FedAvg changed all)
    second = strategy.configure_train(2, arrays, None, grid=None)
    assert all(set(m.content["arrays"].keys()) == set(new) for m in second)


def test_configure_train_uses_the_arrays_it_is_given(strategy):
    """A wrapper that changes the aggregate (as Flower's DP wrappers do) changes what clients get."""
    from flwr.app import ArrayRecord

    messages = strategy.configure_train(1, strategy.initial_arrays(), None, grid=None)
    g = strategy.state.global_arrays
    arrays, _ = strategy.aggregate_train(1, [reply(m, g, 10, c) for c, m in enumerate(messages)])
    key = next(k for k, v in g.items() if v.dtype == np.float32 and v.size > 1)
    changed = ArrayRecord({**{k: arrays[k] for k in arrays.keys()}, key: to_record({key: g[key] + 1})[key]})
    second = strategy.configure_train(2, changed, None, grid=None)
    assert np.array_equal(strategy.state.global_arrays[key], g[key] + 1)
    assert all(np.array_equal(m.content["arrays"][key].numpy(), g[key] + 1) for m in second)
    assert strategy.state.downlink.versions[key] == 1


class TwoNodes:
    """The part of a Grid that configure_train uses: a federation of two SuperNodes."""

    def get_node_ids(self):
        return [71, 42]


def test_a_round_spreads_its_clients_over_the_nodes_and_each_message_names_its_client(tmp_path):
    from fedcl import ContinualStrategy

    s = ContinualStrategy.from_overrides([*TINY, "num_clients=5"], run_dir=str(tmp_path))
    messages = s.configure_train(1, s.initial_arrays(), None, grid=TwoNodes())
    assert [m.content["config"]["client"] for m in messages] == [0, 1, 2, 3, 4]
    assert [m.metadata.dst_node_id for m in messages] == [42, 71, 42, 71, 42]


def test_aggregation_rule_objects_are_passed_explicitly(tmp_path):
    from fedcl import ContinualStrategy
    from fedcl.aggregation.rules import Krum

    s = ContinualStrategy.from_overrides([*TINY, "num_clients=5", "aggregator=krum", "aggregator.byzantine=1"],
                                         run_dir=str(tmp_path))  # Krum needs n > 2f + 2
    assert isinstance(s.rule, Krum) and s.rule.byzantine == 1
    messages = s.configure_train(1, None, None, grid=None)
    g = s.state.global_arrays
    ups = [{k: (v + 0.01 * c if v.dtype.kind == "f" else v) for k, v in g.items()} for c in range(3)]
    ups.append({k: (v * 1e3 if v.dtype.kind == "f" else v) for k, v in g.items()})  # passes no norm check alone
    s.cfg.strategy.max_norm_ratio = None
    s.aggregate_train(1, [reply(m, u, 10, c) for c, (m, u) in enumerate(zip(messages, ups))])
    new = s.state.global_arrays
    assert any(all(np.array_equal(new[k], u[k]) for k in g) for u in ups[:3])  # one honest update, whole


USER_APP = '''
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from fedcl import ContinualStrategy

strategy = ContinualStrategy.from_overrides(OVERRIDES, run_dir=RUN_DIR)
app = ServerApp()


@app.main()
def main(grid, context):
    strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=strategy.num_rounds)


run_simulation(server_app=app, client_app=strategy.client_app(), num_supernodes=2,
               backend_config=strategy.backend_config())
'''


def test_flowers_own_loop_in_a_users_server_app_gives_fedcls_accuracy_matrix(tmp_path):
    from fedcl.cli import run_experiment
    from fedcl.config import compose_config

    assert len(USER_APP.strip().splitlines()) <= 16  # the README's example, as a user would write it
    overrides = [*TINY, "num_clients=3", "rounds_per_task=2", "fraction_train=0.67"]
    run_dir = tmp_path / "user"
    exec(compile(USER_APP, "user_app.py", "exec"), {"OVERRIDES": overrides, "RUN_DIR": str(run_dir)})
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 2 and results["accuracy_matrix"][0][0] > 0.3
    assert (run_dir / "metrics.csv").exists()
    fedcl = run_experiment(compose_config(overrides), str(tmp_path / "fedcl"))
    assert results["accuracy_matrix"] == fedcl["accuracy_matrix"]  # 3 clients on 2 SuperNodes, and on 2
    assert results["communication"]["downlink_bytes"] == fedcl["communication"]["downlink_bytes"]


def test_a_users_callback_admits_clients_and_adds_columns(tmp_path):
    from fedcl import ContinualStrategy
    from fedcl.hooks import ServerCallback

    class OnlyEven(ServerCallback):
        def admit(self, clients, plan):
            return [c for c in clients if c % 2 == 0]

        def client_config(self, client, plan):
            return {"note": f"client {client}"}

    s = ContinualStrategy.from_overrides(TINY, run_dir=str(tmp_path), callbacks=[OnlyEven()])
    messages = s.configure_train(1, None, None, grid=None)
    assert [m.content["config"]["client"] for m in messages] == [0, 2]
    assert messages[1].content["config"]["note"] == "client 2"


def test_updates_beyond_the_memory_budget_wait_on_disk_and_aggregate_to_the_same_arrays(tmp_path, monkeypatch):
    from fedcl import ContinualStrategy
    from fedcl.server import spool as spool_module
    from fedcl.server.spool import ReplySpool, SpooledUpdate

    monkeypatch.setattr(spool_module, "SMALL_BYTES", 0)  # the small CNN's arrays, too, are read from disk
    results = []
    for budget in ("null", "0"):  # all in memory; every update spooled
        s = ContinualStrategy.from_overrides([*TINY, f"strategy.reply_memory_mb={budget}"],
                                             run_dir=str(tmp_path / budget))
        messages = s.configure_train(1, None, None, grid=None)
        g = s.state.global_arrays
        rng = np.random.default_rng(0)
        ups = [{k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in g.items()} for _ in range(4)]
        s.aggregate_train(1, [reply(m, u, 10 + c, c) for c, (m, u) in enumerate(zip(messages, ups))])
        results.append(s.state.global_arrays)
        assert not (tmp_path / budget / "spool").exists()  # cleared after the round
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])  # bit for bit
    spool = ReplySpool(tmp_path / "spool", memory_mb=0)
    big = {"w": np.arange(40000, dtype=np.float32).reshape(200, 200), "b": np.ones(3, np.float32)}
    held = spool.add(0, big)
    assert isinstance(held, SpooledUpdate) and list(held) == ["w", "b"] and spool.spooled == 1
    assert isinstance(held["w"], np.memmap) and np.array_equal(held["w"], big["w"])
    assert np.array_equal(held["b"], big["b"])


STATS_METHOD = '''
"""A method of a user's own: fine-tuning whose clients also send how many rows of each class they hold."""
import numpy as np

from fedcl.methods.base import RELEASE, UPDATE, Method


class WithCounts(Method):
    def __init__(self, name: str = "with_counts"):
        super().__init__(name)
        self.counts_seen = []

    def array_role(self, key):
        return RELEASE if key == "class_counts" else UPDATE

    def aggregate(self, global_arrays, replies, task, phase, rule=None):
        self.counts_seen = [np.array(r["class_counts"]) for r, _ in replies]
        updates = [({k: r[k] for k in r if k != "class_counts"}, n) for r, n in replies]
        return super().aggregate(global_arrays, updates, task, phase, rule=rule)
'''


def test_a_release_a_method_declares_passes_screening_untouched_while_its_updates_are_screened(tmp_path, monkeypatch):
    """Screening reads what an array is from the method's declaration (``array_role``), not from its
    name: a large client's class counts are a release and pass; an update ten times the round's
    median does not. Ignoring the declaration would reject the large client too."""
    from fedcl import ContinualStrategy

    package = tmp_path / "users_counts"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "counts.py").write_text(STATS_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    s = ContinualStrategy.from_overrides([*TINY, "num_clients=5", "method._target_=users_counts.counts.WithCounts",
                                          "method.name=with_counts"], run_dir=str(tmp_path / "run"))
    messages = pushed(s.configure_train(1, None, None, grid=None))
    g = s.state.global_arrays
    ups = [{**{k: (v + 0.01 * (c + 1) if v.dtype.kind == "f" else v) for k, v in g.items()},
            "class_counts": np.array([5.0, 7.0])} for c in range(5)]
    ups[3]["class_counts"] = np.array([4e6, 6e6])  # a client with a million times the data
    ups[4] = {**{k: (v * 1e3 + 1 if v.dtype.kind == "f" else v) for k, v in g.items()},
              "class_counts": np.array([5.0, 7.0])}
    s.aggregate_train(1, [reply(m, u, 10, c) for c, (m, u) in enumerate(zip(messages, ups))])
    assert [(f["client"], f["kind"]) for f in s.state.failures] == [(4, "norm")]
    assert [c.tolist() for c in s.method.counts_seen] == [[5.0, 7.0]] * 3 + [[4e6, 6e6]]  # as sent


def test_a_role_that_is_not_one_fails_and_fedavg_refuses_releases_it_cannot_average():
    from fedcl.methods.base import BASIS, Method, role_of

    class Misspelt(Method):
        def array_role(self, key):
            return "relaese"

    class Bases(Method):
        def array_role(self, key):
            return BASIS if key.startswith("U.") else "update"

    with pytest.raises(ValueError, match="a role is one of"):
        role_of(Misspelt("m"), "w")
    replies = [({"w": np.ones(2), "U.x": np.eye(2)}, 1)]
    with pytest.raises(NotImplementedError, match=r"\['U.x'\] as 'basis'"):
        Bases("b").aggregate({"w": np.zeros(2)}, replies, 0, "train")
    with pytest.raises(TypeError, match="array_role"):
        type("Old", (Method,), {"varies_across_clients": lambda self, key: True})
