"""Data sets as uint8 image arrays (N, C, H, W) plus int64 labels; fedcl.data.transforms turns a
batch of rows into model inputs (resize, augmentation, normalisation with mean/std).

uint8 keeps every worker's copy small (CIFAR-100's training set is 150 MB, not 600 MB as float32).
Torchvision sets are read from ``dataset.root`` and fetched only when ``dataset.download=true``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf.errors import MissingMandatoryValue

from fedcl.errors import ConfigError

DATASETS = ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder")

# name -> (torchvision.datasets class, name in messages, what torchvision looks for under root)
TORCHVISION = {
    "mnist": ("MNIST", "MNIST", "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"),
    "fashion_mnist": ("FashionMNIST", "Fashion-MNIST",
                      "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"),
    "cifar10": ("CIFAR10", "CIFAR-10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "CIFAR-100", "cifar-100-python"),
}


@dataclass
class DataSplit:
    name: str
    x_train: np.ndarray  # uint8 (N, C, H, W)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray  # uint8 (M, C, H, W)
    y_test: np.ndarray  # int64 (M,)
    num_classes: int
    mean: tuple[float, ...]  # per channel, of x_train / 255
    std: tuple[float, ...]  # per channel, of x_train / 255, at least 1e-3


def to_float(x: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float32: (x / 255 - mean) / std per channel."""
    x = torch.as_tensor(x).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of x/255, summed a chunk at a time: no float copy of the whole set.
    The float64 sums of squared uint8 values are exact integers, so E[x^2] - E[x]^2 is safe."""
    total, squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for i in range(0, len(x), 1024):
        f = x[i:i + 1024].astype(np.float64)
        total += f.sum(axis=(0, 2, 3))
        squares += np.einsum("nchw,nchw->c", f, f)
    n = x.size / x.shape[1]
    mean = total / n / 255.0
    std = np.sqrt(np.maximum(squares / n / 255.0**2 - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in std)


def _split(name, x_train, y_train, x_test, y_test, num_classes) -> DataSplit:
    x_train = np.ascontiguousarray(x_train, np.uint8)
    mean, std = _channel_stats(x_train)
    return DataSplit(name, x_train, np.asarray(y_train, np.int64), np.ascontiguousarray(x_test, np.uint8),
                     np.asarray(y_test, np.int64), int(num_classes), mean, std)


def load_digits(cfg, seed: int) -> DataSplit:
    """scikit-learn's bundled 8x8 digits (no download); values 0..16 scaled to 0..240."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = (bunch.images * 15).astype(np.uint8)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, bunch.target, test_size=float(getattr(cfg, "test_fraction", 0.2)),
                                          stratify=bunch.target, random_state=seed)
    return _split("digits", xtr, ytr, xte, yte, 10)


def load_synthetic(cfg, seed: int) -> DataSplit:
    """Learnable images with no files: per class a smooth random prototype (a 4x4 random pattern
    upsampled bilinearly); each sample is the prototype shifted by a few pixels plus Gaussian noise."""
    k, size, ch = int(cfg.num_classes), int(cfg.image_size or 16), int(cfg.channels)
    m = max(1, size // 16)  # largest shift in pixels
    coarse = np.random.default_rng([seed, 0]).uniform(0, 255, (k, ch, 4, 4)).astype(np.float32)
    big = F.interpolate(torch.from_numpy(coarse), size=(size + 2 * m,) * 2, mode="bilinear",
                        align_corners=False).numpy()
    shifts = 2 * m + 1  # a sample's view is one of shifts^2 crops of its prototype (row-major)

    def draw(n: int, rng: np.random.Generator):
        x = np.empty((k * n, ch, size, size), np.uint8)
        for c in range(k):  # a class at a time keeps the float temporaries small
            views = rng.integers(shifts * shifts, size=n)  # cropped per sample: never all views at once
            imgs = np.stack([big[c, :, v // shifts:v // shifts + size, v % shifts:v % shifts + size] for v in views])
            imgs += 40.0 * rng.standard_normal(imgs.shape, dtype=np.float32)
            x[c * n:(c + 1) * n] = np.clip(imgs, 0, 255)
        return x, np.repeat(np.arange(k), n)

    # separate streams: the training set does not change when test_per_class does
    xtr, ytr = draw(int(cfg.train_per_class), np.random.default_rng([seed, 1]))
    xte, yte = draw(int(cfg.test_per_class), np.random.default_rng([seed, 2]))
    return _split("synthetic", xtr, ytr, xte, yte, k)


def _need_root(cfg, what: str, hint: str) -> Path:
    try:
        root = getattr(cfg, "root", None)
    except MissingMandatoryValue:  # root: ??? in the YAML
        root = None
    if not root:
        raise ConfigError(f"dataset={cfg.name} needs dataset.root: the folder that holds {what}. "
                          f"Set dataset.root=/path/to/data{hint}.")
    return Path(str(root)).expanduser()


def load_torchvision(cfg, seed: int) -> DataSplit:
    """MNIST, Fashion-MNIST, CIFAR-10/100 through torchvision, which reads its usual files under root."""
    import torchvision.datasets as tvd

    cls_name, label, files = TORCHVISION[cfg.name]
    hint = ", and dataset.download=true to fetch it there (needs internet)"
    root = _need_root(cfg, f"(or will hold) the {label} files ({files})", hint)
    download = getattr(cfg, "download", False) is True  # a string such as "false" never downloads
    try:
        train = getattr(tvd, cls_name)(str(root), train=True, download=download)
        test = getattr(tvd, cls_name)(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:  # "Dataset not found ...", or a failed download
        err = " ".join(str(err).split())  # MNIST's download error spans lines; keep one paragraph
        if download:
            raise ConfigError(f"Could not fetch {label} into dataset.root={root} ({err}). Check the "
                              f"internet connection, or put the files there yourself ({files}).") from None
        raise ConfigError(f"dataset.root={root} has no {label} files ({files}), or they are corrupted "
                          f"(torchvision: {err}). Put the data set there, or set dataset.download=true "
                          "to fetch it (needs internet).") from None

    def arrays(ds):
        x = np.asarray(ds.data)  # MNIST: torch uint8 (N, 28, 28); CIFAR: numpy (N, 32, 32, 3)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        return x, np.asarray(ds.targets, dtype=np.int64)

    (xtr, ytr), (xte, yte) = arrays(train), arrays(test)
    return _split(cfg.name, xtr, ytr, xte, yte, len(train.classes))


def load_imagefolder(cfg, seed: int) -> DataSplit:
    """root/train/<class>/* and root/test/<class>/*, every image RGB and resized to image_size square."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    layout = "train/<class>/*.png and test/<class>/*.png (the same class folders in both)"
    root = _need_root(cfg, layout, "")
    size = int(getattr(cfg, "image_size", None) or 32)  # stored at that size: no batch resize
    sets = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise ConfigError(f"dataset.root={root} has no '{split}' folder; imagefolder expects {layout}.")
        try:
            ds = ImageFolder(str(root / split))
        except FileNotFoundError as err:  # no class folders, or a class folder with no images
            raise ConfigError(f"dataset.root={root}/{split}: {str(err).rstrip('.')}. "
                              f"imagefolder expects {layout}.") from None

        def read(path):
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB").resize((size, size)))

        x = np.stack([read(p) for p, _ in ds.samples]).transpose(0, 3, 1, 2)
        sets[split] = (ds.classes, x, np.array(ds.targets, np.int64))
    if sets["train"][0] != sets["test"][0]:
        raise ConfigError(f"dataset.root={root}: the train and test folders have different classes "
                          f"({sets['train'][0]} vs {sets['test'][0]}); they must match.")
    (classes, xtr, ytr), (_, xte, yte) = sets["train"], sets["test"]
    return _split("imagefolder", xtr, ytr, xte, yte, len(classes))


def load_dataset(cfg, seed: int) -> DataSplit:
    """The data set ``cfg.name`` names; ``seed`` decides the digits split and the synthetic images."""
    name = getattr(cfg, "name", None)
    if name == "digits":
        return load_digits(cfg, seed)
    if name == "synthetic":
        return load_synthetic(cfg, seed)
    if name in TORCHVISION:
        return load_torchvision(cfg, seed)
    if name == "imagefolder":
        return load_imagefolder(cfg, seed)
    raise ConfigError(f"dataset.name={name!r} is unknown. Choose one of: {', '.join(DATASETS)}.")
