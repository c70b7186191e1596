"""Loaders on tiny files written in the real on-disk formats (no download anywhere)."""
import os
import pickle
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fedcl.data.datasets import load_dataset, to_float
from fedcl.errors import ConfigError


def cfg(**kw):
    return SimpleNamespace(**{"root": None, "download": False, **kw})


@pytest.fixture
def skip_md5(monkeypatch):
    """Real CIFAR pickles were written by Python 2 (str keys once loaded with latin1, as
    torchvision does); our tiny CIFAR files cannot match the real archives' md5 sums: check existence only."""
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def write_cifar(root, folder, train_names, test_name, meta_name, label_key, meta_key, n_classes, rng):
    d = root / folder
    d.mkdir(parents=True)
    written = {}
    for name in [*train_names, test_name]:
        x = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, n_classes, size=4)]
        with open(d / name, "wb") as f:
            pickle.dump({"data": x, label_key: y}, f, protocol=2)
        written[name] = (x, y)
    with open(d / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"c{i}" for i in range(n_classes)]}, f, protocol=2)
    return written


def test_cifar10_pickles_round_trip(tmp_path, skip_md5):
    rng = np.random.default_rng(0)
    train = [f"data_batch_{i}" for i in range(1, 6)]
    w = write_cifar(tmp_path, "cifar-10-batches-py", train, "test_batch", "batches.meta",
                    "labels", "label_names", 10, rng)
    d = load_dataset(cfg(name="cifar10", root=str(tmp_path)), 0)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_train.dtype == np.uint8 and d.num_classes == 10
    np.testing.assert_array_equal(d.x_train[:4], w["data_batch_1"][0].reshape(4, 3, 32, 32))
    assert d.y_train[:4].tolist() == w["data_batch_1"][1]
    np.testing.assert_array_equal(d.x_test, w["test_batch"][0].reshape(4, 3, 32, 32))


def test_cifar100_pickles_round_trip(tmp_path, skip_md5):
    rng = np.random.default_rng(1)
    w = write_cifar(tmp_path, "cifar-100-python", ["train"], "test", "meta", "fine_labels",
                    "fine_label_names", 100, rng)
    d = load_dataset(cfg(name="cifar100", root=str(tmp_path)), 0)
    assert d.num_classes == 100 and d.y_test.tolist() == w["test"][1]


def write_idx(raw, prefix, images, labels):
    with open(raw / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())
    with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_round_trip(tmp_path, name, folder):
    rng = np.random.default_rng(2)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    xtr, ytr = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), np.arange(6, dtype=np.uint8)
    xte, yte = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.array([9, 8, 7], np.uint8)
    write_idx(raw, "train", xtr, ytr)
    write_idx(raw, "t10k", xte, yte)
    d = load_dataset(cfg(name=name, root=str(tmp_path)), 0)
    assert d.x_train.shape == (6, 1, 28, 28) and d.num_classes == 10
    np.testing.assert_array_equal(d.x_train[:, 0], xtr)
    assert d.y_test.tolist() == [9, 8, 7]


def test_imagefolder(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls, value in (("cat", 10), ("dog", 200)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    d = load_dataset(cfg(name="imagefolder", root=str(tmp_path), image_size=16), 0)
    assert d.x_train.shape == (6, 3, 16, 16) and d.num_classes == 2
    assert d.x_train[d.y_train == 1].min() == 200 and d.x_test[d.y_test == 0].max() == 10


def test_digits_is_stratified_and_seeded():
    a, b = load_dataset(cfg(name="digits"), 0), load_dataset(cfg(name="digits"), 0)
    c = load_dataset(cfg(name="digits"), 1)
    assert a.x_train.shape[1:] == (1, 8, 8) and a.x_train.dtype == np.uint8 and a.num_classes == 10
    assert len(a.x_train) + len(a.x_test) == 1797
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.y_train, c.y_train)
    counts = np.bincount(a.y_test)
    assert counts.max() - counts.min() <= 2


def test_synthetic_is_seeded_and_learnable():
    kw = dict(name="synthetic", num_classes=10, train_per_class=50, test_per_class=20, image_size=16, channels=1)
    a, b, c = load_dataset(cfg(**kw), 0), load_dataset(cfg(**kw), 0), load_dataset(cfg(**kw), 1)
    assert a.x_train.shape == (500, 1, 16, 16) and a.x_test.shape == (200, 1, 16, 16)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    xtr = to_float(a.x_train, a.mean, a.std).flatten(1).numpy()
    xte = to_float(a.x_test, a.mean, a.std).flatten(1).numpy()
    means = np.stack([xtr[a.y_train == k].mean(0) for k in range(10)])
    pred = ((xte[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == a.y_test).mean() > 0.8


def test_missing_files_say_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="dataset.download=true"):
        load_dataset(cfg(name="cifar10", root=str(tmp_path / "nothing")), 0)
    with pytest.raises(ConfigError, match="dataset.root"):
        load_dataset(cfg(name="mnist", root=None), 0)
    with pytest.raises(ConfigError, match="train"):
        load_dataset(cfg(name="imagefolder", root=str(tmp_path)), 0)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ConfigError, match="digits.*synthetic.*cifar10"):
        load_dataset(cfg(name="imagenet"), 0)
