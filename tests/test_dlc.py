"""DLC's mechanics: per-task plugins, the weighting unit, the frozen base, and what crosses the wire."""

import numpy as np
import pytest
import torch

from fedcl.errors import ConfigError
from fedcl.experiment import get_experiment
from fedcl.federation.client_app import client_round
from fedcl.methods.dlc import DLC, is_base, is_plugin, plugin_task
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


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
def test_base_rounds_train_the_base_exactly_as_the_base_method(make_cfg, model_name):
    """The plugin path's loss stops at the base: DLC's base follows plain replay's trajectory, BatchNorm
    running statistics included (plugin forwards must not move them)."""
    cfg = make_cfg(*SMALL, f"model={model_name}", "method.freeze_base_after=1")
    exp = get_experiment(cfg)
    dlc, replay = exp.new_model(), exp.new_model(prepared=False)
    state_dlc, state_replay = {}, {}
    for task in range(2):
        n = exp.method.client_update(dlc, client_round(cfg, 0, task, 0), state_dlc)
        m = Replay(memory_per_class=5).client_update(replay, client_round(cfg, 0, task, 0), state_replay)
        assert n == m > 0
    ref = replay.state_dict()
    for k, v in dlc.state_dict().items():
        if is_base(k):
            assert torch.allclose(v, ref[k.replace(".base.", ".")], atol=1e-5), k
    assert any(not torch.allclose(v, exp.new_model().state_dict()[k]) for k, v in dlc.state_dict().items()
               if is_plugin(k) and plugin_task(k) == 1)       # while the plugin did train


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
def test_frozen_base_training_changes_neither_the_base_nor_earlier_plugins(make_cfg, model_name):
    cfg = make_cfg(*SMALL, f"model={model_name}", "method.freeze_base_after=0")
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
    state = {"base": {k: v.clone() for k, v in model.state_dict().items() if is_base(k)}}
    down = m.downlink(g, 2, "train", 0)
    assert not any(is_base(k) for k in down)                   # the frozen base does not travel
    assert not any(is_plugin(k) and plugin_task(k) > 2 for k in down)
    client = exp.new_model()
    m.load_payload(client, down)
    ctx = client_round(cfg, 0, 2, 0)
    assert m.client_update(client, ctx, state) > 0
    after = client.state_dict()
    for k, v in g.items():
        if is_base(k):               # parameters and BatchNorm statistics alike
            assert np.array_equal(after[k].numpy(), v), f"base array {k} changed"
        elif is_plugin(k) and plugin_task(k) < 2:
            assert np.array_equal(after[k].numpy(), v), f"earlier plugin {k} changed"
    assert any(not np.array_equal(after[k].numpy(), g[k]) for k in g if is_plugin(k) and plugin_task(k) == 2)
    assert not np.array_equal(after["weighting.weight"].numpy(), g["weighting.weight"])
    up = m.payload(client, ctx)
    assert all((is_plugin(k) and plugin_task(k) == 2) or k.startswith(("weighting.", "dlc_head_rows."))
               for k in up), sorted(up)
    assert up["dlc_head_rows.weight"].shape[0] == exp.scenario.seen_classes(2)  # replay: all seen rows


def test_weighting_loss_pulls_weight_to_the_samples_task(make_cfg):
    """Trained on separable per-task representations, the weighting unit picks the target plugin."""
    exp = get_experiment(make_cfg(*SMALL))
    m, model = exp.method, exp.new_model()
    for t in range(3):
        randomise_plugin(model, t, seed=10 + t)
    ctx = client_round(make_cfg(*SMALL), 0, 2, 0)
    x = exp.train_images(np.arange(300), torch.device("cpu"))
    y = torch.from_numpy(exp.scenario.y_train[:300])
    keep = y < exp.scenario.seen_classes(2)
    x, y = x[keep], y[keep]
    model.tasks_in_use, model.mode = 3, "dlc"
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("weighting."))
    opt = torch.optim.SGD(model.weighting.parameters(), lr=0.05, momentum=0.9)

    def target_weight():
        w = m.plugin_weights(model, x, 3)
        return float(w[torch.arange(len(y)), m.task_of(y)].mean())

    before = target_weight()
    assert abs(before - 1 / 3) < 1e-6          # zero-initialised scorers: uniform weights
    model.train()
    for _ in range(60):
        opt.zero_grad()
        model.tasks_in_use, model.mode = 3, "dlc"
        m.plugin_loss(model, x, y, ctx, {}, frozen=True).backward()
        opt.step()
    after = target_weight()
    assert after > 0.6


def test_config_errors_are_clear(make_cfg):
    with pytest.raises(ConfigError, match="method.base='ewc'"):
        DLC(base="ewc")
    with pytest.raises(ConfigError, match="model=vit"):
        DLC().bind(5, [0, 2, 4, 6, 8, 10], make_cfg("method=dlc", "model=vit"))
    cfg = make_cfg("method=dlc")
    method = DLC(stages=["layer9"])
    method.bind(5, [0, 2, 4, 6, 8, 10], cfg)
    with pytest.raises(ConfigError, match="layer9"):
        method.prepare_model(build_model(cfg.model, 1, 10, 8))


def test_dlc_simulation_sends_only_plugins_weighting_and_head_rows_after_the_freeze(tmp_path, make_cfg):
    """A real Flower simulation; a recording grid inspects every message's arrays."""
    from tests.test_simulation import recorded_simulation

    cfg = make_cfg("method=dlc", "dataset=digits", "num_clients=3", "num_tasks=2", "rounds_per_task=2",
                   "local_epochs=2", "ray.num_cpus=2", "progress=false", "method.freeze_base_after=0",
                   "method.stages=[3,7]", "method.rank=8")
    exp = get_experiment(cfg)
    base_keys = {k for k in exp.new_model().state_dict() if is_base(k)}
    results, log = recorded_simulation(cfg, tmp_path)
    assert [r["phase"] for r in results["communication"]["per_round"]] == \
        ["train", "train", "base_end", "train", "train"]
    task_of_reply = {}
    for direction, node, task, keys in log:
        if direction == "down":
            task_of_reply[node] = task
        task = task_of_reply[node]
        if task == 0 and direction == "up":      # before the freeze the whole base goes up (counted);
            assert base_keys <= keys or not keys  # base_end replies carry nothing
        if task >= 1:
            assert not keys & base_keys, f"base arrays crossed the wire ({direction}, task {task})"
        if task >= 1 and direction == "up":
            for k in keys:
                assert (is_plugin(k) and plugin_task(k) == 1) or k.startswith(("weighting.", "dlc_head_rows.")), k
    assert sum(1 for d, _, _, keys in log if d == "up" and not keys) == 3
    # the base_end round reached every client with the whole base
    last_base = [keys for d, node, task, keys in log if d == "down" and task == 0][-3:]
    assert all(base_keys <= keys for keys in last_base)
    comm = results["communication"]
    assert comm["uplink_bytes_per_client_round"] < comm["full_model_bytes"] / 5
    params = results["parameters"]
    assert params["added"] == params["plugins"] + params["weighting_unit"] + params["head_rows"]
    assert 0 < params["added_fraction"] < 0.5
    # it learns: both tasks well above chance (10 classes seen: 0.1) after the freeze
    assert results["accuracy_matrix"][0][0] > 0.9
    assert min(results["accuracy_matrix"][1]) > 0.3, results["accuracy_matrix"]
    assert len(list((tmp_path / "client_state").glob("client_??????.pt"))) == 3


def frozen_base_diagnostics(make_cfg, *overrides):
    """One client: task 0 trains the base, base_end freezes it, task 1 trains plugin 1 on it."""
    cfg = make_cfg(*SMALL, "num_clients=1", "local_epochs=4", "method.freeze_base_after=0", *overrides)
    exp = get_experiment(cfg)
    model, state = exp.new_model(), {}
    for task, phase in [(0, "train"), (0, "base_end"), (1, "train")]:
        exp.method.client_update(model, client_round(cfg, 0, task, 0, phase), state)
    rows = np.concatenate(exp.scenario.test_indices[:2])
    x, y = exp.test_images(rows), torch.from_numpy(exp.scenario.y_test[rows])
    return exp.method.diagnostics(model, x, y, 2)


def test_plugins_beat_the_same_head_without_them_on_a_frozen_base(make_cfg):
    """The plugin path must add accuracy: with the base frozen after task 0, DLC's head on each sample's
    own plugin beats the same training with every plugin switched off (method.alpha=0)."""
    with_plugins = frozen_base_diagnostics(make_cfg)
    without = frozen_base_diagnostics(make_cfg, "method.alpha=0")
    # measured: 0.70 with plugins, 0.48 without (digits, 2 tasks of 2 classes)
    assert with_plugins["oracle_plugin"] > without["oracle_plugin"] + 0.1, (with_plugins, without)
