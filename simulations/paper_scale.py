"""A paper-scale preset end to end at the preset's shapes, on a handful of synthetic images.

    python simulations/paper_scale.py --preset duallora_cifar100_vitb16 --tasks 2
    python simulations/paper_scale.py --preset dlc_cifar100_resnet18 --out /tmp/dlc
    python simulations/paper_scale.py --preset duallora_cifar100_vitb16 --arch vit_tiny_patch16_224 num_clients=3

Runs ``+experiment=<preset>`` as a real Flower simulation (``fedcl``'s own path: run_experiment)
on ``dataset=synthetic`` with the preset's image size, classes and tasks (``--tasks N``: the first
N tasks only, same classes per task) and ``--images`` training images per client per task, one
round per task, one local epoch. A ViT preset runs "pretrained-shaped": ``model.pretrained=false``
with random weights written to a local file and passed as ``model.checkpoint`` (no base session).
On a machine without a GPU it sets ``ray.client_gpus=0``; overrides after the flags win.

It reports, per phase, the mean client-round time of each part, timed inside the Ray workers by
wrapping fedcl's functions, never editing them (message decode, state load, arrays held from
earlier rounds, model build with its weights and the method's prepare, payload load, training,
payload with its bases, state save, message encode, the rest), the bytes down and up, the GPU
memory peak per client-round, the server's exchange and round times (metrics.csv, results.json's
timing), and the peak resident memory of the process tree (driver, simulation process, Ray and its
workers; RSS summed, so shared pages count more than once). It then builds the prepared model as
fedcl does, loads the run's final global arrays (checkpoint/server.pt) and times inference on a
small batch. ``--one-process`` also runs the training client-rounds again one after another in
this process on one model and compares training throughput. Last line:

    preset=<name> state_ratio=<prepared / plain model bytes, adapters excluded>
    infer_ratio=<inference, all tasks seen / one task seen> infer_vs_plain=<all tasks / plain model>
    down_up_ratio=<downlink / uplink bytes after the base session> overhead_fraction=<non-training
    share of the clients' round time> wall_s=<end to end>
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark.py beside this file

TIMING_ENV = "FEDCL_PAPER_SCALE_TIMING"  # folder the workers write their client-round timings into
# the classes of each preset's data set (the synthetic stand-in needs the count; imagefolder has no default)
PRESET_CLASSES = {"duallora_cifar100_vitb16": 100, "duallora_imagenetr_vitb16": 200,
                  "dlc_cifar100_resnet18": 100, "dlc_imagenet100_resnet18": 100}
ADAPTER_MARKS = (".lora_A.", ".lora_B.", ".orth_A.", ".orth_B.", ".res_C.", ".res_B.")
# the client round's top-level parts (other: the rest of the handler), and parts timed inside them
PARTS = ("decode", "load_state", "held", "build", "load_payload", "train", "payload", "save_state", "encode", "other")
INNER = {"weights": "build", "prepare": "build", "bases": "payload"}


# ---- inside the Ray workers: wrap fedcl's client-side functions ------------------------------

_seconds: dict[str, float] = defaultdict(float)  # this worker's current client-round, per part


def _wrap(owner, name: str, part: str) -> None:
    """Replace ``owner.name`` by a version that adds its wall time to ``part``; a name that is not
    there (fedcl changed) is skipped, and that part reads 0."""
    fn = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if fn is None and isinstance(owner, type):
        fn = getattr(owner, name, None)  # inherited: shadow it on this class
    if not callable(fn) or getattr(fn, "_paper_scale", False) or isinstance(fn, (staticmethod, classmethod)):
        return

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _seconds[part] += time.perf_counter() - started

    timed._paper_scale = True
    setattr(owner, name, timed)


def _timed_train(train):
    """fedcl's ClientApp ``train``: time the whole handler and write one JSON line per client-round."""
    from flwr.app import Message
    from omegaconf import DictConfig

    from fedcl.client.codec import content_bytes
    from fedcl.experiment import get_experiment

    @functools.wraps(train)
    def timed(*args, **kwargs):
        cfg = next(a for a in args if isinstance(a, DictConfig))
        msg = next(a for a in args if isinstance(a, Message))
        method_cls = type(get_experiment(cfg).method)
        for name, part in (("load_payload", "load_payload"), ("client_update", "train"),
                           ("client_bases", "bases"), ("payload", "payload"), ("prepare_model", "prepare")):
            _wrap(method_cls, name, part)
        _seconds.clear()
        if torch.cuda.is_initialized():  # else this worker's first round: its peak counts from zero anyway
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        reply = train(*args, **kwargs)
        total = time.perf_counter() - started
        gpu = torch.cuda.is_initialized()
        conf = dict(msg.content["config"])
        context = args[-1] if len(args) >= 4 else kwargs.get("context")
        metrics = reply.content["metrics"] if reply.has_content() else {}
        record = {"client": int(context.node_config["partition-id"]) if context is not None else -1,
                  "task": int(conf["task"]), "round": int(conf["round"]), "phase": str(conf["phase"]),
                  "global_round": int(conf.get("global-round", 0)), "total": total,
                  "examples": int(metrics.get("num-examples", 0)) if metrics else 0,
                  "down_bytes": content_bytes(msg.content),
                  "up_bytes": content_bytes(reply.content) if reply.has_content() else 0,
                  "gpu_peak_bytes": torch.cuda.max_memory_allocated() if gpu else 0, **_seconds}
        with open(Path(os.environ[TIMING_ENV]) / f"worker_{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return reply

    timed._paper_scale = True
    return timed


CLIENT_MODULE = "fedcl.client.app"  # the ClientApp's module: the timers go in once it is imported
CLIENT_NAMES = ("train", "fresh_model", "hold", "from_record", "to_record")  # what the timers wrap there


def install_worker_timers() -> None:
    """Wrap fedcl's client-side functions in this process (see ``time_client_rounds``)."""
    if not os.environ.get(TIMING_ENV):
        return
    try:
        import importlib

        from fedcl.client import store
        from fedcl.experiment import Experiment
        from fedcl.models import backbones

        client_app = importlib.import_module(CLIENT_MODULE)
        _wrap(client_app, "fresh_model", "build")  # the worker's model copy (built on its first use)
        _wrap(client_app, "hold", "held")  # arrays the client holds from earlier rounds
        _wrap(Experiment, "new_model", "new_model")
        _wrap(backbones, "load_weights", "weights")
        _wrap(store.ClientStateStore, "load", "load_state")
        _wrap(store.ClientStateStore, "save", "save_state")
        _wrap(client_app, "from_record", "decode")
        _wrap(client_app, "to_record", "encode")
        if not getattr(client_app.train, "_paper_scale", False):
            client_app.train = _timed_train(client_app.train)
    except (ImportError, AttributeError) as err:  # fedcl moved a name: the run goes on untimed
        print(f"paper_scale: worker timers not installed ({err!r})", file=sys.stderr, flush=True)


def check_timed_names() -> None:
    """Fail before the run when the names the worker timers wrap are not where they look: a moved
    module would otherwise leave every client-round untimed without a word."""
    import importlib

    try:
        module = importlib.import_module(CLIENT_MODULE)
    except ImportError:
        raise SystemExit(f"paper_scale: {CLIENT_MODULE} does not import; point CLIENT_MODULE at fedcl's ClientApp") \
            from None
    missing = [name for name in CLIENT_NAMES if not callable(getattr(module, name, None))]
    if missing:
        raise SystemExit(f"paper_scale: {CLIENT_MODULE} has no {missing}; update the timers to fedcl's client code")


SITECUSTOMIZE = f"""# written by simulations/paper_scale.py: in every Python process of the run (the simulation
# process, Ray's workers), time fedcl's client rounds once {CLIENT_MODULE} is imported
import importlib.abc, importlib.util, os, sys

class _TimeClientRounds(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != {CLIENT_MODULE!r}:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
            import paper_scale
            paper_scale.install_worker_timers()

        spec.loader.exec_module = exec_module
        return spec

if os.environ.get({TIMING_ENV!r}):
    sys.meta_path.insert(0, _TimeClientRounds())
"""


def time_client_rounds(timing: Path) -> None:
    """Make every Python process started from here on (fedcl runs its simulation in a child process,
    Ray its workers in more) install ``install_worker_timers``: a sitecustomize on PYTHONPATH."""
    site = timing / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    os.environ[TIMING_ENV] = str(timing)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)


# ---- the driver ------------------------------------------------------------------------------

def preset_overrides(preset: str, out: Path, tasks: int | None, images: int, clients: int, rounds: int,
                     arch: str | None, test_per_class: int, extra: list[str]) -> list[str]:
    """The overrides that turn ``+experiment=<preset>`` into the small synthetic run of its shapes."""
    from fedcl.config import compose_config

    cfg = compose_config([f"+experiment={preset}"])  # the preset's own shapes; ``extra`` is applied last
    classes = PRESET_CLASSES.get(preset)
    if classes is None:
        raise SystemExit(f"paper_scale: no class count known for --preset {preset}; add it to PRESET_CLASSES")
    per_task = classes // int(cfg.num_tasks)
    num_tasks = int(tasks or cfg.num_tasks)
    size = cfg.dataset.get("image_size", None) or (224 if cfg.model.name == "timm" else 32)
    per_class = max(1, math.ceil(images * clients / per_task))
    overrides = [f"+experiment={preset}", "dataset=synthetic", "dataset.root=null",
                 f"dataset.num_classes={num_tasks * per_task}", f"dataset.image_size={size}", "dataset.channels=3",
                 f"dataset.train_per_class={per_class}", f"dataset.test_per_class={test_per_class}",
                 f"num_tasks={num_tasks}", f"num_clients={clients}", f"rounds_per_task={rounds}",
                 "local_epochs=1", "fraction_train=1.0"]
    if not torch.cuda.is_available():  # Ray would wait forever for GPUs it does not have
        overrides += ["ray.client_gpus=0", "ray.client_cpus=1"]
    if cfg.model.name == "timm":  # pretrained-shaped: random weights from a local file
        arch = arch or str(cfg.model.arch)
        overrides += [f"model.arch={arch}", "model.pretrained=false",
                      f"model.checkpoint={random_checkpoint(arch, out)}"]
    return overrides + list(extra)


def random_checkpoint(arch: str, out: Path) -> Path:
    """timm's ``arch`` with seeded random weights, saved once as safetensors (no hub needed)."""
    import timm
    from safetensors.torch import save_file

    path = out / f"random_{arch}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        net = timm.create_model(arch, pretrained=False, num_classes=0)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def read_timings(folder: Path) -> list[dict]:
    rows = []
    for file in sorted(folder.glob("worker_*.jsonl")):
        rows += [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    for r in rows:
        r["other"] = r["total"] - sum(r.get(p, 0.0) for p in PARTS if p != "other")
    return rows


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([float(r.get(key) or 0.0) for r in rows]))


def client_table(rows: list[dict]) -> str:
    from fedcl.report import text_table

    lines = []
    for phase in dict.fromkeys(r["phase"] for r in rows):
        sel = [r for r in rows if r["phase"] == phase]
        mean = functools.partial(_mean, sel)
        lines.append([phase, len(sel), *(f"{mean(p):.3f}" for p in (*PARTS, *INNER)), f"{mean('total'):.3f}",
                      f"{mean('down_bytes') / 1e6:.3f}", f"{mean('up_bytes') / 1e6:.3f}",
                      f"{max(r['gpu_peak_bytes'] for r in sel) / 2**20:.0f}"])
    inner = [f"({p} in {outer})" for p, outer in INNER.items()]
    return text_table(["phase", "client-rounds", *(f"{p} s" for p in PARTS), *inner, "total s", "down MB",
                       "up MB", "GPU peak MiB"], lines)


def server_table(run_dir: Path, results: dict) -> str:
    import csv

    from fedcl.report import text_table

    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lines = []
    for phase in dict.fromkeys(r["phase"] for r in rows):
        sel = [r for r in rows if r["phase"] == phase]
        mean = functools.partial(_mean, sel)
        lines.append([phase, len(sel), f"{mean('exchange_s'):.2f}", f"{mean('round_time_s'):.2f}",
                      f"{mean('round_time_s') - mean('exchange_s'):.2f}",
                      f"{mean('downlink_bytes') / 1e6:.3f}", f"{mean('uplink_bytes') / 1e6:.3f}"])
    return text_table(["phase", "rounds", "exchange s", "round s", "server s (aggregate, evaluate)",
                       "down MB/round", "up MB/round"], lines)


def state_bytes(model: torch.nn.Module, adapters: bool) -> int:
    return sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
               if adapters or not any(m in f".{k}" for m in ADAPTER_MARKS))


def time_call(fn, repeats: int) -> float:
    """Best of ``repeats`` wall times (after one untimed warm-up call)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def final_global_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    """The global arrays after the run's last round, from its checkpoint."""
    saved = torch.load(run_dir / "checkpoint" / "server.pt", weights_only=False)
    if "global" in saved:
        return saved["global"]
    from fedcl.server.server_state import ServerState
    return ServerState.from_state_dict(saved["server"]).global_arrays


def model_measurements(cfg, run_dir: Path, batch: int, repeats: int) -> dict:
    """Prepared model with the run's final global arrays vs the plain model: bytes and inference."""
    from fedcl.experiment import get_experiment
    from fedcl.methods.base import predict

    exp = get_experiment(cfg)
    model = exp.new_model()
    exp.method.load_payload(model, final_global_arrays(run_dir))
    plain = exp.new_model(prepared=False)
    x = exp.test_images(np.arange(min(batch, len(exp.data.x_test))))
    starts = exp.scenario.task_starts
    with torch.no_grad():
        one = time_call(lambda: exp.method.predict(model, x, starts[1]), repeats)
        every = time_call(lambda: exp.method.predict(model, x, starts[-1]), repeats)
        bare = time_call(lambda: predict(plain, x, starts[-1]), repeats)
    return {"prepared_bytes": state_bytes(model, adapters=False), "adapter_bytes": state_bytes(model, True)
            - state_bytes(model, False), "plain_bytes": state_bytes(plain, adapters=True),
            "infer_one_s": one, "infer_all_s": every, "infer_plain_s": bare, "batch": len(x)}


def one_process_training(cfg) -> tuple[float, int, int]:
    """The run's training client-rounds again, one after another in this process on one model: the
    method's own ``client_update`` only (no model build, state files or messages; its cost does not
    depend on the weights). Returns (seconds, client-rounds, images trained)."""
    from fedcl.client.app import client_round
    from fedcl.experiment import get_experiment
    from fedcl.server.schedule import asked, schedule

    exp = get_experiment(cfg)
    jobs = [(c, p) for p in schedule(cfg, exp.method) if p.phase == "train" for c in asked(cfg, exp.method, p)]
    model = None
    seconds, images = 0.0, 0
    for client, plan in jobs:
        ctx = client_round(cfg, client, plan.task, plan.round, plan.phase)
        model = model if model is not None else exp.new_model().to(ctx.device)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        images += exp.method.client_update(model, ctx, {}) * ctx.local_epochs
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
    return seconds, len(jobs), images


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESET_CLASSES))
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--arch", default=None, help="timm name instead of the preset's (ViT presets)")
    parser.add_argument("--tasks", type=int, default=None, help="run the first N tasks (default: all)")
    parser.add_argument("--images", type=int, default=2, help="training images per client per task")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="rounds per task")
    parser.add_argument("--test-per-class", type=int, default=1)
    parser.add_argument("--infer-batch", type=int, default=4)
    parser.add_argument("--infer-repeats", type=int, default=2)
    parser.add_argument("--one-process", action="store_true",
                        help="also run the same client rounds in this process and compare throughput")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, applied last")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="fedcl_paper_scale_"))
    timing = out / "timing"
    if timing.exists():
        for old in timing.glob("worker_*.jsonl"):
            old.unlink()
    timing.mkdir(parents=True, exist_ok=True)

    from benchmark import PeakMemory

    from fedcl.cli import run_experiment
    from fedcl.config import compose_config

    overrides = preset_overrides(args.preset, out, args.tasks, args.images, args.clients, args.rounds, args.arch,
                                 args.test_per_class, args.overrides)
    cfg = compose_config(overrides)
    print("$ fedcl " + " ".join(overrides), flush=True)
    check_timed_names()
    time_client_rounds(timing)
    with PeakMemory() as mem:
        results = run_experiment(cfg, str(out))
    rows = read_timings(timing)
    print(f"\nclient-rounds (mean per phase, timed inside the Ray workers; {len(rows)} client-rounds):")
    print(client_table(rows) if rows else "  none recorded (fedcl's client functions changed?)")
    print("\nserver rounds (metrics.csv):")
    print(server_table(out, results))
    if "timing" in results:
        print("fedcl's own split (results.json timing, s): " +
              ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in results["timing"].items()))
    print(f"\npeak RSS of the process tree: {mem.peak / 2**20:.0f} MiB; run wall time "
          f"{results['wall_time_s']:.1f} s")

    measured = model_measurements(cfg, out, args.infer_batch, args.infer_repeats)
    print(f"prepared model {measured['prepared_bytes'] / 1e6:.1f} MB without adapters "
          f"(adapters {measured['adapter_bytes'] / 1e6:.1f} MB), plain model {measured['plain_bytes'] / 1e6:.1f} MB; "
          f"inference on {measured['batch']} images: one task seen {measured['infer_one_s']:.3f} s, all "
          f"{cfg.num_tasks} tasks seen {measured['infer_all_s']:.3f} s, plain model {measured['infer_plain_s']:.3f} s")

    from fedcl.experiment import get_experiment
    base_tasks = get_experiment(cfg).method.base_session_tasks
    per_round = results["communication"]["per_round"]
    after = [r for r in per_round if r["task"] >= base_tasks]
    if not after:
        print(f"no round after the base session (base_session_tasks={base_tasks}): down_up_ratio over all rounds")
        after = per_round
    up = sum(r["uplink_bytes"] for r in after)
    down_up = sum(r["downlink_bytes"] for r in after) / up if up else math.inf
    total = sum(r["total"] for r in rows)
    overhead = 1.0 - sum(r.get("train", 0.0) for r in rows) / total if total else math.nan

    if args.one_process:
        one_s, count, images = one_process_training(cfg)
        train_rounds = [r for r in per_round if r["phase"] == "train"]
        sim_s = sum(r["exchange_s"] for r in train_rounds)
        in_workers = sum(r.get("train", 0.0) for r in rows if r["phase"] == "train")
        print(f"training throughput, {images} images in {count} client-rounds: one process, one client after "
              f"another {images / one_s:.1f} images/s ({one_s:.1f} s); the simulation's training rounds "
              f"{images / sim_s:.1f} images/s ({sim_s:.1f} s of exchange, clients side by side; "
              f"{in_workers:.1f} s inside client_update summed over clients); simulation / one process = "
              f"{sim_s / one_s:.2f}")

    line = (f"preset={args.preset} state_ratio={measured['prepared_bytes'] / measured['plain_bytes']:.3f} "
            f"infer_ratio={measured['infer_all_s'] / measured['infer_one_s']:.3f} "
            f"infer_vs_plain={measured['infer_all_s'] / measured['infer_plain_s']:.3f} "
            f"down_up_ratio={down_up:.3f} overhead_fraction={overhead:.3f} wall_s={time.perf_counter() - started:.1f}")
    print(line, flush=True)
    return line


if __name__ == "__main__":
    main()
