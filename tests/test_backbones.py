"""Backbones by name and their weights: timm models, ResNet-18 stems, local checkpoints in every
format, and published weights that load from the cache and fail fast without a network."""
import os
import socket
import time

import numpy as np
import pytest
import timm
import torch
import torchvision
from omegaconf import OmegaConf
from safetensors.torch import save_file

from fedcl import config
from fedcl.errors import ConfigError
from fedcl.models import backbones
from fedcl.models.backbones import build_model

TINY = "vit_tiny_patch16_224"


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Every connection refused and empty weight caches: nothing here may touch a network."""
    tried = []

    def refuse(address, *args, **kwargs):
        tried.append(address)
        raise OSError("no network in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants as hf
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tried


def timm_cfg(**kw):
    return OmegaConf.create({"name": "timm", "arch": TINY, "pretrained": False, "checkpoint": None, **kw})


@pytest.fixture(scope="module")
def tiny():
    """timm's own vit_tiny_patch16_224 (random init, with its 1000-class head) and an input batch."""
    torch.manual_seed(7)
    ref = timm.create_model(TINY).eval()
    return ref, torch.randn(2, 3, 224, 224)


def timm_features(ref, x):
    with torch.no_grad():
        return ref.forward_head(ref.forward_features(x), pre_logits=True)


def test_timm_model_by_name_runs_at_224_px():
    model = build_model(timm_cfg(), 3, 10, image_size=224)
    assert isinstance(model.features, timm.models.VisionTransformer)
    assert model.head.in_features == 192 and "blocks.11.attn.qkv.weight" in model.features.state_dict()
    assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 10)
    small = build_model(timm_cfg(), 1, 10, image_size=32)  # native CIFAR size, grey: 2x2 patches, one channel
    assert small(torch.zeros(3, 1, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pt-wrapped", "npz"])
def test_timm_checkpoint_loads_by_name_and_gives_timms_features(tmp_path, tiny, fmt):
    ref, x = tiny
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}  # head.* included: it is dropped
    path = tmp_path / f"w.{fmt.split('-')[0]}"
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "pth":
        torch.save(state, path)
    elif fmt == "pt-wrapped":  # a training checkpoint: DataParallel prefix inside "state_dict"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    torch.manual_seed(123)  # a different init: only loading makes the features equal
    model = build_model(timm_cfg(checkpoint=str(path)), 3, 10, image_size=224).eval()
    with torch.no_grad():
        assert torch.allclose(model.features(x), timm_features(ref, x), atol=1e-5)


def test_checkpoint_at_another_image_size_resamples_the_position_embedding(tmp_path, tiny):
    ref, _ = tiny
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = build_model(timm_cfg(checkpoint=str(tmp_path / "w.safetensors")), 3, 10, image_size=64)
    assert model.features.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(model.features.blocks[3].attn.qkv.weight, ref.blocks[3].attn.qkv.weight)


@pytest.mark.parametrize("content, match", [
    (lambda p: torch.save([1, 2, 3], p), "not a state dict.*found a list"),
    (lambda p: torch.save(torch.zeros(3), p), "not a state dict.*found a Tensor"),
    (lambda p: torch.save({"epoch": 3, "lr": 0.1}, p), "not a state dict.*'epoch'"),
    (lambda p: p.write_bytes(os.urandom(1000)), "could not be read"),
])
def test_a_file_that_is_not_a_state_dict_is_a_config_error(tmp_path, content, match):
    path = tmp_path / "w.pth"
    content(path)
    with pytest.raises(ConfigError, match=match) as err:
        backbones.load_checkpoint(torch.nn.Linear(2, 2), str(path))
    assert "\n" not in str(err.value)
    for suffix in (".safetensors", ".npz"):
        (tmp_path / f"w{suffix}").write_bytes(os.urandom(1000))
        with pytest.raises(ConfigError, match="could not be read"):
            backbones.load_checkpoint(torch.nn.Linear(2, 2), str(tmp_path / f"w{suffix}"))


def test_mismatched_checkpoint_names_tensors_and_the_model_it_fits(tmp_path, tiny):
    ref, _ = tiny
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    small_vit = {"name": "vit", "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2, "stem": "patch",
                 "checkpoint": str(tmp_path / "tiny.safetensors")}
    with pytest.raises(ConfigError, match="does not fit") as err:
        build_model(OmegaConf.create(small_vit), 3, 10, image_size=224)
    message = str(err.value)
    assert "looks like model=timm model.arch=vit_tiny_patch16_224" in message
    assert "blocks.0.attn.qkv.weight (576, 192)" in message and "\n" not in message
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ConfigError, match="looks like model=resnet18 model.stem=imagenet"):
        build_model(OmegaConf.create({"name": "resnet18", "checkpoint": str(tmp_path / "resnet.pth")}), 3, 10)


def test_resnet18_imagenet_stem_at_64_px_and_torchvision_checkpoint(tmp_path):
    model = build_model(OmegaConf.create({"name": "resnet18", "stem": "imagenet"}), 3, 100)
    conv = model.features.conv1
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2)
    assert isinstance(model.features.maxpool, torch.nn.MaxPool2d)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 100)
    torch.manual_seed(5)
    ref = torchvision.models.resnet18().eval()
    torch.save(ref.state_dict(), tmp_path / "r.pth")
    loaded = build_model(OmegaConf.create({"name": "resnet18", "stem": "imagenet",
                                           "checkpoint": str(tmp_path / "r.pth")}), 3, 100).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref.fc = torch.nn.Identity()
        assert torch.allclose(loaded.features(x), ref(x), atol=1e-5)
    grey = build_model(OmegaConf.create({"name": "resnet18", "stem": "imagenet",
                                         "checkpoint": str(tmp_path / "r.pth")}), 1, 10)  # RGB weights summed
    assert torch.allclose(grey.features.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))


def test_pretrained_fails_fast_offline_and_points_to_checkpoint(no_network, monkeypatch):
    started = time.monotonic()
    with pytest.raises(ConfigError, match="model.checkpoint=") as err:
        build_model(timm_cfg(pretrained=True), 3, 10, image_size=224)
    assert len(no_network) == 1 and no_network[0][0] == "huggingface.co"  # one attempt, no retries
    with pytest.raises(ConfigError, match="model.checkpoint="):
        build_model(OmegaConf.create({"name": "resnet18", "stem": "imagenet", "pretrained": True}), 3, 10)
    assert no_network[-1][0] == "download.pytorch.org"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tried = len(no_network)
    with pytest.raises(ConfigError, match="model.checkpoint="):
        build_model(timm_cfg(pretrained=True), 3, 10, image_size=224)
    assert len(no_network) == tried  # offline said: not even one attempt
    assert time.monotonic() - started < 10 and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model=timm"):
        build_model(OmegaConf.create({"name": "small_cnn", "pretrained": True}), 3, 10)


def test_pretrained_weights_in_the_local_caches_load_without_a_network(no_network, tmp_path, tiny):
    ref, x = tiny
    hub_id = timm.models.get_pretrained_cfg(TINY).hf_hub_id  # the Hugging Face cache layout
    repo = tmp_path / "hf" / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              str(repo / "snapshots" / "abc123" / "model.safetensors"))
    model = build_model(timm_cfg(pretrained=True), 3, 10, image_size=224).eval()
    with torch.no_grad():
        assert torch.allclose(model.features(x), timm_features(ref, x), atol=1e-5)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), hub / "resnet18-f37072fd.pth")
    loaded = build_model(OmegaConf.create({"name": "resnet18", "stem": "imagenet", "pretrained": True}), 3, 10)
    assert torch.equal(loaded.features.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
    assert not no_network


def test_validate_names_bad_model_and_input_settings(make_cfg):
    with pytest.raises(ConfigError, match="vit_base_patch16_224"):
        config.validate(make_cfg("model=timm", "model.arch=vit_base_patch16_22"))
    with pytest.raises(ConfigError, match="The 225 px inputs .dataset.image_size.*16x16"):
        config.validate(make_cfg("model=timm", "dataset.image_size=225"))
    with pytest.raises(ConfigError, match="dataset.image_size=-3"):
        config.validate(make_cfg("dataset.image_size=-3"))
    with pytest.raises(ConfigError, match="dataset.image_size=.?big"):
        config.validate(make_cfg("dataset.image_size=big"))
    with pytest.raises(ConfigError, match="33 px inputs.*2x2"):
        config.validate(make_cfg("model=vit", "model.patch_size=2", "dataset.image_size=33"))
    with pytest.raises(ConfigError, match="dataset.normalize='imagnet'"):
        config.validate(make_cfg("dataset.normalize=imagnet"))
    with pytest.raises(ConfigError, match="model.stem='imagenett'.*cifar"):
        config.validate(make_cfg("model=resnet18", "model.stem=imagenett"))
    with pytest.raises(ConfigError, match="dataset.crop_scale=0"):
        config.validate(make_cfg("dataset.crop_scale=0"))
    with pytest.raises(ConfigError, match="dataset.augment"):
        config.validate(make_cfg("dataset.augment=sometimes"))
    config.validate(make_cfg("model=timm", "model.arch=deit_tiny_patch16_224", "dataset.image_size=224",
                             "dataset.normalize=imagenet", "dataset.augment=true", "method=finetune"))


def test_guess_model_reads_the_architecture_from_shapes():
    with torch.device("meta"):
        state = timm.create_model("vit_small_patch16_224").state_dict()
        assert backbones.guess_model(state) == "model=timm model.arch=vit_small_patch16_224"
        assert backbones.guess_model(torchvision.models.resnet50().state_dict()) == "model=timm model.arch=resnet50"
    assert backbones.guess_model({"w": torch.zeros(1)}) == ""


def test_big_vision_npz_goes_to_timms_loader_and_fails_clearly(tmp_path):
    np.savez(tmp_path / "bv.npz", **{"embedding/kernel": np.zeros((16, 16, 3, 64), np.float32)})
    with pytest.raises(ConfigError, match="big_vision .npz, which only a timm ViT reads"):
        backbones.load_checkpoint(torch.nn.Linear(2, 2), str(tmp_path / "bv.npz"))
    small_vit = OmegaConf.create({"name": "vit", "patch_size": 16, "embed_dim": 64, "depth": 1, "num_heads": 2,
                                  "stem": "patch", "checkpoint": str(tmp_path / "bv.npz")})
    with pytest.raises(ConfigError, match="does not fit this model"):  # timm's loader misses the other arrays
        build_model(small_vit, 3, 10, image_size=32)


def test_the_small_vit_picks_a_patch_that_leaves_at_most_8x8_tokens():
    """model.patch_size=null: 2 on 8 px digits (as before), 4 on 28 px images (49 tokens, not 196)."""
    from fedcl.models.backbones import vit_patch_size

    auto = OmegaConf.create({"name": "vit", "patch_size": None, "embed_dim": 32, "depth": 1, "num_heads": 2})
    assert [vit_patch_size(auto, s) for s in (8, 16, 28, 32)] == [2, 2, 4, 4]
    assert vit_patch_size(OmegaConf.merge(auto, {"patch_size": 7}), 28) == 7
    net = build_model(auto, 1, 10, 28)
    assert net.features.patch_embed.num_patches == 49
