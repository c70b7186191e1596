"""DualLoRA's mechanics: orthogonal protection, residual subspaces, and what crosses the wire."""
import numpy as np
import torch
from torch import nn

from fedcl.experiment import get_experiment
from fedcl.federation.client_app import client_round
from fedcl.models.dual_lora import DualLoRALinear


def orthonormal(d, k, seed=0):
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]


def test_orthogonal_adapter_does_not_touch_old_subspace():
    torch.manual_seed(0)
    layer = DualLoRALinear(nn.Linear(16, 8), num_tasks=3, r=2, alpha=4)
    U = orthonormal(16, 5)
    layer.old_basis[:, :5] = U
    layer.task, layer.first_adapter_task = 1, 1
    with torch.no_grad():
        layer.orth_B[1].normal_()
    old_inputs = torch.randn(10, 5) @ U.T                 # inputs from earlier tasks' subspace
    new_inputs = torch.randn(10, 16)
    delta = lambda x: layer(x) - layer.base(x)  # noqa: E731
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
    layer.task_bases[0, :, :4] = U
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
                        assert k.startswith(("U.", "s.", "head_rows.")) or k.endswith((".orth_A.1", ".orth_B.1", ".res_C.1", ".res_B.1")), k
                replies.append((up, n))
            g = m.aggregate(g, [r for r in replies if r[1] > 0], task, phase)
        if task == 0:
            protected = {name: g[f"{name}.old_basis"].copy() for name in m.layers(model)}
    # the stored orthogonal factors of task 1 are outside the subspace protected for task 0
    for name, old in protected.items():
        a = g[f"{name}.orth_A.1"]
        assert np.abs(old).sum() > 0 and np.abs(a @ old).max() < 1e-4 * np.abs(a).max()


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
    x = exp.test_images[:7]
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
    layer.old_basis[:, :6] = U                            # now holds task 1's own inputs
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
