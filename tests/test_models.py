from types import SimpleNamespace

import pytest
import torch

from fedcl.errors import ConfigError
from fedcl.models.backbones import build_model


@pytest.mark.parametrize("channels, size", [(1, 8), (1, 28), (3, 32)])
def test_small_cnn_fits_small_inputs(channels, size):
    model = build_model(SimpleNamespace(name="small_cnn", get=lambda k, d: 16), channels, 10)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)


def test_resnet18_has_cifar_stem():
    model = build_model(SimpleNamespace(name="resnet18", get=lambda k, d: 64), 3, 100)
    assert model.features.conv1.kernel_size == (3, 3) and model.features.conv1.stride == (1, 1)
    assert isinstance(model.features.maxpool, torch.nn.Identity)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert 11_000_000 < sum(p.numel() for p in model.features.parameters()) < 11_300_000


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="small_cnn"):
        build_model(SimpleNamespace(name="vgg", get=lambda k, d: d), 3, 10)
