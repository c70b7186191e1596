"""Loaders on tiny files written in the real on-disk formats, in tmp_path; nothing is ever downloaded."""
import gzip
import os
import pickle
import struct
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fedcl.data.datasets import DATASETS, load_dataset, to_float
from fedcl.errors import ConfigError


def cfg(**kw):
    return SimpleNamespace(**{"root": None, "download": False, **kw})


@pytest.fixture(autouse=True)
def network(monkeypatch):
    """Every URL torchvision tries to open (its downloads go through urllib.request.urlopen), refused."""
    tried = []

    def refuse(request, *args, **kwargs):
        tried.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return tried


# ---- CIFAR: pickled dicts of a uint8 (n, 3072) array (1024 R, 1024 G, 1024 B, rows of 32) and labels

@pytest.fixture
def no_cifar_md5(monkeypatch):
    """torchvision checks each CIFAR file against the md5 of the real archive's file, which tiny files
    cannot match. Setting the expected md5s to None keeps torchvision's own code path, including its
    existence check (check_integrity(path, None) is os.path.isfile), and drops only the checksum.
    Patching CIFAR10._check_integrity alone would not do: _load_meta checks the meta file's md5 itself."""
    from torchvision.datasets import CIFAR10, CIFAR100

    for cls in (CIFAR10, CIFAR100):
        monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})


def write_pickle(path, obj):
    # The real files are Python 2 pickles whose keys are py2 str; torchvision loads them with
    # encoding="latin1", which makes the keys Python 3 str ("data", "labels"). So the keys here are str:
    # bytes keys (b"data") would load as bytes and torchvision's entry["data"] would raise KeyError.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_batch(rng, n, num_classes, label_keys):
    batch = {"batch_label": "tiny", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             "filenames": [f"img{i}.png" for i in range(n)]}
    for key in label_keys:
        batch[key] = [int(v) for v in rng.integers(0, num_classes, n)]
    return batch


def write_cifar10(root, rng):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(rng, 3, 10, ["labels"])
        write_pickle(d / name, batches[name])
    write_pickle(d / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})
    return batches


def test_cifar10_round_trips_pixels_and_labels(tmp_path, no_cifar_md5, network):
    b = write_cifar10(tmp_path, np.random.default_rng(0))
    d = load_dataset(cfg(name="cifar10", root=str(tmp_path)), 0)
    train = [b[f"data_batch_{i}"] for i in range(1, 6)]
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_train.dtype == np.uint8 and d.num_classes == 10
    np.testing.assert_array_equal(d.x_train, np.concatenate([t["data"] for t in train]).reshape(15, 3, 32, 32))
    assert d.y_train.dtype == np.int64 and d.y_train.tolist() == sum((t["labels"] for t in train), [])
    np.testing.assert_array_equal(d.x_test[1, 2], b["test_batch"]["data"][1, 2048:].reshape(32, 32))  # blue
    assert d.y_test.tolist() == b["test_batch"]["labels"]
    assert not network


def test_cifar100_uses_fine_labels(tmp_path, no_cifar_md5):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    b = {name: cifar_batch(rng, n, 100, ["fine_labels", "coarse_labels"]) for name, n in (("train", 5), ("test", 2))}
    for name, batch in b.items():
        write_pickle(d / name, batch)
    write_pickle(d / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                              "coarse_label_names": [f"g{i}" for i in range(20)]})
    data = load_dataset(cfg(name="cifar100", root=str(tmp_path)), 0)
    assert data.num_classes == 100 and data.x_train.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(data.x_test, b["test"]["data"].reshape(2, 3, 32, 32))
    assert data.y_train.tolist() == b["train"]["fine_labels"] and data.y_test.tolist() == b["test"]["fine_labels"]


def test_cifar_checksums_are_checked(tmp_path):
    """Without the test's md5 patch torchvision rejects the tiny files: a ConfigError, not a traceback."""
    write_cifar10(tmp_path, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="corrupted.*dataset.download=true"):
        load_dataset(cfg(name="cifar10", root=str(tmp_path)), 0)


# ---- MNIST / Fashion-MNIST: IDX files, read in place in torchvision's <root>/<ClassName>/raw layout or
# directly in root, gzipped or not (Debian's dataset-fashion-mnist installs them gzipped in one folder)

def write_idx(folder, prefix, images, labels, gz=False):
    opener, ext = (gzip.open, ".gz") if gz else (open, "")
    with opener(folder / f"{prefix}-images-idx3-ubyte{ext}", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())
    with opener(folder / f"{prefix}-labels-idx1-ubyte{ext}", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


@pytest.mark.parametrize("layout", ["torchvision", "debian", "plain"])
@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_round_trips_pixels_and_labels(tmp_path, name, folder, layout, network):
    rng = np.random.default_rng(2)
    raw = tmp_path / folder / "raw" if layout == "torchvision" else tmp_path
    raw.mkdir(parents=True, exist_ok=True)
    xtr, ytr = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), np.array([0, 1, 2, 3, 4, 9], np.uint8)
    xte, yte = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.array([9, 8, 7], np.uint8)
    write_idx(raw, "train", xtr, ytr, gz=layout == "debian")
    write_idx(raw, "t10k", xte, yte, gz=layout == "debian")
    d = load_dataset(cfg(name=name, root=str(tmp_path)), 0)
    assert d.x_train.shape == (6, 1, 28, 28) and d.x_train.dtype == np.uint8 and d.num_classes == 10
    np.testing.assert_array_equal(d.x_train[:, 0], xtr)
    np.testing.assert_array_equal(d.x_test[:, 0], xte)
    assert d.y_train.dtype == np.int64 and d.y_train.tolist() == ytr.tolist() and d.y_test.tolist() == [9, 8, 7]
    assert not network and sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        p.name for p in raw.iterdir())  # read in place: nothing copied or unpacked

    next(raw.glob("t10k-labels-idx1-ubyte*")).unlink()
    with pytest.raises(ConfigError, match="dataset.download=true"):
        load_dataset(cfg(name=name, root=str(tmp_path)), 0)


def test_corrupt_idx_file_is_a_config_error(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path, "train", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(4, dtype=np.uint8))
    write_idx(tmp_path, "t10k", rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), np.arange(2, dtype=np.uint8))
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="truncated"):
        load_dataset(cfg(name="fashion_mnist", root=str(tmp_path)), 0)


FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="real Fashion-MNIST not installed (apt-get install "
                    "dataset-fashion-mnist; .ci/run installs it where apt is available)")
def test_debian_fashion_mnist_loads_in_place():
    d = load_dataset(cfg(name="fashion_mnist", root=FASHION, train_per_class=100, test_per_class=10), 0)
    assert d.x_train.shape == (1000, 1, 28, 28) and d.x_test.shape == (100, 1, 28, 28) and d.num_classes == 10
    assert (np.bincount(d.y_train) == 100).all() and 0.2 < d.mean[0] < 0.4


# ---- subsets: dataset.train_per_class / test_per_class for every data set

def test_subsets_are_stratified_and_seeded():
    full = load_dataset(cfg(name="digits"), 0)
    a = load_dataset(cfg(name="digits", train_per_class=20, test_per_class=5), 0)
    b = load_dataset(cfg(name="digits", train_per_class=20, test_per_class=5), 0)
    c = load_dataset(cfg(name="digits", train_per_class=20, test_per_class=5), 1)
    assert (np.bincount(a.y_train) == 20).all() and (np.bincount(a.y_test) == 5).all()
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    # rows of the subset are rows of the whole set, with their own labels
    whole = {row.tobytes(): y for row, y in zip(full.x_train, full.y_train)}
    assert all(whole[row.tobytes()] == y for row, y in zip(a.x_train, a.y_train))
    # the training subset does not move when only the test subset changes; more than a class has: all of it
    other_test = load_dataset(cfg(name="digits", train_per_class=20, test_per_class=10_000), 0)
    np.testing.assert_array_equal(a.x_train, other_test.x_train)
    assert len(other_test.y_test) == len(full.y_test)
    with pytest.raises(ConfigError, match="train_per_class=0 must be a positive integer"):
        load_dataset(cfg(name="digits", train_per_class=0), 0)


# ---- imagefolder

def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder_round_trips_and_resizes(tmp_path):
    rng = np.random.default_rng(3)
    imgs = {}
    for split, n in (("train", 2), ("test", 1)):
        for cls in ("cat", "dog"):
            for i in range(n):
                imgs[split, cls, i] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                save(tmp_path / split / cls / f"{i}.png", imgs[split, cls, i])
    save(tmp_path / "train" / "dog" / "9.png", np.full((40, 30), 77, np.uint8))  # grayscale, other size
    d = load_dataset(cfg(name="imagefolder", root=str(tmp_path), image_size=16), 0)
    assert d.x_train.shape == (5, 3, 16, 16) and d.x_train.dtype == np.uint8 and d.num_classes == 2
    assert d.y_train.tolist() == [0, 0, 1, 1, 1] and d.y_test.tolist() == [0, 1]  # classes sorted: cat, dog
    # a PNG already image_size square comes back exactly (PIL's resize to the same size is a copy)
    np.testing.assert_array_equal(d.x_train[1], imgs["train", "cat", 1].transpose(2, 0, 1))
    np.testing.assert_array_equal(d.x_test[1], imgs["test", "dog", 0].transpose(2, 0, 1))
    assert (d.x_train[4] == 77).all()  # grey -> RGB, resized


def test_imagefolder_rejects_bad_layouts(tmp_path):
    with pytest.raises(ConfigError, match="no 'train' folder"):
        load_dataset(cfg(name="imagefolder", root=str(tmp_path)), 0)
    for split, cls in (("train", "cat"), ("train", "dog"), ("test", "cat"), ("test", "bird")):
        save(tmp_path / split / cls / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ConfigError, match="different classes"):
        load_dataset(cfg(name="imagefolder", root=str(tmp_path), image_size=4), 0)
    (tmp_path / "test" / "bird" / "0.png").unlink()
    with pytest.raises(ConfigError, match="/test: Found no valid file"):  # an empty class folder
        load_dataset(cfg(name="imagefolder", root=str(tmp_path), image_size=4), 0)


# ---- digits and synthetic

def test_digits_is_stratified_and_seeded():
    a, b = load_dataset(cfg(name="digits"), 0), load_dataset(cfg(name="digits"), 0)
    c = load_dataset(cfg(name="digits", test_fraction=0.5), 1)
    assert a.x_train.shape[1:] == (1, 8, 8) and a.x_train.dtype == np.uint8 and a.num_classes == 10
    assert len(a.x_train) + len(a.x_test) == 1797 and len(a.x_test) == 360 and len(c.x_test) == 899
    assert a.x_train.max() == 240 and not (a.x_train % 15).any()  # 0..16 * 15
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_train[:len(c.y_train)], c.y_train)
    everything = np.bincount(np.concatenate([a.y_train, a.y_test]))
    assert (np.abs(np.bincount(a.y_test) - 0.2 * everything) <= 1).all()
    pixels = a.x_train.astype(np.float64) / 255
    assert a.mean == pytest.approx((pixels.mean(),)) and a.std == pytest.approx((pixels.std(),))


SYN = dict(name="synthetic", num_classes=10, train_per_class=50, test_per_class=20, image_size=16, channels=1)


def test_synthetic_is_shaped_and_seeded():
    a, b, c = load_dataset(cfg(**SYN), 0), load_dataset(cfg(**SYN), 0), load_dataset(cfg(**SYN), 1)
    assert a.x_train.shape == (500, 1, 16, 16) and a.x_test.shape == (200, 1, 16, 16)
    assert a.x_train.dtype == np.uint8 and a.num_classes == 10
    assert (np.bincount(a.y_train) == 50).all() and (np.bincount(a.y_test) == 20).all()
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_train, c.x_train)
    more_test = load_dataset(cfg(**{**SYN, "test_per_class": 5}), 0)
    np.testing.assert_array_equal(a.x_train, more_test.x_train)
    rgb = load_dataset(cfg(**{**SYN, "channels": 3, "image_size": 32, "num_classes": 3}), 0)
    assert rgb.x_train.shape == (150, 3, 32, 32) and len(rgb.mean) == len(rgb.std) == 3


def test_synthetic_is_learnable_but_not_copies():
    d = load_dataset(cfg(**SYN), 0)
    xtr = to_float(d.x_train, d.mean, d.std).flatten(1).numpy()
    xte = to_float(d.x_test, d.mean, d.std).flatten(1).numpy()
    means = np.stack([xtr[d.y_train == k].mean(0) for k in range(10)])
    pred = ((xte[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == d.y_test).mean() > 0.8
    assert d.x_train[d.y_train == 0].std(axis=0).mean() > 10  # samples of a class differ


# ---- to_float, config objects, errors

def test_to_float_normalises_per_channel():
    x = np.zeros((2, 2, 3, 3), np.uint8)
    x[:, 1] = 255
    out = to_float(x, (0.0, 0.5), (1.0, 0.25))
    assert out.dtype == torch.float32 and out.shape == (2, 2, 3, 3)
    assert (out[:, 0] == 0).all() and torch.allclose(out[:, 1], torch.tensor(2.0))
    assert torch.equal(to_float(torch.from_numpy(x), (0.0, 0.5), (1.0, 0.25)), out)


def test_omegaconf_configs_work():
    d = load_dataset(OmegaConf.create({"name": "digits", "root": None, "download": False}), 0)
    assert len(d.x_test) == 360  # test_fraction missing -> 0.2
    with pytest.raises(ConfigError, match="dataset.root"):  # imagefolder.yaml has root: ???
        load_dataset(OmegaConf.create({"name": "imagefolder", "root": "???", "download": False}), 0)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_data_says_how_to_fix(tmp_path, name, network):
    with pytest.raises(ConfigError, match="dataset.root.*dataset.download=true"):
        load_dataset(cfg(name=name, root=None), 0)
    with pytest.raises(ConfigError, match=f"dataset.root={tmp_path / 'nothing'} has no .*dataset.download=true"):
        load_dataset(cfg(name=name, root=str(tmp_path / "nothing")), 0)
    with pytest.raises(ConfigError, match="dataset.download=true"):
        load_dataset(cfg(name=name, root=str(tmp_path), download="true"), 0)  # a string never downloads
    assert not network


def test_download_is_tried_only_when_asked(tmp_path, network):
    with pytest.raises(ConfigError, match="Could not fetch CIFAR-10") as err:
        load_dataset(cfg(name="cifar10", root=str(tmp_path), download=True), 0)
    assert network and "\n" not in str(err.value)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ConfigError, match="'imagenet'") as err:
        load_dataset(cfg(name="imagenet"), 0)
    assert all(name in str(err.value) for name in DATASETS)
