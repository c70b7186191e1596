"""DLC's mechanics: it contains its base, per-task plugins on a frozen base, the weighting unit, the mix, and
what crosses the wire."""

import numpy as np
import pytest
import torch

from fedcl.client.app import client_round
from fedcl.errors import ConfigError
from fedcl.experiment import get_experiment
from fedcl.methods.dlc import CANDIDATES, COUNTS, DLC, STATS, is_base, is_plugin, lda_classifier, plugin_task
from fedcl.methods.replay import Replay
from fedcl.models.backbones import build_model
from fedcl.models.dlc_plugins import PluginLayer

SMALL = ("method=dlc", "dataset=digits", "num_clients=2", "num_tasks=5", "local_epochs=1", "progress=false")


def randomise_plugin(model, task, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers():
            layer.lora_B[task].weight.copy_(0.1 * torch.randn(layer.lora_B[task].weight.shape, generator=g))


def test_each_plugin_gives_its_own_representation_and_the_plain_path_is_the_backbone(make_cfg):
    exp = get_experiment(make_cfg(*SMALL))
    model = exp.new_model()
    plain = exp.new_model(prepared=False)
    x = exp.test_images(np.arange(6))
    assert model.plugin_layers == ["7"]            # the small CNN's last conv
    assert isinstance(model.features[7], PluginLayer)
    # PEFT naming with the task as adapter name, one pair per task
    keys = [k for k in model.state_dict() if is_plugin(k)]
    assert sorted(keys)[:2] == ["features.7.lora_A.0.weight", "features.7.lora_A.1.weight"]
    assert len(keys) == 2 * 5
    model.mode = "plain"
    assert torch.allclose(model(x), plain(x), atol=1e-6)   # same init, same backbone + head
    reps = model.representations(x, 3)
    assert all(torch.allclose(reps[t], plain.features(x), atol=1e-6) for t in range(3))  # B = 0
    randomise_plugin(model, 1)
    reps = model.representations(x, 3)
    assert torch.allclose(reps[0], plain.features(x), atol=1e-6)
    assert torch.allclose(reps[2], plain.features(x), atol=1e-6)
    assert not torch.allclose(reps[1], plain.features(x), atol=1e-3)
    # the weighting unit's softmax covers exactly the plugins in use
    model.mode, model.tasks_in_use = "dlc", 3
    model(x)
    assert model.last_weights.shape == (6, 3)
    assert torch.allclose(model.last_weights.sum(1), torch.ones(6))


def test_resnet18_with_ten_tasks_adds_under_five_percent(make_cfg):
    cfg = make_cfg("method=dlc", "model=resnet18", "num_tasks=10")
    method = DLC(rank=2, alpha=4.0)
    method.bind(10, list(range(0, 101, 10)), cfg)            # 100 classes in 10 tasks (ImageNet-100 style)
    model = method.prepare_model(build_model(cfg.model, 3, 100))
    counts = method.parameter_counts(model)
    assert model.plugin_layers == ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0",
                                   "layer4.1.conv1", "layer4.1.conv2"]
    assert 11_000_000 < counts["backbone"] < 11_300_000      # ResNet-18 without its classifier
    assert counts["plugins_and_weighting_fraction"] <= 0.05
    assert counts["added_fraction"] <= 0.05                   # head rows included
    assert counts["added"] == counts["plugins"] + counts["weighting_unit"] + counts["head_rows"]
    # rank 2 on layer4: 2 x (256*9 + 512 + 3 * (512*9 + 512) + 256 + 512) per task
    assert counts["plugins"] == 10 * 2 * (256 * 9 + 512 + 3 * (512 * 9 + 512) + 256 + 512)


def test_at_initialisation_dlc_predicts_what_its_base_predicts(make_cfg):
    """With the plugins, the weighting unit and the plugin path's head at their initial values, DLC's
    prediction is its base's: at mix 0 by construction, and the plugin path itself equals the base."""
    exp = get_experiment(make_cfg(*SMALL))
    model, m = exp.new_model(), exp.method
    x = exp.test_images(np.arange(64))
    model.mode = "plain"
    base = model(x)[:, :6].argmax(1)
    assert torch.equal(m.predict(model, x, 6), base)
    model.mix.fill_(1.0)                         # the plugin path alone: B = 0, residual head 0, uniform weights
    model.tasks_in_use, model.mode = 3, "dlc"
    assert torch.allclose(model(x), exp.new_model(prepared=False)(x), atol=1e-5)
    assert torch.equal(m.predict(model, x, 6), base)


def test_the_plugin_paths_head_is_a_residual_that_follows_the_base_head(make_cfg):
    """The path classifies with the base head plus its residual: a correction learnt on the base of
    one round still applies when the base head has moved on (as it does in the round after)."""
    cfg = make_cfg(*SMALL, "method.memory_total=40", "method.path_head=sgd", "method.residual=true")
    exp = get_experiment(cfg)
    m, model = exp.method, exp.new_model()
    m.client_update(model, client_round(cfg, 0, 0, 0, "train+plugin+weighting"), {})
    x = exp.test_images(np.arange(32))
    model.tasks_in_use, model.mode = 1, "dlc"
    residual = model.dlc_head.weight.detach().clone()
    assert residual.abs().sum() > 0                  # the residual trained
    before = model(x).detach()
    z = model.representations(x)[0]
    with torch.no_grad():
        moved = torch.randn_like(model.head.weight)
        shift = z @ (moved - model.head.weight).T
        model.head.weight.copy_(moved)
    assert torch.allclose(model(x), before + shift, atol=1e-4)
    at_start = []
    train_plugin = m.train_plugin
    m.train_plugin = lambda net, *a: (at_start.append(net.dlc_head.weight.abs().sum().item()), train_plugin(net, *a))
    m.client_update(model, client_round(cfg, 0, 1, 0, "train+plugin+weighting"), {})
    assert at_start == [0.0]                         # a new task's residual starts afresh


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
def test_train_rounds_train_the_base_exactly_as_the_base_method(make_cfg, model_name):
    """DLC's train rounds are its base method's rounds: the same base, BatchNorm statistics included,
    and no DLC part moves. A shared round trains the same base, and DLC's parts beside it."""
    cfg = make_cfg(*SMALL, f"model={model_name}", "method.memory_total=40")
    exp = get_experiment(cfg)
    dlc, shared, replay, init = exp.new_model(), exp.new_model(), exp.new_model(prepared=False), exp.new_model()
    state_dlc, state_shared, state_replay = {}, {}, {}
    base = Replay(memory_total=40)
    base.bind(5, exp.scenario.task_starts, cfg)
    for task in range(2):
        n = exp.method.client_update(dlc, client_round(cfg, 0, task, 0), state_dlc)
        s = exp.method.client_update(shared, client_round(cfg, 0, task, 0, "train+plugin+weighting"), state_shared)
        m = base.client_update(replay, client_round(cfg, 0, task, 0), state_replay)
        assert n == s == m > 0
    ref, parts = replay.state_dict(), shared.state_dict()
    for k, v in dlc.state_dict().items():
        if is_base(k):
            assert torch.allclose(v, ref[k.replace(".base.", ".")], atol=1e-5), k
            assert torch.allclose(parts[k], ref[k.replace(".base.", ".")], atol=1e-5), k
        else:
            assert torch.equal(v, init.state_dict()[k]), k
    assert not torch.equal(parts["weighting.weight"], init.state_dict()["weighting.weight"])
    assert not torch.equal(parts["features.7.lora_B.1.weight" if model_name == "small_cnn"
                                 else "features.layer4.0.conv1.lora_B.1.weight"], init.state_dict()[
        "features.7.lora_B.1.weight" if model_name == "small_cnn" else "features.layer4.0.conv1.lora_B.1.weight"])
    up = exp.method.payload(dlc, client_round(cfg, 0, 1, 0))
    assert up and all(is_base(k) for k in up)
    up = exp.method.payload(shared, client_round(cfg, 0, 1, 0, "train+plugin+weighting"))
    assert {k for k in up if not is_base(k)} >= {"weighting.weight", STATS}


def test_a_shared_round_trains_dlc_on_the_base_as_received(make_cfg, monkeypatch):
    """DLC's parts in a shared round train on the base the client received: however far the base's
    own training in that round moves it, the plugin, head and weighting unit come out the same."""
    cfg = make_cfg(*SMALL, "method.memory_total=40")
    exp = get_experiment(cfg)
    m = exp.method
    train = m.base.client_update

    def shared_round(shift: float):
        def moved(model, ctx, state):
            n = train(model, ctx, state)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if is_base(name):
                        p.add_(shift)
            return n
        model, state = exp.new_model(), {}
        m.client_update(model, client_round(cfg, 0, 0, 0), state)
        monkeypatch.setattr(m.base, "client_update", moved)
        m.client_update(model, client_round(cfg, 0, 1, 0, "train+plugin+weighting"), state)
        monkeypatch.undo()
        return model.state_dict()

    near, far = shared_round(0.0), shared_round(0.5)
    assert not torch.allclose(near["head.weight"], far["head.weight"])
    for k, v in near.items():
        if not is_base(k):
            assert torch.equal(far[k], v), k


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
def test_plugin_and_weighting_rounds_leave_the_base_and_earlier_plugins_alone(make_cfg, model_name):
    cfg = make_cfg(*SMALL, f"model={model_name}", "method.memory_total=40")
    exp = get_experiment(cfg)
    m = exp.method
    model = exp.new_model()
    with torch.no_grad():        # a base and two earlier plugins that are not at their init
        for k, v in model.state_dict().items():
            if is_base(k) and v.dtype.is_floating_point:
                v.add_(0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(len(k))))
    randomise_plugin(model, 0, seed=1)
    randomise_plugin(model, 1, seed=2)
    g = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    state = {}
    for phase in ("plugin", "weighting"):
        down = m.downlink(g, 2, phase, 0)
        assert not any(is_plugin(k) and plugin_task(k) > 2 for k in down)
        client = exp.new_model()
        m.load_payload(client, down)
        ctx = client_round(cfg, 0, 2, 0, phase)
        assert m.client_update(client, ctx, state) > 0
        after = client.state_dict()
        for k, v in g.items():
            if is_base(k) or (is_plugin(k) and plugin_task(k) < 2):  # parameters and BatchNorm statistics
                assert np.array_equal(after[k].numpy(), v), f"{phase}: {k} changed"
        changed = {k for k in g if not np.array_equal(after[k].numpy(), g[k])}
        up = m.payload(client, ctx)
        if phase == "plugin":
            assert any(is_plugin(k) and plugin_task(k) == 2 for k in changed)
            assert "weighting.weight" not in changed   # lda: the path's head is the base head's copy, untrained
            assert torch.equal(after["dlc_head.weight"], after["head.weight"])
            # ffa: only B of plugin 2 goes up (A stays at its shared seeded value)
            assert all(is_plugin(k) and plugin_task(k) == 2 and ".lora_B." in k for k in up), sorted(up)
        else:
            assert changed == {"weighting.weight", "weighting.bias"}    # its loss moved nothing else
            assert all(p.grad is None for n, p in client.named_parameters() if is_plugin(n))
            assert sorted(up) == [STATS, "weighting.bias", "weighting.weight"]   # and the path's statistics


def test_weighting_round_pulls_weight_to_the_samples_task(make_cfg):
    """On separable per-task representations, the weighting unit's rounds teach it each sample's task."""
    cfg = make_cfg(*SMALL, "num_clients=1", "local_epochs=20", "lr=0.05")
    exp = get_experiment(cfg)
    m, model = exp.method, exp.new_model()
    for t in range(3):
        randomise_plugin(model, t, seed=10 + t)
    rows = np.concatenate(exp.scenario.test_indices[:3])
    x, y = exp.test_images(rows), torch.from_numpy(exp.scenario.y_test[rows])

    def target_weight():
        model.eval()
        model.tasks_in_use = 3
        model.plugin_path(model.representations(x))
        return float(model.last_weights[torch.arange(len(y)), m.task_of(y)].mean())

    assert abs(target_weight() - 1 / 3) < 1e-6          # zero-initialised scorers: uniform weights
    m.client_update(model, client_round(cfg, 0, 2, 0, "weighting"), {})
    assert target_weight() > 0.6


def test_lda_head_is_the_pooled_rows_classifier_with_equal_class_priors():
    """The server's path classifier from summed client statistics: with equal class counts it predicts
    what scikit-learn's LDA (equal priors, no shrinkage) predicts; with one class 100 times rarer it
    still gives that class its share (equal priors), where the counts would bury it."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    rng = np.random.default_rng(0)
    d, means = 6, rng.normal(0, 1.2, (3, 6))

    def rows(counts):
        y = np.repeat(np.arange(3), counts)
        return means[y] + rng.normal(size=(len(y), d)), y

    def stats(z, y):  # what DLC.path_statistics sums on a client
        s = np.zeros((4 + d, d + 1))          # 4 classes in the model, class 3 never seen
        np.add.at(s[:, :d], y, z)
        np.add.at(s[:, d], y, 1.0)
        s[-d:, :d] = z.T @ z
        return s

    z, y = rows([300, 300, 300])
    parts = np.array_split(rng.permutation(len(y)), 3)           # three clients, any split
    w, b = lda_classifier(sum(stats(z[p], y[p]) for p in parts), 0.0)
    pooled = lda_classifier(stats(z, y), 0.0)
    assert np.allclose(w, pooled[0]) and np.allclose(b, pooled[1])
    assert not w[3].any() and b[3] == 0
    zt, yt = rows([500, 500, 500])
    ours = (zt @ w[:3].T + b[:3]).argmax(1)
    ref = LinearDiscriminantAnalysis(priors=np.full(3, 1 / 3)).fit(z, y).predict(zt)
    assert (ours == ref).mean() > 0.995
    z, y = rows([1000, 1000, 10])
    w, b = lda_classifier(stats(z, y), 0.1)
    rare = (zt[yt == 2] @ w[:3].T + b[:3]).argmax(1)
    counted = LinearDiscriminantAnalysis().fit(z, y).predict(zt[yt == 2])  # priors from the counts
    assert (rare == 2).mean() > (counted == 2).mean() + 0.05, ((rare == 2).mean(), (counted == 2).mean())


def test_calibration_picks_the_mix_with_the_lowest_held_out_loss_over_tasks_and_prefers_the_base(make_cfg):
    cfg = make_cfg(*SMALL)
    exp = get_experiment(cfg)
    m = exp.method
    g = m.init_global(exp.new_model())
    k = len(CANDIDATES)

    def scores(per_task):  # {task: (summed NLL per mix, rows)}
        c = np.zeros((5, 2 * k + 1), np.float32)
        for t, (nll, rows) in per_task.items():
            c[t, :k], c[t, -1] = nll, rows
        return c

    # pooled, mix 0 has the lowest loss (many rows of task 0); per task, mix 0.7 at temperature 8
    lin, j = np.linspace(0, 1, k), CANDIDATES.index((0.7, 8.0))
    better = m.aggregate(g, [({COUNTS: scores({0: (100 * (0.1 + 0.1 * lin), 100)})}, 10),
                             ({COUNTS: scores({1: (10 * (1 + np.abs(lin - lin[j])), 10)})}, 10)], 1, "calibrate")
    assert better["mix"][0] == np.float32(0.7) and float(better["temperature"][0]) == 8.0
    assert better["dlc_mix_by_task"][1] == np.float32(0.7) and better["dlc_temperature_by_task"][1] == 8.0
    tie = m.aggregate(g, [({COUNTS: scores({0: (np.full(k, 3.0), 9), 2: (np.full(k, 1.0), 3)})}, 10)], 2,
                      "calibrate")
    assert float(tie["mix"][0]) == 0.0 and float(tie["temperature"][0]) == 1.0
    # a client's calibrate round scores its held-out rows, which no plugin round trained on
    model, state = exp.new_model(), {}
    ctx = client_round(cfg, 0, 1, 0, "calibrate")
    n = m.client_update(model, ctx, state)
    current, held = m.holdout(ctx, state)
    assert n == len(held) > 0 and np.isin(current, exp.scenario.client_indices[1][0]).all()
    c = m.payload(model, ctx)[COUNTS].numpy()
    assert c.shape == (5, 2 * k + 1) and c[:, -1].sum() == n and c[2:].sum() == 0     # tasks 0 and 1 only
    assert c[1, -1] == len(current) and (c[:, k:-1] <= c[:, -1:]).all() and (c[:2, :k] > 0).all()
    path_alone = CANDIDATES.index((1.0, 1.0))  # at init the path predicts what the base does
    assert np.allclose(c[:, 0], c[:, path_alone]) and (c[:, k] == c[:, 2 * k - 1]).all()


def test_config_errors_are_clear(make_cfg):
    with pytest.raises(ConfigError, match="method.base='ewc'"):
        DLC(base="ewc")
    with pytest.raises(ConfigError, match="plugin_rounds=0"):
        DLC(plugin_rounds=0)
    with pytest.raises(ConfigError, match="model=vit"):
        DLC().bind(5, [0, 2, 4, 6, 8, 10], make_cfg("method=dlc", "model=vit"))
    cfg = make_cfg("method=dlc")
    method = DLC(stages=["layer9"])
    method.bind(5, [0, 2, 4, 6, 8, 10], cfg)
    with pytest.raises(ConfigError, match="layer9"):
        method.prepare_model(build_model(cfg.model, 1, 10, 8))


def test_dlc_simulation_sends_only_what_each_round_trains(tmp_path, make_cfg):
    """A real Flower simulation; a recording grid inspects every message's arrays."""
    from tests.test_simulation import recorded_simulation

    cfg = make_cfg("method=dlc", "dataset=digits", "num_clients=3", "num_tasks=2", "rounds_per_task=2",
                   "local_epochs=2", "ray.num_cpus=2", "progress=false", "method.stages=[3,7]", "method.rank=8")
    exp = get_experiment(cfg)
    base_keys = {k for k in exp.new_model().state_dict() if is_base(k)}
    results, log = recorded_simulation(cfg, tmp_path)
    phases = [r["phase"] for r in results["communication"]["per_round"]]
    assert phases == ["train+plugin+weighting", "train+calibrate"] * 2   # no round beyond the base's
    round_of_node = {}
    for direction, node, task, keys in log:
        if direction == "down":
            round_of_node[node] = (task, sum(1 for d, n, _, _ in log[:log.index((direction, node, task, keys))]
                                             if d == "down" and n == node))
        if direction != "up":
            continue
        task, index = round_of_node[node]
        phase = phases[index]
        dlc_keys = {k for k in keys if not is_base(k)}
        assert keys - dlc_keys <= base_keys and keys - dlc_keys, sorted(keys)   # the base, as its method sends it
        if phase == "train+plugin+weighting":
            assert all((is_plugin(k) and plugin_task(k) == task) or k.startswith("weighting.") or k == STATS
                       for k in dlc_keys), dlc_keys                # path_head=lda: the server builds the head
            assert {"weighting.weight", "weighting.bias", STATS} <= dlc_keys
        else:
            assert dlc_keys == {COUNTS}
    params = results["parameters"]
    assert params["added"] == params["plugins"] + params["weighting_unit"] + params["head_rows"]
    d = results["diagnostics"]
    assert {"dlc", "base", "plugin_path", "plugins_off", "oracle_plugin", "task_id"} <= set(d)
    assert len(d["mix_by_task"]) == 2 and len(d["plugin_relative_norm"]) == 2
    assert d["plugin_relative_norm"][1] > 0                       # the plugins trained
    assert results["final_average_accuracy"] == pytest.approx(d["dlc"], abs=0.05)  # per-task mean vs pooled
    assert results["accuracy_matrix"][0][0] > 0.9 and min(results["accuracy_matrix"][1]) > 0.5


def oracle_accuracy(make_cfg, *overrides):
    """One client: the base trains on task 0 only, then task 1's plugin round learns task 1 on that frozen
    base; the plugin path's head on each sample's own plugin."""
    cfg = make_cfg(*SMALL, "num_clients=1", "local_epochs=4", *overrides)
    exp = get_experiment(cfg)
    model, state = exp.new_model(), {}
    for task, phase in [(0, "train"), (0, "plugin"), (1, "plugin")]:
        exp.method.client_update(model, client_round(cfg, 0, task, 0, phase), state)
    rows = np.concatenate(exp.scenario.test_indices[:2])
    x, y = exp.test_images(rows), torch.from_numpy(exp.scenario.y_test[rows])
    return exp.method.diagnostics(model, x, y, 2)["oracle_plugin"]


def test_plugins_carry_task_information(make_cfg):
    """Plugin 1 alone must carry task 1: with the base (trained on task 0 only) and the head frozen
    (method.path_head=sgd, method.head_lr=0), the head on each sample's own plugin beats the same rounds
    with every plugin switched off (method.alpha=0). Measured: 0.66 against 0.50."""
    frozen_head = ("method.path_head=sgd", "method.head_lr=0", "method.plugin_lr=0.1")
    with_plugins = oracle_accuracy(make_cfg, *frozen_head)
    without = oracle_accuracy(make_cfg, *frozen_head, "method.alpha=0")
    assert with_plugins > without + 0.1, (with_plugins, without)
