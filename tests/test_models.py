import pytest
import torch
from omegaconf import OmegaConf

from fedcl.errors import ConfigError
from fedcl.models.backbones import build_model


@pytest.mark.parametrize("channels, size", [(1, 8), (1, 28), (3, 32)])
def test_small_cnn_fits_small_inputs(channels, size):
    model = build_model(OmegaConf.create({"name": "small_cnn", "width": 16}), channels, 10)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)


def test_resnet18_has_cifar_stem():
    model = build_model(OmegaConf.create({"name": "resnet18"}), 3, 100)
    assert model.features.conv1.kernel_size == (3, 3) and model.features.conv1.stride == (1, 1)
    assert isinstance(model.features.maxpool, torch.nn.Identity)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert 11_000_000 < sum(p.numel() for p in model.features.parameters()) < 11_300_000


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="small_cnn"):
        build_model(OmegaConf.create({"name": "vgg"}), 3, 10)


def test_vit_and_checkpoint_round_trip(tmp_path):
    from safetensors.torch import save_file

    cfg = OmegaConf.create({"name": "vit", "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2})
    a = build_model(cfg, 1, 10, image_size=8)
    x = torch.randn(3, 1, 8, 8)
    assert a(x).shape == (3, 10)
    save_file({k: v.contiguous() for k, v in a.features.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    torch.manual_seed(123)
    b = build_model(OmegaConf.merge(cfg, {"checkpoint": str(tmp_path / "vit.safetensors")}), 1, 10, image_size=8)
    assert torch.allclose(a.features(x), b.features(x))
    with pytest.raises(ConfigError, match="not a file"):
        build_model(OmegaConf.merge(cfg, {"checkpoint": str(tmp_path / "none.pt")}), 1, 10, image_size=8)
