"""DualLoRA's mechanics: orthogonal protection, residual subspaces, and what crosses the wire."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fedcl.client.app import client_round
from fedcl.errors import ConfigError
from fedcl.experiment import get_experiment
from fedcl.methods.duallora import DualLoRA, is_basis, state_bytes
from fedcl.models.backbones import ClassIncrementalNet
from fedcl.models.dual_lora import DualLoRALinear, bare


def orthonormal(d, k, seed=0):
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]


def set_basis(layer, task, u):
    """What DualLoRA.load_payload does: the buffer takes the basis at its own width."""
    if task is None:
        layer.old_basis = u
    else:
        setattr(layer.task_bases, str(task), u)


def test_orthogonal_adapter_does_not_touch_old_subspace():
    torch.manual_seed(0)
    layer = DualLoRALinear(nn.Linear(16, 8), num_tasks=3, r=2, alpha=4)
    U = orthonormal(16, 5)
    set_basis(layer, None, U)
    layer.task, layer.first_adapter_task = 1, 1
    with torch.no_grad():
        layer.orth_B[1].normal_()
    old_inputs = torch.randn(10, 5) @ U.T                 # inputs from earlier tasks' subspace
    new_inputs = torch.randn(10, 16)
    delta = lambda x: layer(x) - layer.base(x)
    assert delta(old_inputs).abs().max() < 1e-5           # ~0 whatever B is
    assert delta(new_inputs).abs().max() > 1e-2           # but it does act elsewhere
    # and the gradient of A stays in the complement: a training step keeps the property
    loss = layer(new_inputs).pow(2).sum()
    loss.backward()
    g = layer.orth_A[1].grad
    assert (g @ U).norm() / g.norm() < 1e-5


def test_residual_adapter_acts_only_through_its_task_basis():
    torch.manual_seed(1)
    layer = DualLoRALinear(nn.Linear(16, 8), num_tasks=2, r=2, alpha=4)
    U = orthonormal(16, 4, seed=2)
    set_basis(layer, 0, U)
    layer.use_orthogonal = False
    with torch.no_grad():
        layer.res_B[0].normal_()
    layer.residual_weights = "current"
    outside = torch.randn(6, 16)
    outside = outside - (outside @ U) @ U.T               # orthogonal to task 0's basis
    assert (layer(outside) - layer.base(outside)).abs().max() < 1e-5
    inside = torch.randn(6, 4) @ U.T
    assert (layer(inside) - layer.base(inside)).abs().max() > 1e-2
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0]])             # per-sample weights from the dynamic memory
    layer.residual_weights = w
    out = layer(inside[:2]) - layer.base(inside[:2])
    assert out[0].abs().max() < 1e-6 and out[1].abs().max() > 1e-2


def test_only_adapters_bases_and_head_rows_travel_after_the_base_session(make_cfg):
    cfg = make_cfg("method=duallora", "num_clients=2", "num_tasks=2", "rounds_per_task=1",
                   "model.depth=2", "model.embed_dim=32")
    exp = get_experiment(cfg)
    m = exp.method
    model = exp.new_model()
    g = m.init_global(model)
    backbone = {k for k in g if m.is_backbone(k)}
    state = {0: {}, 1: {}}
    for task in range(2):
        for rnd, phase in enumerate(m.phases(task, 1)):
            replies = []
            for c in range(2):
                down = m.downlink(g, task, phase, c)
                if task >= 1:  # the frozen backbone never travels after the base session
                    assert not backbone & set(down)
                cm = exp.new_model()
                m.load_payload(cm, down)
                ctx = client_round(cfg, c, task, rnd, phase)
                n = m.client_update(cm, ctx, state[c])
                up = {k: v.detach().numpy().copy() for k, v in m.payload(cm, ctx).items()}
                if task >= 1:
                    assert not set(up) & backbone, f"backbone array sent in {phase}"
                    for k in up:
                        assert k.startswith(("U.", "s.", "head_rows.")) or k.endswith(
                            (".orth_A.1", ".orth_B.1", ".res_C.1", ".res_B.1")), k
                replies.append((up, n))
            g = m.aggregate(g, [r for r in replies if r[1] > 0], task, phase)
        if task == 0:
            protected = {name: g[f"{name}.old_basis"].copy() for name in m.layers(model)}
    # the stored orthogonal factors of task 1 are outside the subspace protected for task 0
    for name, old in protected.items():
        a = g[f"{name}.orth_A.1"]
        assert np.abs(old).sum() > 0 and np.abs(a @ old).max() < 1e-4 * np.abs(a).max()
    # every basis is stored at the width it uses: orthonormal columns, no zero padding
    for name in m.layers(model):
        for key in (f"{name}.old_basis", f"{name}.task_bases.1"):
            u = g[key].astype(np.float64)
            assert g[key].dtype == np.float32 and 0 < u.shape[1] <= u.shape[0] == 32
            np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-4)
        assert g[f"{name}.task_bases.0"].shape == (32, 0)  # the base session has no residual subspace
        assert protected[name].shape[1] <= g[f"{name}.old_basis"].shape[1]  # task 1 only adds directions
    for t in range(2):
        key = g[f"task_keys.{t}"].astype(np.float64)  # input keys: 64 pixels, at most max_key_dims columns
        assert key.shape[0] == 64 and 0 < key.shape[1] <= m.max_key_dims
        np.testing.assert_allclose(key.T @ key, np.eye(key.shape[1]), atol=1e-4)
    # a fresh model's buffers take the arriving widths (and shrink again for narrower ones)
    final = exp.new_model()
    assert state_bytes(final)["bases"] == 0
    m.load_payload(final, g)
    state = final.state_dict()
    assert all(tuple(state[k].shape) == g[k].shape for k in g if is_basis(k))
    assert state_bytes(final)["bases"] == sum(g[k].size * 4 for k in g if is_basis(k))
    m.load_payload(final, {"task_keys.1": g["task_keys.1"][:, :1]})
    assert tuple(final.task_keys[1].shape) == (64, 1)


def test_orthogonal_adapters_export_loads_in_peft(tmp_path, make_cfg):
    peft = __import__("pytest").importorskip("peft")
    from safetensors.torch import load_file

    from fedcl.models.backbones import vit as build_vit

    cfg = make_cfg("method=duallora", "num_tasks=5", "model.depth=2", "model.embed_dim=32")
    exp = get_experiment(cfg)
    model = exp.new_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in exp.method.layers(model).values():
            for i in (1, 2, 4):
                layer.orth_B[i].normal_()
    exp.method.export(model, tmp_path / "adapters")
    vit, _ = build_vit(1, 8, cfg.model)  # the same timm ViT (conv stem, mean pooling), fresh weights
    vit.load_state_dict(load_file(str(tmp_path / "adapters" / "backbone.safetensors")))
    peft_model = peft.PeftModel.from_pretrained(vit, str(tmp_path / "adapters"))
    x = exp.test_images(np.arange(7))
    exp.method.set_mode(model, 4, None)   # all tasks' orthogonal adapters on, no residual branch
    with torch.no_grad():
        ours, theirs = model.features(x), peft_model(x)
    assert torch.allclose(ours, theirs, atol=1e-5)
    with peft_model.disable_adapter(), torch.no_grad():
        bare = peft_model(x)
    assert not torch.allclose(theirs, bare, atol=1e-3)  # the adapters do act


def test_inference_keeps_the_last_tasks_orthogonal_branch():
    """After a task's basis_end its own inputs join U_old; its stored (already projected) A must
    still act at inference, and only the training pass re-projects the current task's A."""
    torch.manual_seed(3)
    layer = DualLoRALinear(nn.Linear(16, 8), num_tasks=2, r=2, alpha=4)
    U = orthonormal(16, 6, seed=4)
    set_basis(layer, None, U)                             # now holds task 1's own inputs
    layer.task, layer.first_adapter_task = 1, 1
    with torch.no_grad():
        layer.orth_B[1].normal_()
    x = torch.randn(5, 6) @ U.T
    layer.project_current = False                         # inference
    assert (layer(x) - layer.base(x)).abs().max() > 1e-2
    layer.project_current = True                          # training task 1 again would protect U
    assert (layer(x) - layer.base(x)).abs().max() < 1e-5


def test_client_without_data_of_a_task_sends_no_basis(make_cfg):
    cfg = make_cfg("method=duallora", "num_clients=2", "num_tasks=2", "rounds_per_task=1",
                   "model.depth=2", "model.embed_dim=32")
    exp = get_experiment(cfg)
    ctx = client_round(cfg, 0, 1, 0, "basis_end")
    ctx.task_rows = lambda t: np.zeros(0, dtype=np.int64)
    model = exp.new_model()
    assert exp.method.client_update(model, ctx, {}) == 0
    assert exp.method.payload(model, ctx) == {}


def test_conv_stem_vit_and_clear_errors(make_cfg):
    import pytest
    from omegaconf import OmegaConf

    from fedcl.errors import ConfigError
    from fedcl.models.backbones import vit as build_vit

    cfg = make_cfg("method=duallora", "model.depth=1", "model.embed_dim=32")
    assert cfg.model.stem == "conv" and cfg.model.global_pool == "avg"
    net, dim = build_vit(1, 8, cfg.model)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, dim)
    assert net.patch_embed.num_patches == 16            # the stem keeps the 2x2 patch grid
    for key, bad in (("stem", "resnet"), ("global_pool", "max")):
        with pytest.raises(ConfigError, match=key):
            build_vit(1, 8, OmegaConf.merge(cfg.model, {key: bad}))


def test_residual_product_equals_the_padded_formula_and_follows_changes():
    """One d x r product per branch (C_i U_i^T, cached at inference) gives what the zero-padded
    d x d formula ((x U_i) C_i^T) B_i^T gave, with orthogonal branches and per-sample weights."""
    torch.manual_seed(5)
    d, widths = 16, (3, 5, 4)
    layer = DualLoRALinear(nn.Linear(d, 12), num_tasks=3, r=2, alpha=4)
    layer.first_adapter_task, layer.task = 0, 2
    for i, m in enumerate(widths):
        set_basis(layer, i, orthonormal(d, m, seed=10 + i))
    set_basis(layer, None, orthonormal(d, 6, seed=20))
    with torch.no_grad():
        for p in [*layer.orth_B, *layer.res_B]:
            p.normal_()
    x, w = torch.randn(4, 3, d), torch.rand(4, 3)

    def padded_formula():
        out = layer.base(x)
        for i in range(3):
            a = layer.orth_A[i]
            if i == layer.task:  # the current task's A, projected off U_old
                a = a - (a @ layer.old_basis) @ layer.old_basis.T
            out = out + (x @ a.T) @ layer.orth_B[i].T * layer.scaling
            padded = torch.zeros(d, d)
            padded[:, :layer.task_bases[i].shape[1]] = layer.task_bases[i]
            branch = ((x @ padded) @ layer.res_C[i].T) @ layer.res_B[i].T * layer.scaling
            out = out + branch * w[:, i].view(-1, 1, 1)
        return out

    layer.residual_weights = w
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), padded_formula(), atol=1e-5, rtol=1e-5)
        cached = layer._residual_cache[1][3]
        layer(x)
        assert layer._residual_cache[1][3] is cached          # formed once while nothing changes
        assert cached.shape == (2, d)
        layer.res_C[1].mul_(2.0)                              # C changes (an optimiser step, a load)
        torch.testing.assert_close(layer(x), padded_formula(), atol=1e-5, rtol=1e-5)
        set_basis(layer, 1, orthonormal(d, 7, seed=30))       # a wider basis arrives
        torch.testing.assert_close(layer(x), padded_formula(), atol=1e-5, rtol=1e-5)
    # training: the residual map is formed per forward, so C gets its gradient (only on used columns)
    layer.train()
    layer.residual_weights = "current"
    layer(x).sum().backward()
    g = layer.res_C[2].grad
    assert g[:, :4].abs().sum() > 0 and g[:, 4:].abs().sum() == 0


def test_task_keys_follow_the_backbone_features_when_it_is_pretrained(tmp_path, make_cfg):
    small = ("method=duallora", "num_clients=2", "num_tasks=2", "model.depth=1", "model.embed_dim=16")
    scratch = get_experiment(make_cfg(*small))
    assert scratch.method.task_key == "input" and scratch.method.first == 1
    torch.save(scratch.new_model(prepared=False).features.state_dict(), tmp_path / "vit.pt")
    cfg = make_cfg(*small, f"model.checkpoint={tmp_path / 'vit.pt'}")
    exp = get_experiment(cfg)
    m = exp.method
    assert m.task_key == "features" and m.first == 0  # no base session on a pretrained backbone
    assert get_experiment(make_cfg(*small, f"model.checkpoint={tmp_path / 'vit.pt'}",
                                   "method.task_key=input")).method.task_key == "input"
    model = exp.new_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in m.layers(model).values():
            layer.orth_B[0].normal_()
            layer.res_B[0].normal_()
    ctx = client_round(cfg, 0, 0, 1, "basis_end")
    u = m.payload(model, ctx)["U.task_key"].double()
    assert u.shape[0] == 16 and 0 < u.shape[1] < 16
    x = ctx.images(ctx.task_rows(0))
    with torch.no_grad(), bare(model):
        f = model.features(x).double()
    m.set_mode(model, 0, "current")
    with torch.no_grad():
        adapted = model.features(x).double()
    outside = lambda v: float(((v - (v @ u) @ u.T) ** 2).sum() / (v ** 2).sum())
    assert outside(f) < 1 - m.feature_threshold + 0.01   # the key spans the bare backbone's features
    assert not torch.allclose(f, adapted, atol=1e-3)      # which the adapters would have changed
    # the dynamic memory reads the same bare features: task 0's key against its complement
    complement = torch.linalg.qr(torch.eye(16, dtype=torch.float64) - u @ u.T)[0][:, :16 - u.shape[1]]
    m.load_payload(model, {"task_keys.0": u.float().numpy(), "task_keys.1": complement.float().numpy()})
    conf = m.task_confidence(model, x, 2)
    assert conf.shape == (len(x), 2) and float(conf[:, 0].mean()) > 0.9


def test_targets_select_layers_by_pattern_and_qv_leaves_k_untouched(make_cfg):
    small = ("method=duallora", "model.depth=2", "model.embed_dim=32")
    exp = get_experiment(make_cfg(*small, "method.targets=[mlp.fc1,attn.proj]"))
    names = list(exp.method.layers(exp.new_model()))
    assert names == [f"features.blocks.{b}.{n}" for b in range(2) for n in ("attn.proj", "mlp.fc1")]
    exp = get_experiment(make_cfg(*small, "method.targets=[attn.qkv,mlp.fc2]", "method.qkv_parts=qv"))
    model = exp.new_model()
    layers = exp.method.layers(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.orth_B[1].normal_()
            layer.res_B[1].normal_()
    exp.method.set_mode(model, 1, "current")
    for name, layer in layers.items():
        x = torch.randn(3, 5, layer.base.in_features)
        delta = (layer(x) - layer.base(x)).abs().amax((0, 1))
        if name.endswith("qkv"):  # q, k, v rows of the fused projection: k's stay untouched
            assert delta[:32].min() > 0 and delta[32:64].max() == 0 and delta[64:].min() > 0
        else:
            assert delta.min() > 0
    with pytest.raises(ConfigError, match=r"method.targets.*mlp\.fc9.*blocks\.0\.attn\.qkv"):
        get_experiment(make_cfg(*small, "method.targets=[attn.qkv,mlp.fc9]")).new_model()
    with pytest.raises(ConfigError, match="qkv_parts=qv"):
        get_experiment(make_cfg(*small, "method.targets=mlp.fc1", "method.qkv_parts=qv")).new_model()
    with pytest.raises(ConfigError, match="task_key"):
        DualLoRA(task_key="pixels")


def timm_duallora(num_tasks=3, **kwargs):
    """DualLoRA on timm's vit_tiny_patch16_224 (random init, as pretrained: no base session)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = ClassIncrementalNet(timm.create_model("vit_tiny_patch16_224", num_classes=0), 192, 2 * num_tasks)
    method = DualLoRA(**kwargs)
    method.bind(num_tasks, list(range(0, 2 * num_tasks + 1, 2)), OmegaConf.create(
        {"model": {"name": "timm", "pretrained": True}, "input_dim": 3 * 224 * 224,
         "strategy": {"lora_aggregation": "fedit", "basis_aggregation": "svd"}}))
    model = method.prepare_model(net).eval()
    with torch.no_grad():
        for layer in method.layers(model).values():
            for i in range(num_tasks):
                layer.orth_B[i].normal_(std=0.05)
                layer.res_B[i].normal_(std=0.05)
    return method, model


def test_duallora_on_a_timm_vit():
    method, model = timm_duallora()
    assert method.first == 0 and method.task_key == "features"
    assert list(method.layers(model)) == [f"features.blocks.{b}.attn.qkv" for b in range(12)]
    for i, layer in enumerate(method.layers(model).values()):
        for t in range(3):
            set_basis(layer, t, orthonormal(192, 8 + t, seed=100 * i + t))
    keys = [orthonormal(192, 5, seed=t) for t in range(3)]
    method.load_payload(model, {f"task_keys.{t}": k.numpy() for t, k in enumerate(keys)})
    x = torch.randn(2, 3, 224, 224)
    conf = method.task_confidence(model, x, 3)
    assert conf.shape == (2, 3) and torch.allclose(conf.sum(1), torch.ones(2))
    pred = method.predict(model, x, seen_classes=6)
    assert pred.shape == (2,) and int(pred.max()) < 6
    with torch.no_grad():
        method.set_mode(model, 2, None, project_current=False)
        orthogonal_only = model(x)
        method.set_mode(model, 2, torch.ones(2, 3), project_current=False)
        both = model(x)
        with bare(model):
            plain = model(x)
    assert not torch.allclose(orthogonal_only, both, atol=1e-4)   # residual branches act
    assert not torch.allclose(orthogonal_only, plain, atol=1e-4)  # orthogonal branches act


def test_peft_export_of_a_timm_vit_matches_the_orthogonal_branches(tmp_path):
    peft = pytest.importorskip("peft")
    import timm
    from safetensors.torch import load_file

    method, model = timm_duallora(targets=["attn.qkv", "mlp.fc2"], qkv_parts="qv")
    method.export(model, tmp_path / "adapters")
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    fresh.load_state_dict(load_file(str(tmp_path / "adapters" / "backbone.safetensors")))
    peft_model = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapters")).eval()
    x = torch.randn(2, 3, 224, 224)
    method.set_mode(model, 2, None, project_current=False)  # every task's orthogonal branch, no residual
    with torch.no_grad():
        ours, theirs = model.features(x), peft_model(x)
        with peft_model.disable_adapter():
            bare_out = peft_model(x)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(theirs, bare_out, atol=1e-3)  # the adapters do act
