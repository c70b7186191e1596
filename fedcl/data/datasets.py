"""Data sets as uint8 image arrays (N, C, H, W) plus labels; models normalise with mean/std.

uint8 keeps every worker's copy small (CIFAR-100's training set is 150 MB, not 600 MB).
Torchvision sets are read from ``dataset.root`` and fetched only when ``dataset.download=true``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedcl.errors import ConfigError

DATASETS = ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder")


@dataclass
class DataSplit:
    name: str
    x_train: np.ndarray   # uint8 (N, C, H, W)
    y_train: np.ndarray   # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]  # per channel, of x_train / 255
    std: tuple[float, ...]


def to_float(x, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float32: (x / 255 - mean) / std per channel."""
    x = torch.as_tensor(x).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def _split(name, x_train, y_train, x_test, y_test, num_classes) -> DataSplit:
    f = x_train.astype(np.float32) / 255.0
    mean = tuple(float(v) for v in f.mean(axis=(0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in f.std(axis=(0, 2, 3)))
    return DataSplit(name, np.ascontiguousarray(x_train, np.uint8), np.asarray(y_train, np.int64),
                     np.ascontiguousarray(x_test, np.uint8), np.asarray(y_test, np.int64),
                     int(num_classes), mean, std)


def load_digits(cfg, seed: int) -> DataSplit:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = (bunch.images * 15).astype(np.uint8)[:, None]  # 0..16 -> 0..240
    xtr, xte, ytr, yte = train_test_split(x, bunch.target, test_size=float(getattr(cfg, "test_fraction", 0.2)),
                                          stratify=bunch.target, random_state=seed)
    return _split("digits", xtr, ytr, xte, yte, 10)


def load_synthetic(cfg, seed: int) -> DataSplit:
    """Per class a smooth random prototype; samples = shifted prototype + noise."""
    k, size, ch = int(cfg.num_classes), int(cfg.image_size), int(cfg.channels)
    ntr, nte = int(cfg.train_per_class), int(cfg.test_per_class)
    rng = np.random.default_rng([seed, 99])
    coarse = rng.uniform(0, 255, size=(k, ch, 4, 4))
    reps = -(-size // 4)
    protos = np.kron(coarse, np.ones((1, 1, reps, reps)))[:, :, :size, :size]

    def draw(n, r):
        y = np.repeat(np.arange(k), n)
        shift = r.integers(-1, 2, size=(len(y), 2))
        imgs = protos[y]
        rows = (np.arange(size)[None, :] - shift[:, :1]) % size
        cols = (np.arange(size)[None, :] - shift[:, 1:]) % size
        imgs = imgs[np.arange(len(y))[:, None, None, None], np.arange(ch)[None, :, None, None],
                    rows[:, None, :, None], cols[:, None, None, :]]
        imgs = imgs + r.normal(0, 40, size=imgs.shape)
        return np.clip(imgs, 0, 255).astype(np.uint8), y

    xtr, ytr = draw(ntr, np.random.default_rng([seed, 100]))
    xte, yte = draw(nte, np.random.default_rng([seed, 101]))
    return _split("synthetic", xtr, ytr, xte, yte, k)


def _need_root(cfg, what: str) -> Path:
    root = getattr(cfg, "root", None)
    if not root:
        raise ConfigError(f"dataset={cfg.name} needs dataset.root: the folder that holds {what}. "
                          "Set dataset.root=/path/to/data (and dataset.download=true to fetch it).")
    return Path(str(root)).expanduser()


def load_torchvision(cfg, seed: int) -> DataSplit:
    import torchvision.datasets as tvd

    name = cfg.name
    classes = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST,
               "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}
    cls = classes[name]
    root = _need_root(cfg, f"the {cls.__name__} files")
    download = bool(getattr(cfg, "download", False))
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as err:
        raise ConfigError(f"dataset.root={root} has no {cls.__name__} files ({err}). Put the data set "
                          "there, or set dataset.download=true to fetch it (needs internet).") from None

    def arrays(ds):
        x = np.asarray(ds.data)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        return x, np.asarray(ds.targets, dtype=np.int64)

    (xtr, ytr), (xte, yte) = arrays(train), arrays(test)
    return _split(name, xtr, ytr, xte, yte, len(train.classes))


def load_imagefolder(cfg, seed: int) -> DataSplit:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = _need_root(cfg, "train/<class>/ and test/<class>/ image folders")
    size = int(getattr(cfg, "image_size", 32))
    sets = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise ConfigError(f"dataset.root={root} has no '{split}' folder; imagefolder expects "
                              f"{root}/train/<class>/*.png and {root}/test/<class>/*.png.")
        ds = ImageFolder(str(root / split))
        x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p, _ in ds.samples])
        sets[split] = (ds.classes, x.transpose(0, 3, 1, 2), np.array(ds.targets, np.int64))
    if sets["train"][0] != sets["test"][0]:
        raise ConfigError(f"dataset.root={root}: train and test folders have different classes "
                          f"({sets['train'][0]} vs {sets['test'][0]}).")
    return _split("imagefolder", sets["train"][1], sets["train"][2], sets["test"][1], sets["test"][2],
                  len(sets["train"][0]))


def load_dataset(cfg, seed: int) -> DataSplit:
    name = getattr(cfg, "name", None)
    if name == "digits":
        return load_digits(cfg, seed)
    if name == "synthetic":
        return load_synthetic(cfg, seed)
    if name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        return load_torchvision(cfg, seed)
    if name == "imagefolder":
        return load_imagefolder(cfg, seed)
    raise ConfigError(f"dataset={name!r} is unknown. Choose one of {list(DATASETS)}.")
