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

MODELS = ("small_cnn", "resnet18")


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


def build_model(model_cfg, in_channels: int, num_classes: int) -> ClassIncrementalNet:
    name = model_cfg.name
    builders = {"small_cnn": small_cnn, "resnet18": resnet18_cifar}
    if name not in builders:
        raise ConfigError(f"model={name!r} is unknown. Choose one of {list(MODELS)}.")
    features, dim = builders[name](in_channels, int(model_cfg.get("width", 32)))
    return ClassIncrementalNet(features, dim, num_classes)
