"""InfLoRA's mechanics: designed, frozen A_t off the old subspace; only B_t and head rows train."""
import numpy as np
import pytest
import torch

from fedcl.client.app import client_round
from fedcl.errors import ConfigError
from fedcl.experiment import get_experiment

SMALL = ("method=inflora", "num_clients=2", "num_tasks=2", "rounds_per_task=1", "model.depth=2",
         "model.embed_dim=32", "local_epochs=1")


def orthonormal(d, k, seed=0):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))[0]


@pytest.mark.parametrize("aggregation", ["svd", "covariance"])
def test_designed_A_is_off_the_old_subspace_and_takes_the_strongest_new_directions(make_cfg, aggregation):
    cfg = make_cfg(*SMALL, f"strategy.basis_aggregation={aggregation}")
    m = get_experiment(cfg).method
    d, rng = 32, np.random.default_rng(1)
    old = orthonormal(d, 10)
    new = orthonormal(d, 20, seed=2)
    new = np.linalg.qr(new - old @ (old.T @ new))[0][:, :2]   # two directions outside the old subspace
    replies = []
    for _ in range(3):  # clients: strong inputs in the old subspace, weaker ones in the new directions
        x = rng.normal(size=(200, 10)) @ old.T * 10 + rng.normal(size=(200, 2)) * [3.0, 2.0] @ new.T
        x += rng.normal(size=(200, d)) * 0.01
        if aggregation == "covariance":
            replies.append(({"cov.L": x.T @ x}, 200))
        else:
            u, s, _ = np.linalg.svd(x.T, full_matrices=False)
            replies.append(({"U.L": u[:, :32].astype(np.float16), "s.L": s[:32].astype(np.float32)}, 200))
    a = m.design_A(replies, "L", old)
    assert a.shape == (m.rank, d)
    assert np.abs(a @ old).max() < 1e-6                                    # interference-free by design
    np.testing.assert_allclose(a @ a.T, np.eye(m.rank), atol=1e-3)         # orthonormal rows
    # the new task's own directions come first (not the old subspace's far stronger ones)
    assert np.linalg.norm(a[:2] @ new, axis=1).min() > 0.98


def test_a_federated_task_designs_A_freezes_it_and_trains_only_B_and_its_head_rows(make_cfg):
    cfg = make_cfg(*SMALL)
    exp = get_experiment(cfg)
    m = exp.method
    model = exp.new_model()
    assert not any(".lora_A" in name for name, _ in model.named_parameters())  # a buffer: never trained
    g = m.init_global(model)
    backbone = {k for k in g if m.is_backbone(k)}
    names = list(m.layers(model))
    state = {0: {}, 1: {}}
    for task in range(2):
        for rnd, phase in enumerate(m.phases(task, 1)):
            replies = []
            for c in range(2):
                down = m.downlink(g, task, phase, c)
                assert not any(k.endswith(".old_basis") for k in down)   # M stays on the server
                if task == 1:
                    assert not backbone & set(down)
                cm = exp.new_model()
                m.load_payload(cm, down)
                ctx = client_round(cfg, c, task, rnd, phase)
                if "backbone" in state[c]:  # what client_update loads first: compare against it
                    cm.load_state_dict(state[c]["backbone"], strict=False)
                before = {k: v.clone() for k, v in cm.state_dict().items()}
                n = m.client_update(cm, ctx, state[c])
                after = cm.state_dict()
                if task == 1 and phase == "train":
                    changed = {k for k in after if not torch.equal(before[k], after[k])}
                    assert changed == {f"{name}.lora_B.1" for name in names} | {"head.weight", "head.bias"}
                    rows = (before["head.weight"] != after["head.weight"]).any(1).nonzero().flatten()
                    assert set(rows.tolist()) <= set(range(m.starts[1], m.starts[2]))
                    for name in names:
                        assert torch.equal(after[f"{name}.lora_A"], torch.from_numpy(g[f"{name}.lora_A"]))
                up = {k: v.detach().numpy().copy() for k, v in m.payload(cm, ctx).items()}
                if task == 1:
                    assert not set(up) & backbone and not any(".lora_A" in k for k in up)
                replies.append((up, n))
            g = m.aggregate(g, [r for r in replies if r[1] > 0], task, phase)
            if (task, phase) == (0, "basis_end"):
                protected = {name: g[f"{name}.old_basis"].copy() for name in names}
            if (task, phase) == (1, "basis_start"):
                designed = {name: g[f"{name}.lora_A"][1].copy() for name in names}
    for name in names:
        old, a = protected[name], g[f"{name}.lora_A"][1]
        assert np.abs(old).sum() > 0 and np.abs(a).sum() > 0
        assert np.abs(a @ old).max() < 1e-5                      # A_1 is off task 0's subspace
        assert np.array_equal(a, designed[name])                 # and unchanged by training
        assert np.abs(g[f"{name}.lora_A"][0]).sum() == 0         # the base session has no branch
        assert np.abs(g[f"{name}.lora_B.1"]).sum() > 0           # B_1 did learn
        assert np.abs(g[f"{name}.old_basis"]).sum() > np.abs(old).sum()  # M grew after task 1


def test_classifier_alignment_makes_rows_of_different_tasks_comparable(make_cfg):
    m = get_experiment(make_cfg(*SMALL)).method                  # 10 classes: task 0 = 0..4, task 1 = 5..9
    rng, d = np.random.default_rng(0), 32
    means = rng.normal(size=(10, d)) * 0.5
    g = {"class_mean": means.astype(np.float32), "class_cov": np.tile(np.eye(d, dtype=np.float32) * 0.05, (10, 1, 1)),
         "head.weight": means.astype(np.float32), "head.bias": -0.5 * (means ** 2).sum(1).astype(np.float32)}
    g["head.bias"][5:] += 7.0                                     # task 1's rows, trained alone, win many samples
    y = np.repeat(np.arange(10), 50)
    x = means[y] + rng.normal(size=(500, d)) * 0.05 ** 0.5

    def accuracy(arrays):
        return float(((x @ arrays["head.weight"].T + arrays["head.bias"]).argmax(1) == y).mean())

    assert accuracy(g) < 0.7
    aligned, bias = dict(g), g["head.bias"].copy()
    m.align_classifier(aligned, 1)
    assert accuracy(aligned) > 0.92
    assert np.array_equal(g["head.bias"], bias)                  # the global arrays were not written in place


def test_inflora_simulation_learns_both_tasks(tmp_path, make_cfg):
    from fedcl.cli import run_experiment

    cfg = make_cfg("method=inflora", "num_clients=3", "num_tasks=2", "rounds_per_task=2", "local_epochs=2",
                   "model.depth=2", "model.embed_dim=32", "ray.num_cpus=2", "progress=false")
    results = run_experiment(cfg, str(tmp_path))
    phases = [r["phase"] for r in results["communication"]["per_round"]]
    assert phases == ["train", "train", "basis_end", "basis_start", "train", "train", "basis_end"]
    first, last = results["accuracy_matrix"]
    # measured with ca_epochs=5: final row 0.81 / 0.43 (5 classes per task, chance 0.1 over the seen ones). A method
    # that forgets (finetune: task 0 -> 0) or whose new rows never win (task 1 -> 0) misses these floors
    assert first[0] > 0.8
    assert last[0] > 0.6 and last[1] > 0.3 and results["final_average_accuracy"] > 0.55


def test_clear_errors(make_cfg):
    with pytest.raises(ConfigError, match="model=vit"):
        get_experiment(make_cfg("method=inflora", "model=small_cnn"))
    with pytest.raises(ConfigError, match="method.threshold"):
        get_experiment(make_cfg("method=inflora", "method.threshold=1.5"))
