"""Data sets as uint8 image arrays (N, C, H, W) plus int64 labels; fedcl.data.transforms turns a
batch of rows into model inputs (resize, augmentation, normalisation with mean/std).

uint8 keeps every worker's copy small (CIFAR-100's training set is 150 MB, not 600 MB as float32).
Torchvision sets are read from ``dataset.root`` and fetched only when ``dataset.download=true``.
"""
from __future__ import annotations

import gzip
import struct
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
IDX_SETS = ("mnist", "fashion_mnist")  # read from IDX files in place (see load_idx)


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


IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzipped or not: magic 0x0000 08 <ndim>, big-endian uint32
    dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an uint8 IDX file (its first bytes are {raw[:4].hex()}); "
                          "replace it with the data set's original file.")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(bytearray(raw), np.uint8, offset=4 + 4 * ndim)  # writable: torch warns on read-only
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated: its header says {dims} values, it holds {data.size}; "
                          "replace it with the data set's original file.")
    return data.reshape(dims)


def idx_folder(root: Path, cls_name: str) -> Path | None:
    """Where the four IDX files are: directly in root (as Debian's dataset-* packages install them,
    gzipped) or in torchvision's ``<root>/<Class>/raw``; None if in neither."""
    for folder in (root, root / cls_name / "raw", root / cls_name):
        if all(idx_file(folder, name) for pair in IDX_NAMES.values() for name in pair):
            return folder
    return None


def idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_idx(name: str, folder: Path) -> DataSplit:
    """MNIST-style IDX files, read in place."""
    arrays = {}
    for split, (images, labels) in IDX_NAMES.items():
        x, y = read_idx(idx_file(folder, images)), read_idx(idx_file(folder, labels))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ConfigError(f"{folder}: {images} holds {x.shape} and {labels} {y.shape}; expected N images of "
                              "H x W and N labels. Replace them with the data set's original files.")
        arrays[split] = (x[:, None], y.astype(np.int64))
    (xtr, ytr), (xte, yte) = arrays["train"], arrays["test"]
    return _split(name, xtr, ytr, xte, yte, int(max(ytr.max(), yte.max())) + 1)


def load_torchvision(cfg, seed: int) -> DataSplit:
    """MNIST, Fashion-MNIST, CIFAR-10/100 under root. MNIST-style IDX files are read in place, in
    torchvision's layout or directly in root (gzipped or not); the rest through torchvision, which
    also fetches a missing set when ``dataset.download=true``."""
    cls_name, label, files = TORCHVISION[cfg.name]
    hint = ", and dataset.download=true to fetch it there (needs internet)"
    if cfg.name in IDX_SETS:
        files = (f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                 f"t10k-labels-idx1-ubyte, gzipped or not, in the folder itself or in {cls_name}/raw/")
    root = _need_root(cfg, f"(or will hold) the {label} files ({files})", hint)
    download = getattr(cfg, "download", False) is True  # a string such as "false" never downloads
    if cfg.name in IDX_SETS and (folder := idx_folder(root, cls_name)) is not None:
        return load_idx(cfg.name, folder)
    import torchvision.datasets as tvd

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
    """The data set ``cfg.name`` names; ``seed`` decides the digits split, the synthetic images and
    the subset that ``dataset.train_per_class`` / ``test_per_class`` keep."""
    name = getattr(cfg, "name", None)
    if name == "digits":
        data = load_digits(cfg, seed)
    elif name == "synthetic":
        return load_synthetic(cfg, seed)  # generates exactly train_per_class / test_per_class per class
    elif name in TORCHVISION:
        data = load_torchvision(cfg, seed)
    elif name == "imagefolder":
        data = load_imagefolder(cfg, seed)
    else:
        raise ConfigError(f"dataset.name={name!r} is unknown. Choose one of: {', '.join(DATASETS)}.")
    return subset(data, _per_class(cfg, "train_per_class"), _per_class(cfg, "test_per_class"), seed)


def _per_class(cfg, key: str) -> int | None:
    value = getattr(cfg, key, None)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"dataset.{key}={value!r} must be a positive integer (images kept per class), "
                          "or null for all of them.")
    return value


def stratified_rows(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: ``per_class`` rows of each class drawn without replacement (all of a
    class that has fewer)."""
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)) if picks else np.empty(0, np.int64)


def subset(data: DataSplit, train_per_class: int | None, test_per_class: int | None, seed: int) -> DataSplit:
    """A seeded, stratified subset of a data set (None keeps a split whole). Training and test rows
    come from separate streams, so the training subset does not change with ``test_per_class``."""
    if train_per_class is None and test_per_class is None:
        return data
    xtr, ytr, xte, yte = data.x_train, data.y_train, data.x_test, data.y_test
    if train_per_class is not None:
        rows = stratified_rows(ytr, train_per_class, np.random.default_rng([seed, 31, 1]))
        xtr, ytr = xtr[rows], ytr[rows]
    if test_per_class is not None:
        rows = stratified_rows(yte, test_per_class, np.random.default_rng([seed, 31, 2]))
        xte, yte = xte[rows], yte[rows]
    return _split(data.name, xtr, ytr, xte, yte, data.num_classes)
