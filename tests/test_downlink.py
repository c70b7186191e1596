"""Versioned downlink: a client is sent only what it does not hold, and what it missed when it failed."""
import numpy as np
import pytest

from fedcl.server.downlink import DownlinkState, plan_parcels
from tests.test_simulation import TINY, recorded_simulation


def test_a_client_is_sent_only_arrays_newer_than_its_last_sync():
    s = DownlinkState(versions={"a": 0, "b": 0})
    assert s.stale(1, ["a", "b", "x"]) == ["x"]           # version 0 every client built itself; x is no global
    s.versions.update(a=1, b=1)                            # round 1's aggregation replaced both
    assert s.stale(1, ["a", "b"]) == ["a", "b"]           # never synced: everything that is not initial
    s.mark_synced(1, 2, ["a", "b"])
    assert s.stale(1, ["a", "b"]) == []
    s.versions["a"] = 2                                    # round 2's aggregation replaced a
    assert s.stale(1, ["a", "b"]) == ["a"]
    s.mark_synced(1, 3, ["a"])                             # a round that needed only a
    assert s.stale(1, ["a", "b"]) == ["b"]                # conservative: b is no longer known to be held
    s.mark_synced(1, 4, ["a", "b"])
    s.versions["b"] = 5                                    # client 1 fails round 5: its sync stays at 4
    assert s.stale(1, ["a", "b"]) == ["b"]
    assert DownlinkState.from_state_dict(s.state_dict()) == s


def test_clients_that_need_the_same_arrays_share_one_record():
    s = DownlinkState(versions={"a": 1, "b": 1})
    s.mark_synced(2, 2, ["a", "b"])
    g = {"a": np.zeros(3), "b": np.ones(2)}
    parcels = plan_parcels(s, {0: g, 1: g, 2: g})
    assert parcels[0].arrays is parcels[1].arrays and parcels[0].manifest is parcels[1].manifest
    assert set(parcels[0].arrays.keys()) == {"a", "b"} and len(parcels[2].arrays.keys()) == 0


def test_real_run_sends_no_array_a_client_holds_and_resends_what_a_failed_client_missed(tmp_path, make_cfg):
    cfg = make_cfg(*TINY, "method=duallora", "model.depth=1", "model.embed_dim=16", "num_clients=4",
                   "fraction_train=0.5", "faults.crash=0.5", "local_epochs=1", "num_tasks=5",
                   "rounds_per_task=1")
    results, log = recorded_simulation(cfg, tmp_path, recorder=True)
    rounds = [(m, r) for m, r in log.rounds if m and m[0].metadata.message_type == "train"]
    assert len(rounds) == len(results["communication"]["per_round"])
    holds: dict[int, dict[str, int]] = {}   # client -> key -> version, from what the client was really sent
    resent = skipped = 0
    for messages, replies in rounds:
        ok = {int(r.content["metrics"]["client"]) for r in replies if not r.has_error()
              and int(r.content["metrics"].get("synced", 0))}
        for m in messages:  # a message names its client; the node that runs it is only a slot
            node, sent = int(m.content["config"]["client"]), set(m.content["arrays"].keys())
            manifest = m.content["manifest"]
            mine = holds.setdefault(node, {})
            after = dict(mine)
            for key, version in zip(manifest["keys"], manifest["versions"]):
                if key in sent:
                    assert mine.get(key) != version or version < 0, f"{key} v{version} resent to a holder"
                    resent += mine.get(key) is not None
                else:  # version 0: the initial state every client builds from the seed
                    assert version == 0 or mine.get(key) == version, f"{key} v{version} not sent to {node}"
                    skipped += version > 0
                after[key] = version
            if node in ok:  # a crashed client keeps what it had
                holds[node] = after
    assert skipped > 0 and resent > 0   # arrays were held back, and newer versions did reach holders
    kinds = [f["kind"] for f in results["failures"]]
    assert kinds.count("crash") > 0
    comm = results["communication"]
    assert comm["downlink_bytes_per_client_round"] > 0


def test_a_growing_basis_is_sent_as_its_new_columns_to_a_client_that_holds_an_earlier_one():
    rng = np.random.default_rng(0)
    b1 = rng.standard_normal((6, 2)).astype(np.float32)
    b2 = np.concatenate([b1, rng.standard_normal((6, 3)).astype(np.float32)], axis=1)
    s = DownlinkState(versions={"basis": 0, "head": 0})
    s.bump({"basis": np.zeros((6, 0), np.float32), "head": np.zeros(2)}, {"basis": b1, "head": np.ones(2)}, 1)
    s.mark_synced(0, 2, ["basis", "head"])              # client 0 holds basis v1
    s.bump({"basis": b1, "head": np.ones(2)}, {"basis": b2, "head": np.ones(2)}, 3)
    assert s.growth["basis"] == [(0, 0), (1, 2), (3, 5)]
    parcels = plan_parcels(s, {0: {"basis": b2}, 1: {"basis": b2}})
    tail, whole = parcels[0].arrays["basis"].numpy(), parcels[1].arrays["basis"].numpy()
    assert tail.shape == (6, 3) and np.array_equal(tail, b2[:, 2:])
    assert list(parcels[0].manifest["extends"]) == [1] and list(parcels[0].manifest["held_columns"]) == [2]
    assert np.array_equal(whole, b2)                    # client 1 holds version 0: its 0 columns, so all of it
    s.bump({"basis": b2}, {"basis": b2[:, :4].copy()}, 4)  # not a growth: the chain ends, whole arrays again
    assert "basis" not in s.growth and s.held_prefix(0, "basis") is None
    assert DownlinkState.from_state_dict(s.state_dict()) == s


def test_a_client_appends_the_new_columns_to_the_version_it_holds(tmp_path):
    from fedcl.client.app import hold

    b1 = np.arange(12, dtype=np.float32).reshape(6, 2)
    b2 = np.concatenate([b1, -np.ones((6, 1), np.float32)], axis=1)
    state: dict = {}
    hold(None, str(tmp_path), state, {"basis": b1}, {"keys": ["basis"], "versions": [1], "extends": [-1],
                                                     "held_columns": [0]})
    got = hold(None, str(tmp_path), state, {"basis": b2[:, 2:]}, {"keys": ["basis"], "versions": [3],
                                                                   "extends": [1], "held_columns": [2]})
    assert np.array_equal(got["basis"], b2) and state["held"] == {"basis": 3}
    other: dict = {"held": {"basis": 1}}  # another client holding v1, after v3's file replaced v1's
    again = hold(None, str(tmp_path), other, {"basis": b2[:, 2:]}, {"keys": ["basis"], "versions": [3],
                                                                     "extends": [1], "held_columns": [2]})
    assert np.array_equal(again["basis"], b2)
    with pytest.raises(RuntimeError, match="holds no version"):  # a tail for a version it does not hold
        hold(None, str(tmp_path), {}, {"basis": b2[:, 2:]}, {"keys": ["basis"], "versions": [3], "extends": [1],
                                                             "held_columns": [2]})
