"""Memory of an image folder read by several workers, and of a DualLoRA basis round.

    nice -n 19 python simulations/data_memory.py               # both parts, folder reused across runs
    nice -n 19 python simulations/data_memory.py --part pss    # or --part basis

1. Shared data set. Generates (once, seeded, into ``--workdir``, default
   $TMPDIR/fedcl-data-memory) an ``imagefolder`` of 100 classes x 200 training JPEGs of 256 x 256 px
   (20,000) plus 10 test JPEGs per class, and a 2,000-image folder of hard links to its first 20
   training images per class (same test images). For each folder, two worker processes (started
   with ``spawn``, as Ray starts its workers) each build the run's ``Experiment`` through
   ``fedcl.experiment.get_experiment`` -- the code path a Ray client worker takes -- with
   ``dataset=imagefolder dataset.image_size=224``, and then read every training and test row once
   through the run's input pipeline (resized to 224 px per batch of 256): a worst case, every worker
   touches every image. While both wait, the parent sums their proportional set size (``Pss`` of
   /proc/<pid>/smaps_rollup). This is two plain processes, not a ``fedcl`` run: a real run's Ray
   workers also hold Ray, Flower and the model, which are the same at 2,000 and 20,000 images. The
   decoded cache is built before the workers start (its time is reported); ``--fedcl-src`` runs the
   workers on another checkout (e.g. the code before the shared cache) for comparison.
   Pass: growth from 2,000 to 20,000 images <= 1.1 x one native uint8 copy of the 18,000 extra
   images (18,000 x 3 x 256 x 256 bytes).

2. DualLoRA basis round. In a fresh process per size, ``vit_tiny_patch16_224`` (timm,
   ``pretrained=false``, so the task key is the 224 px input image) and one client holding 500 or
   2,000 training images of the 2,000-image folder (``dataset.train_per_class`` 5 or 20) at 224 px: the peak
   resident memory (VmHWM after resetting it through /proc/self/clear_refs) of the client's
   ``basis_end`` round (``DualLoRA.client_bases``: 12 layer bases and the task key) above the
   memory before it. Pass: the peak does not grow with the images (within 10%).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, SIDE = 100, 200, 10, 256
SMALL_PER_CLASS = 20
NATIVE_BYTES = 3 * SIDE * SIDE  # one decoded image at native size, uint8


# ---- the folders -------------------------------------------------------------------------

def _write_class(args) -> None:
    from PIL import Image

    root, c = args
    rng = np.random.default_rng([7, c])
    # a smooth class prototype (8 x 8 colours upsampled) plus per-image noise: JPEGs of realistic size
    proto = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (SIDE, SIDE), Image.BICUBIC), np.float32)
    for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        folder = Path(root) / split / f"c{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(proto + rng.normal(0, 25, proto.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)


def make_folders(work: Path) -> tuple[Path, Path]:
    big, small = work / "jpeg20k", work / "jpeg2k"
    if not (big / "done").is_file():
        started = time.monotonic()
        with mp.get_context("spawn").Pool(2) as pool:
            pool.map(_write_class, [(str(big), c) for c in range(CLASSES)])
        (big / "done").write_text("")
        print(f"generated {CLASSES * (TRAIN_PER_CLASS + TEST_PER_CLASS)} JPEGs in {big} "
              f"({time.monotonic() - started:.0f} s)", flush=True)
    if not (small / "done").is_file():
        for split, n in (("train", SMALL_PER_CLASS), ("test", TEST_PER_CLASS)):
            for c in range(CLASSES):
                folder = small / split / f"c{c:03d}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    if not (folder / f"{i:04d}.jpg").exists():
                        os.link(big / split / f"c{c:03d}" / f"{i:04d}.jpg", folder / f"{i:04d}.jpg")
        (small / "done").write_text("")
    return small, big


# ---- part 1: the workers' PSS ------------------------------------------------------------

def overrides(root: Path, cache: Path | None) -> list[str]:
    """None: no cache_dir (a checkout from before the shared cache has no such key)."""
    return ["dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=224", "model=small_cnn",
            "method=finetune", "num_clients=2", "num_tasks=1", "partition=iid",
            *([f"dataset.cache_dir={cache}"] if cache else [])]


def _worker(src: str | None, args: list[str], ready, done) -> None:
    if src:
        sys.path.insert(0, src)
    import torch

    from fedcl.experiment import get_experiment
    from fedcl.federation.run_config import compose_config  # the name older checkouts (--fedcl-src) have too

    torch.set_num_threads(1)
    exp = get_experiment(compose_config(args))
    for n, read in ((len(exp.data.x_train), exp.train_images), (len(exp.data.x_test), exp.test_images)):
        for i in range(0, n, 256):
            batch = read(np.arange(i, min(n, i + 256)), torch.device("cpu"))
            assert batch.shape[-1] == 224
    ready.set()
    done.wait()


def smaps(pid: int) -> dict[str, int]:
    """Bytes per field of /proc/<pid>/smaps_rollup (Rss, Pss, Pss_Anon, Pss_File, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        out[key.rstrip(":")] = int(value) * 1024
    return out


def workers_pss(root: Path, cache: Path, src: str | None) -> dict:
    ctx = mp.get_context("spawn")
    args = overrides(root, None if src else cache)
    if src is None:  # decode into the shared cache first, in a process of its own
        started = time.monotonic()
        code = ("import sys; from fedcl.data.datasets import load_dataset; from fedcl.config import "
                f"compose_config; load_dataset(compose_config({args!r}).dataset, 0)")
        subprocess.run([sys.executable, "-c", code], check=True)
        build_s = time.monotonic() - started
    else:
        build_s = float("nan")
    started = time.monotonic()
    events = [(ctx.Event(), ctx.Event()) for _ in range(2)]
    procs = [ctx.Process(target=_worker, args=(src, args, r, d)) for r, d in events]
    for p in procs:
        p.start()
    for (r, _), p in zip(events, procs):
        while not r.wait(1.0):
            if not p.is_alive():
                raise RuntimeError(f"worker {p.pid} exited with {p.exitcode}")
    read_s = time.monotonic() - started
    stats = [smaps(p.pid) for p in procs]
    for _, d in events:
        d.set()
    for p in procs:
        p.join()
    images = len(list((root / "train").rglob("*.jpg")))
    return {"images": images, "pss": sum(s["Pss"] for s in stats), "pss_file": sum(s.get("Pss_File", 0) for s in stats),
            "pss_anon": sum(s.get("Pss_Anon", 0) for s in stats), "rss": sum(s["Rss"] for s in stats),
            "build_s": build_s, "read_s": read_s}


# ---- part 2: a DualLoRA basis round's peak -----------------------------------------------

def basis_peak(root: Path, cache: Path | None, per_class: int) -> dict:
    """In this process: the basis_end round of one client holding every row (per_class x 100)."""
    import torch

    from fedcl.experiment import get_experiment
    from fedcl.federation.client_app import client_round  # the names older checkouts (--fedcl-src) have too
    from fedcl.federation.run_config import compose_config

    cfg = compose_config(["dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=224",
                          *([f"dataset.cache_dir={cache}"] if cache else []),
                          f"dataset.train_per_class={per_class}", "dataset.test_per_class=1",
                          "model=timm", "model.arch=vit_tiny_patch16_224", "model.pretrained=false",
                          "method=duallora", "num_clients=1", "num_tasks=1", "partition=iid", "device=cpu"])
    exp = get_experiment(cfg)
    model = exp.new_model()
    ctx = client_round(cfg, client=0, task=0, rnd=0, phase="basis_end")
    rows = len(ctx.task_rows(0))
    model.features(ctx.images(ctx.task_rows(0)[:2]))  # first-call allocations out of the measurement
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    started = time.monotonic()
    out = exp.method.client_bases(model, ctx)
    seconds = time.monotonic() - started
    peak = _status("VmHWM")
    widths = {k: tuple(v.shape) for k, v in out.items() if k.startswith("U.")}
    return {"images": rows, "before": before, "peak": peak, "growth": peak - before, "seconds": seconds,
            "threads": torch.get_num_threads(), "key_basis": widths.get("U.task_key"),
            "layers": sum(k != "U.task_key" for k in widths)}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# ---- driver ------------------------------------------------------------------------------

def mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "fedcl-data-memory"))
    parser.add_argument("--part", choices=("pss", "basis", "both"), default="both")
    parser.add_argument("--fedcl-src", default=None, help="run the workers / basis rounds on this checkout instead")
    parser.add_argument("--basis-sizes", default="5,20", help="training images per class (100 classes) of part 2")
    parser.add_argument("--basis-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.workdir)
    cache = work / "cache"
    if args.basis_child is not None:
        if args.fedcl_src:
            sys.path.insert(0, args.fedcl_src)
        print(json.dumps(basis_peak(work / "jpeg2k", None if args.fedcl_src else cache, args.basis_child)))
        return
    from fedcl.report import text_table

    work.mkdir(parents=True, exist_ok=True)
    small, big = make_folders(work)
    if args.part in ("pss", "both"):
        runs = [workers_pss(root, cache, args.fedcl_src) for root in (small, big)]
        extra = runs[1]["images"] - runs[0]["images"]
        growth = runs[1]["pss"] - runs[0]["pss"]
        code = f"fedcl at {args.fedcl_src}" if args.fedcl_src else "this checkout"
        print(f"\nTwo workers read an imagefolder at image_size=224 ({code}):")
        print(text_table(["train images", "summed PSS MB", "of it file MB", "anon MB", "summed RSS MB",
                          "cache build s", "load+read s"],
                         [[r["images"], mb(r["pss"]), mb(r["pss_file"]), mb(r["pss_anon"]), mb(r["rss"]),
                           f"{r['build_s']:.0f}", f"{r['read_s']:.0f}"] for r in runs]))
        ratio = growth / (extra * NATIVE_BYTES)
        print(f"growth {mb(growth)} MB for {extra} images: {growth / extra:,.0f} B per image = {ratio:.3f} x one "
              f"native copy ({NATIVE_BYTES:,} B); limit 1.1: {'PASS' if ratio <= 1.1 else 'FAIL'}")
    if args.part in ("basis", "both"):
        rows = []
        for per_class in map(int, args.basis_sizes.split(",")):
            src = ["--fedcl-src", args.fedcl_src] if args.fedcl_src else []
            done = subprocess.run([sys.executable, __file__, "--workdir", str(work), "--basis-child", str(per_class),
                                   *src], check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        code = f"fedcl at {args.fedcl_src}" if args.fedcl_src else "this checkout"
        print(f"\nDualLoRA basis_end round, vit_tiny_patch16_224 (pretrained=false), one client, 224 px ({code}):")
        print(text_table(["images", "RSS before MB", "peak MB", "growth MB", "seconds", "layer bases",
                          "task key basis"],
                         [[r["images"], mb(r["before"]), mb(r["peak"]), mb(r["growth"]), f"{r['seconds']:.0f}",
                           r["layers"], "x".join(map(str, r["key_basis"] or ()))] for r in rows]))
        if len(rows) > 1:
            ratio = rows[-1]["growth"] / rows[0]["growth"]
            print(f"peak growth at {rows[-1]['images']} / at {rows[0]['images']} images: {ratio:.2f} "
                  f"({'PASS' if ratio <= 1.1 else 'FAIL'}: does not grow with the images)")


if __name__ == "__main__":
    main()
