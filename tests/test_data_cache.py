"""Image folders are decoded once per machine into a cache that every load memory-maps read-only."""
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from fedcl.data.datasets import load_dataset


def cfg(**kw):
    return OmegaConf.create({"name": "imagefolder", "download": False, **kw})


def folder(root, size=(12, 10), per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.png")
    return root


def test_two_loads_share_one_read_only_cache_file(tmp_path):
    root, cache = folder(tmp_path / "data"), tmp_path / "cache"
    a = load_dataset(cfg(root=str(root), cache_dir=str(cache), image_size=8), 0)
    b = load_dataset(cfg(root=str(root), cache_dir=str(cache), image_size=8), 0)
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and not list(cache.glob("*.tmp-*"))  # one entry, no leftovers
    for d in (a, b):
        assert isinstance(d.x_train, np.memmap) and str(d.x_train.filename) == str(entries[0] / "x_train.u8")
        assert not d.x_train.flags.writeable and not d.x_test.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        a.x_train[0, 0, 0, 0] = 1
    # uniform images stay at their native size (H x W = 10 x 12): batches are resized later
    assert a.x_train.shape == (6, 3, 10, 12) and a.x_test.shape == (6, 3, 10, 12)
    with Image.open(root / "train" / "b" / "1.png") as im:
        np.testing.assert_array_equal(a.x_train[4], np.asarray(im).transpose(2, 0, 1))
    assert a.y_train.tolist() == [0, 0, 0, 1, 1, 1] and a.mean == b.mean
    pixels = np.asarray(a.x_train, np.float64) / 255
    assert a.mean == pytest.approx(tuple(pixels.mean(axis=(0, 2, 3))))

    # a subset of the mapped set still works (its rows are copied: it is small by intent)
    sub = load_dataset(cfg(root=str(root), cache_dir=str(cache), train_per_class=1), 0)
    assert sub.x_train.shape == (2, 3, 10, 12) and len([p for p in cache.iterdir() if p.is_dir()]) == 1


def test_max_size_caps_what_is_stored_and_changed_files_get_a_new_entry(tmp_path):
    root, cache = folder(tmp_path / "data", size=(40, 20)), tmp_path / "cache"
    d = load_dataset(cfg(root=str(root), cache_dir=str(cache), max_size=16), 0)
    assert d.x_train.shape == (6, 3, 8, 16)  # scaled down to the cap, aspect kept
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(root / "train" / "a" / "0.png")  # now mixed sizes
    d = load_dataset(cfg(root=str(root), cache_dir=str(cache), max_size=16), 0)
    assert d.x_train.shape == (6, 3, 16, 16) and (d.x_train[0] == 0).all()
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2  # the listing changed


def _load(root, cache):
    d = load_dataset(cfg(root=root, cache_dir=cache), 0)
    return str(d.x_train.filename), int(np.asarray(d.x_train, np.int64).sum())


def test_workers_loading_at_once_decode_one_copy(tmp_path):
    """Two processes that find no cache at the same time: one decodes, the other waits and maps it."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    root, cache = folder(tmp_path / "data", per_class=20), tmp_path / "cache"
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_load, [str(root)] * 2, [str(cache)] * 2))
    assert results[0] == results[1]
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1 and not list(cache.glob("*.tmp-*"))
