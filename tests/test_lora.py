import numpy as np
import pytest
import torch
from torch import nn

from fedcl.aggregation.lora import aggregate_lora, exact_update
from fedcl.errors import ConfigError
from fedcl.models.lora import LoRALayer, inject_lora, lora_state_dict


def randomise(layer: LoRALayer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))


@pytest.mark.parametrize("base", [nn.Linear(12, 7), nn.Conv2d(3, 5, 3, padding=1)])
def test_lora_forward_equals_merged_weight(base):
    torch.manual_seed(0)
    layer = LoRALayer(base, r=2, alpha=4)
    x = torch.randn(4, 12) if isinstance(base, nn.Linear) else torch.randn(2, 3, 6, 6)
    before = layer(x).detach()
    assert torch.allclose(before, base(x))  # B = 0: an injected adapter changes nothing
    randomise(layer)
    out = layer(x).detach()
    assert not torch.allclose(out, before)
    layer.merge()
    assert torch.allclose(layer(x), out, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer(x), out, atol=1e-5) and not layer.merged
    # PEFT layout: A is r x in, B is out x r, scale alpha / r; conv update has rank <= r
    dw = layer.delta_weight().flatten(1)
    assert layer.scaling == 2.0 and torch.linalg.matrix_rank(dw) <= 2


def test_rank_larger_than_layer_is_a_clear_error():
    with pytest.raises(ConfigError, match="r=8.*1 <= r <= 4"):
        LoRALayer(nn.Linear(4, 16), r=8, alpha=8)


def test_inject_freezes_base_and_exports_only_adapters():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    names = inject_lora(model, ["0"], r=2, alpha=2)
    assert names == ["0"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A.weight", "0.lora_B.weight"}
    assert set(lora_state_dict(model)) == trainable
    with pytest.raises(ConfigError, match="matches no Linear"):
        inject_lora(nn.Sequential(nn.Linear(2, 2)), ["attn"], r=1, alpha=1)


def factors(rng, k, r=2, out=6, inp=5, shared_a=False):
    a0 = rng.normal(size=(r, inp))
    return [(a0.copy() if shared_a else rng.normal(size=(r, inp)), rng.normal(size=(out, r))) for _ in range(k)]


def test_fedit_is_inexact_with_different_a():
    rng = np.random.default_rng(0)
    clients, w = factors(rng, 3), [1, 2, 3]
    a, b = aggregate_lora(clients, w, "fedit")
    assert not np.allclose(b @ a, exact_update(clients, w), atol=1e-3)


def test_fedit_and_ffa_are_exact_with_a_shared_a():
    rng = np.random.default_rng(1)
    clients, w = factors(rng, 3, shared_a=True), [1, 2, 3]
    for scheme in ("fedit", "ffa"):
        a, b = aggregate_lora(clients, w, scheme)
        np.testing.assert_allclose(b @ a, exact_update(clients, w), atol=1e-10)
    with pytest.raises(ValueError, match="same frozen A"):
        aggregate_lora(factors(rng, 2), [1, 1], "ffa")


def test_stacked_is_exact_when_the_sum_fits_rank_r_and_best_otherwise():
    rng = np.random.default_rng(2)
    # the weighted sum of 2 rank-1 updates has rank 2: exact at r = 2
    clients = [(rng.normal(size=(1, 5)), rng.normal(size=(6, 1))) for _ in range(2)]
    padded = [(np.vstack([a, np.zeros((1, 5))]), np.hstack([b, np.zeros((6, 1))])) for a, b in clients]
    a, b = aggregate_lora(padded, [1, 3], "stacked")
    np.testing.assert_allclose(b @ a, exact_update(padded, [1, 3]), atol=1e-10)
    # 4 rank-2 updates: rank 8 > r = 2, the result is the best rank-2 approximation
    clients, w = factors(rng, 4), [1, 1, 2, 2]
    a, b = aggregate_lora(clients, w, "stacked")
    target = exact_update(clients, w)
    s = np.linalg.svd(target, compute_uv=False)
    assert np.linalg.norm(target - b @ a) == pytest.approx(np.sqrt((s[2:] ** 2).sum()), rel=1e-8)
    fa, fb = aggregate_lora(clients, w, "fedit")
    assert np.linalg.norm(target - b @ a) < np.linalg.norm(target - fb @ fa)
