"""The input pipeline: stored uint8 batches -> normalised float model inputs, a batch at a time.

Images stay at their native size and dtype in memory (CIFAR-100: 150 MB of uint8); resizing to
``dataset.image_size``, train-time augmentation and normalisation happen per batch, on the device
the batch goes to. ``dataset.normalize``: ``dataset`` (the training set's own per-channel
statistics), ``imagenet``, or ``auto`` (the statistics a pretrained/checkpointed model was trained
with, else the data set's own).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from fedcl.errors import ConfigError

NORMALIZE = ("auto", "imagenet", "dataset")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputPipeline:
    size: int                        # side of the model's input in px
    mean: tuple[float, ...]          # per channel, of x / 255
    std: tuple[float, ...]
    augment: bool = False            # RandomResizedCrop + horizontal flip, training batches only
    interpolation: str = "bilinear"  # a torchvision InterpolationMode name
    crop_scale: float = 0.08         # smallest crop area RandomResizedCrop takes, as a fraction of the image

    def __call__(self, x: np.ndarray | torch.Tensor, device: torch.device | str = "cpu",
                 train: bool = False) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 (N, C, size, size); ``train`` augments (if ``augment``).
        Augmentation draws from torch's global RNG, which clients seed per round."""
        x = torch.as_tensor(x).to(device).float().div_(255.0)
        out = (self.size, self.size)
        if train and self.augment:
            crop = _augmenter(out, self.interpolation, self.crop_scale)
            x = torch.stack([crop(img) for img in x]) if len(x) else x.new_empty(*x.shape[:2], *out)
        elif tuple(x.shape[-2:]) != out:
            from torchvision.transforms import v2  # here: importing torchvision costs a worker about 1 s

            x = v2.functional.resize(x, list(out), interpolation=_mode(self.interpolation), antialias=True)
        m = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return (x - m) / s  # the same operations as datasets.to_float: identical inputs at native size


def _mode(name: str):
    from torchvision.transforms import v2

    return v2.InterpolationMode(name)


@functools.lru_cache(maxsize=8)
def _augmenter(size: tuple[int, int], interpolation: str, scale: float):
    """Applied one image at a time: a v2 transform given a whole batch draws one crop for all of it."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, scale=(scale, 1.0), interpolation=_mode(interpolation),
                                            antialias=True), v2.RandomHorizontalFlip()])


def check_input(dataset_cfg) -> None:
    """``dataset.image_size`` / ``normalize`` / ``augment`` before anything is loaded."""
    size = dataset_cfg.get("image_size", None)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"dataset.image_size={size!r} must be a positive integer (pixels per side), "
                          "or null for the images' native size.")
    norm = dataset_cfg.get("normalize", "auto")
    if norm not in NORMALIZE:
        raise ConfigError(f"dataset.normalize={norm!r} is unknown. Choose one of {list(NORMALIZE)}: auto uses a "
                          "pretrained model's own statistics and otherwise the data set's.")
    augment = dataset_cfg.get("augment", False)
    if not isinstance(augment, bool):
        raise ConfigError(f"dataset.augment={augment!r} must be true or false.")
    scale = dataset_cfg.get("crop_scale", 0.08)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        raise ConfigError(f"dataset.crop_scale={scale!r} must be in (0, 1]: the smallest area fraction a random "
                          "crop keeps (0.08 is torchvision's default; 1.0 keeps whole images, only flipped).")


def input_pipeline(dataset_cfg, data, model_input: dict | None = None) -> InputPipeline:
    """The run's pipeline from the data set's config and statistics. ``model_input`` is what a
    pretrained model expects (timm's ``resolve_data_config``: input_size, mean, std,
    interpolation; None for a model trained from scratch)."""
    check_input(dataset_cfg)
    channels = data.x_train.shape[1]
    size = dataset_cfg.get("image_size", None)  # null: native (synthetic/imagefolder: stored at image_size)
    if size is None and model_input and model_input.get("input_size"):
        size = int(model_input["input_size"][-1])
    norm = dataset_cfg.get("normalize", "auto")
    if norm == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif norm == "auto" and model_input:
        mean, std = tuple(model_input["mean"]), tuple(model_input["std"])
    else:
        mean, std = data.mean, data.std
    if len(mean) != channels:  # RGB statistics for grey images: their mean over the channels
        mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
    interpolation = str((model_input or {}).get("interpolation", "bilinear"))
    return InputPipeline(int(size or data.x_train.shape[-1]), tuple(float(m) for m in mean),
                         tuple(float(s) for s in std), bool(dataset_cfg.get("augment", False)), interpolation,
                         float(dataset_cfg.get("crop_scale", 0.08)))
