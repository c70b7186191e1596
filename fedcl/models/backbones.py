"""Backbones for class-incremental learning: ``features(x) -> (N, D)`` plus one linear head.

A single head over all classes is kept (class-incremental, no task id); methods slice the
logits of the classes seen so far. GroupNorm instead of BatchNorm in the small CNN keeps FedAvg
free of running statistics that non-IID clients would disagree on.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from fedcl.errors import ConfigError

MODELS = ("small_cnn", "resnet18", "vit")


class ClassIncrementalNet(nn.Module):
    """A feature extractor followed by a linear head over all classes of the scenario."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def small_cnn(in_channels: int, width: int = 32) -> tuple[nn.Module, int]:
    """Three 3x3 conv blocks; adaptive pooling makes it fit 8x8 to 32x32 inputs alike."""
    w = width
    net = nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1), nn.GroupNorm(4, w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(4, 2 * w), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GroupNorm(4, 4 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return net, 4 * w


def resnet18_cifar(in_channels: int, width: int = 64) -> tuple[nn.Module, int]:
    """torchvision's ResNet-18 with the CIFAR stem: 3x3 stride-1 conv and no max-pool."""
    net = torchvision.models.resnet18(num_classes=10)
    if width != 64:
        raise ConfigError(f"model.width={width}: torchvision's ResNet-18 has width 64; set model.width=64.")
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


def vit(in_channels: int, image_size: int, model_cfg) -> tuple[nn.Module, int]:
    """A timm VisionTransformer sized by the config; small enough to train on CPU by default.

    ``model.stem=conv`` puts a 3x3 convolution (GroupNorm, GELU) before the patch projection, the
    "early convolutions" of Xiao et al. (2021): on tiny images from few samples a plain linear patch
    embedding trains slowly. ``model.global_pool``: ``token`` (class token) or ``avg`` (mean of the
    patch tokens)."""
    from timm.models.vision_transformer import VisionTransformer

    patch = int(model_cfg.get("patch_size", 2))
    if image_size % patch:
        raise ConfigError(f"model.patch_size={patch} does not divide the {image_size}x{image_size} images.")
    dim = int(model_cfg.get("embed_dim", 128))
    pool = str(model_cfg.get("global_pool", "token"))
    if pool not in ("token", "avg"):
        raise ConfigError(f"model.global_pool={pool!r}: choose 'token' or 'avg'.")
    net = VisionTransformer(img_size=image_size, patch_size=patch, in_chans=in_channels, num_classes=0,
                            embed_dim=dim, depth=int(model_cfg.get("depth", 4)),
                            num_heads=int(model_cfg.get("num_heads", 4)),
                            mlp_ratio=float(model_cfg.get("mlp_ratio", 2.0)), global_pool=pool,
                            class_token=pool == "token")
    stem = str(model_cfg.get("stem", "patch"))
    if stem == "conv":
        width = int(model_cfg.get("stem_channels", 32))
        net.patch_embed.proj = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(4, width), nn.GELU(),
            nn.Conv2d(width, dim, patch, stride=patch))
    elif stem != "patch":
        raise ConfigError(f"model.stem={stem!r}: choose 'patch' (linear patch embedding) or 'conv'.")
    return net, dim


def load_checkpoint(features: nn.Module, path: str) -> None:
    """Pretrained backbone weights from a local file: safetensors or a torch state dict
    (timm/torchvision layouts; a classifier head in the file is ignored)."""
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.checkpoint={path} is not a file; give a local .safetensors/.pt/.pth state dict.")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    own = features.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"model.checkpoint={path} has no tensor matching model={type(features).__name__}'s "
                          f"names and shapes (e.g. {list(own)[:3]}).")
    features.load_state_dict(usable, strict=False)


def build_model(model_cfg, in_channels: int, num_classes: int, image_size: int = 32) -> ClassIncrementalNet:
    name = model_cfg.name
    if name == "small_cnn":
        features, dim = small_cnn(in_channels, int(model_cfg.get("width", 32)))
    elif name == "resnet18":
        features, dim = resnet18_cifar(in_channels, int(model_cfg.get("width", 64)))
    elif name == "vit":
        features, dim = vit(in_channels, image_size, model_cfg)
    else:
        raise ConfigError(f"model={name!r} is unknown. Choose one of {list(MODELS)}.")
    checkpoint = model_cfg.get("checkpoint", None)
    if checkpoint:
        load_checkpoint(features, str(checkpoint))
    return ClassIncrementalNet(features, dim, num_classes)
