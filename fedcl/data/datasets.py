"""Data sets as uint8 image arrays (N, C, H, W) plus int64 labels; fedcl.data.transforms turns a
batch of rows into model inputs (resize, augmentation, normalisation with mean/std).

uint8 keeps every worker's copy small (CIFAR-100's training set is 150 MB, not 600 MB as float32).
Torchvision sets are read from ``dataset.root`` and fetched only when ``dataset.download=true``.
Image folders, too large for a copy per worker, are decoded once per machine into a cache that
every worker memory-maps (``load_imagefolder``).
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import shutil
import struct
import tempfile
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


CACHE_VERSION = 1  # bump when the cache's layout or decoding changes: old entries are then ignored


def cache_root(cfg) -> Path:
    """``dataset.cache_dir``, else $FEDCL_CACHE_DIR, else $XDG_CACHE_HOME/fedcl or ~/.cache/fedcl: on
    disk, not a RAM-backed temp dir, so the OS may drop pages it does not need."""
    path = getattr(cfg, "cache_dir", None) or os.environ.get("FEDCL_CACHE_DIR")
    if not path:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedcl"
    return Path(str(path)).expanduser()


def load_imagefolder(cfg, seed: int) -> DataSplit:
    """root/train/<class>/* and root/test/<class>/*, decoded once per machine into a cache of raw
    uint8 files that every worker memory-maps read-only: the OS page cache holds one copy for all
    of them. Images are stored at their native size when they all share one (and it is within
    ``dataset.max_size``), else resized to max_size square (null: ``image_size``, else 32); the
    input pipeline resizes each batch to ``image_size``."""
    from torchvision.datasets import ImageFolder

    layout = "train/<class>/*.png and test/<class>/*.png (the same class folders in both)"
    root = _need_root(cfg, layout, "")
    cap = getattr(cfg, "max_size", None)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(f"dataset.max_size={cap!r} must be a positive integer (the largest side images are "
                          "stored at, in px), or null.")
    fallback = int(getattr(cfg, "image_size", None) or 32)
    found = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise ConfigError(f"dataset.root={root} has no '{split}' folder; imagefolder expects {layout}.")
        try:
            found[split] = ImageFolder(str(root / split), loader=lambda p: p)  # lists files, opens none
        except FileNotFoundError as err:  # no class folders, or a class folder with no images
            raise ConfigError(f"dataset.root={root}/{split}: {str(err).rstrip('.')}. "
                              f"imagefolder expects {layout}.") from None
    if found["train"].classes != found["test"].classes:
        raise ConfigError(f"dataset.root={root}: the train and test folders have different classes "
                          f"({found['train'].classes} vs {found['test'].classes}); they must match.")
    # the entry is named by everything its content depends on: a changed file gets a new one
    listing = {split: [(str(Path(p).relative_to(root)), *_stamp(p)) for p, _ in ds.samples]
               for split, ds in found.items()}
    key = hashlib.sha256(json.dumps([CACHE_VERSION, str(root.resolve()), listing]).encode()).hexdigest()[:24]
    samples = {split: ds.samples for split, ds in found.items()}
    cache = cache_root(cfg)
    native = _native_size(cache / f"imagefolder-{key}.size.json", samples)
    if native is not None:  # one native size: kept, or scaled down to the cap with its aspect
        w, h = native
        if cap is not None and max(w, h) > cap:
            w, h = max(1, round(w * cap / max(w, h))), max(1, round(h * cap / max(w, h)))
    else:
        w = h = cap if cap is not None else fallback
    entry = cache / f"imagefolder-{key}-{w}x{h}"  # configs that store the same size share it
    if not (entry / "header.json").is_file():
        _write_cache(entry, samples, w, h)
    header = json.loads((entry / "header.json").read_text())

    def mapped(split):
        x = np.memmap(entry / f"x_{split}.u8", np.uint8, mode="r", shape=tuple(header[f"x_{split}"]))
        return x, np.load(entry / f"y_{split}.npy")

    (xtr, ytr), (xte, yte) = mapped("train"), mapped("test")
    return DataSplit("imagefolder", xtr, ytr, xte, yte, len(found["train"].classes),
                     tuple(header["mean"]), tuple(header["std"]))


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _native_size(path: Path, samples: dict[str, list]) -> tuple[int, int] | None:
    """(width, height) that every image shares, None if they differ; from the files' headers, once
    (remembered in ``path``)."""
    from PIL import Image

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f"{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one worker reads the headers, the others wait for it
            if not path.is_file():
                sizes = set()
                for rows in samples.values():
                    for file, _ in rows:
                        with Image.open(file) as im:  # reads the header only
                            sizes.add(im.size)
                tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps(list(sizes.pop()) if len(sizes) == 1 else None))
                os.replace(tmp, path)  # atomic: a reader sees no file or the whole one
    size = json.loads(path.read_text())
    return None if size is None else tuple(size)


def _write_cache(entry: Path, samples: dict[str, list], w: int, h: int) -> None:
    """Decode every image into ``entry`` once: under a file lock (the workers that wait then find it
    written), into a temporary folder renamed into place only when complete and synced, so no
    reader ever sees a partial entry."""
    from PIL import Image

    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (entry / "header.json").is_file():
            return
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f"{entry.name}.tmp-"))
        try:
            header = {"version": CACHE_VERSION}
            for split, rows in samples.items():
                out = np.memmap(tmp / f"x_{split}.u8", np.uint8, mode="w+", shape=(len(rows), 3, h, w))
                for i, (path, _) in enumerate(rows):  # one image in memory at a time
                    with Image.open(path) as im:
                        im = im.convert("RGB")
                        out[i] = np.asarray(im if im.size == (w, h) else im.resize((w, h))).transpose(2, 0, 1)
                if split == "train":
                    header["mean"], header["std"] = _channel_stats(out)
                out.flush()
                del out
                np.save(tmp / f"y_{split}.npy", np.array([label for _, label in rows], np.int64))
                header[f"x_{split}"] = [len(rows), 3, h, w]
            (tmp / "header.json").write_text(json.dumps(header))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.rename(tmp, entry)
            dirfd = os.open(entry.parent, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


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
