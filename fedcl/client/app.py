"""The Flower ``ClientApp``: one simulated client's round of continual learning.

A message names the logical client it is for (``config["client"]``), says which task and round it
is and carries the global arrays; the node that runs it is only an execution slot. The client
loads its own state from the store (partition, state, RNG and privacy ledger are all keyed by the
client id), lets the method train, saves the state, and replies with the method's payload plus
``num-examples``.
"""
from __future__ import annotations

import copy
import functools
import math
import pickle
import sys
import time
import warnings

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig, OmegaConf

from fedcl.client.codec import from_record, to_record
from fedcl.client.store import ClientStateStore, HeldArrays, SharedBlobStore
from fedcl.experiment import config_key, derive_seed, get_experiment, resolve_device
from fedcl.faults import FaultInjection
from fedcl.hooks import ClientHook, mechanisms
from fedcl.methods.base import ClientRound


def client_round(cfg: DictConfig, client: int, task: int, rnd: int, phase: str = "train") -> ClientRound:
    """Everything a method needs to know about this client's round, with seeded randomness."""
    exp = get_experiment(cfg)
    device = resolve_device(str(cfg.device))
    seed = int(cfg.seed)
    return ClientRound(
        client=client, seed=seed, task=task, round=rnd, phase=phase,
        first_class=exp.scenario.task_starts[task], seen_classes=exp.scenario.seen_classes(task),
        task_rows=lambda t: exp.scenario.client_indices[t][client],
        images=lambda rows: exp.train_images(rows, device),
        train_images=lambda rows: exp.augmented_images(rows, device),
        labels=lambda rows: exp.train_labels(rows, device),
        local_epochs=int(cfg.local_epochs), batch_size=int(cfg.batch_size),
        optimizer=str(cfg.optimizer), lr=float(cfg.lr),
        momentum=float(cfg.momentum), weight_decay=float(cfg.weight_decay),
        generator=torch.Generator().manual_seed(derive_seed(seed, task, rnd, client)),
        device=device, mixed_precision=str(cfg.get("precision", "fp32")) == "auto" and device.type == "cuda",
    )


def client_hooks(cfg: DictConfig) -> list[ClientHook]:
    """The client side of the run's cross-cutting concerns, outermost first (like Flower's mods):
    ``before_round`` runs in this order, ``after_round`` in reverse. Injected faults are outermost:
    a crashed client never reaches its privacy check, a corrupting one corrupts what privacy released."""
    return [c.client_hook() for c in [FaultInjection(cfg), *mechanisms(cfg)]]


_PRISTINE: dict[str, torch.nn.Module] = {}  # per process (Ray worker): one freshly built model per config


def pristine_model(cfg: DictConfig) -> torch.nn.Module:
    """The model as ``exp.new_model()`` builds it, built once per process (Ray worker)."""
    key = config_key(cfg)
    if key not in _PRISTINE:
        _PRISTINE.clear()  # one run per worker at a time
        _PRISTINE[key] = get_experiment(cfg).new_model()
    return _PRISTINE[key]


def fresh_model(cfg: DictConfig) -> torch.nn.Module:
    """A copy of the pristine model per message: every parameter, buffer, flag and per-round
    attribute a method sets starts anew, as if rebuilt, at the cost of a memory copy."""
    return copy.deepcopy(pristine_model(cfg))


def client_step(cfg: DictConfig, run_dir: str, client: int, conf: dict, sent: dict[str, np.ndarray],
                manifest: dict | None = None) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """One client's round without any transport: the round's config and the arrays it was sent in,
    (payload, metrics) out; payload None when the client sends nothing. With a ``manifest`` (keys and
    versions of every array the round needs) the arrays not sent come from what the client holds.
    ``train`` wraps it in Flower messages; ``simulations/benchmark.py`` calls it directly."""
    exp = get_experiment(cfg)
    task, rnd = int(conf["task"]), int(conf["round"])
    ctx = client_round(cfg, client, task, rnd, str(conf["phase"]))
    ctx.shared = SharedBlobStore(f"{run_dir}/shared")
    torch.manual_seed(derive_seed(ctx.seed, task, rnd, client, 1))
    started = time.monotonic()
    idle = {"num-examples": 0, "client": client}  # the metrics of a client that sends nothing
    global_round = int(conf.get("global-round", 0))
    clock = Stopwatch()
    store = ClientStateStore(f"{run_dir}/client_state")
    state = store.load(client, before_round=global_round)
    hooks = client_hooks(cfg)
    for hook in hooks:
        verdict = hook.before_round(ctx, state, conf)
        if verdict == "drop":
            return None, {**idle, "arrival-s": math.inf}  # its reply never arrives
        if verdict == "skip":
            return None, idle
    received = hold(cfg, run_dir, state, sent, manifest)
    clock.lap("load")
    model = fresh_model(cfg).to(ctx.device)
    exp.method.load_payload(model, received)
    clock.lap("build")
    num_examples = exp.method.client_update(model, ctx, state)
    clock.lap("train")
    payload, extra = exp.method.payload(model, ctx), {}
    for hook in reversed(hooks):
        payload, more = hook.after_round(ctx, state, conf, received, payload, num_examples)
        extra.update(more)
    clock.lap("payload")
    state["task"] = task
    store.save(client, state, round=global_round)
    clock.lap("save")
    delay = float(extra.pop("arrival-delay-s", 0.0))
    return payload, {"num-examples": num_examples, "client": client, "synced": 1, **extra, **clock.metrics(),
                     "arrival-s": time.monotonic() - started + delay}  # simulated arrival time


class Stopwatch:
    """Seconds spent in each part of a client's round, reported as ``time-<part>-s`` reply metrics."""

    PARTS = ("load", "build", "train", "payload", "save")

    def __init__(self):
        self.last, self.spent = time.perf_counter(), {}

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.spent[part] = self.spent.get(part, 0.0) + now - self.last
        self.last = now

    def metrics(self) -> dict[str, float]:
        return {f"time-{part}-s": seconds for part, seconds in self.spent.items()}


def initial_arrays(cfg: DictConfig) -> dict[str, np.ndarray]:
    """The global arrays at version 0, as the server's ``init_global`` makes them (once per worker)."""
    key = config_key(cfg)
    if key not in _INITIAL:
        _INITIAL.clear()
        _INITIAL[key] = get_experiment(cfg).method.init_global(pristine_model(cfg))
    return _INITIAL[key]


_INITIAL: dict[str, dict[str, np.ndarray]] = {}


def hold(cfg: DictConfig, run_dir: str, state: dict, sent: dict[str, np.ndarray],
         manifest: dict | None) -> dict[str, np.ndarray]:
    """Every array the round needs: the ones sent, and the rest from what this client holds; a
    growing array sent as its new columns (``extends`` >= 0) is appended to the version held. The
    client's state records the version of each array it holds (saved with the state at the end of
    a successful round, so a failed round leaves it as it was)."""
    if manifest is None:
        return sent
    held_arrays = HeldArrays(f"{run_dir}/shared/held")
    held = dict(state.get("held", {}))
    out = {}
    keys = manifest["keys"]
    extends = manifest.get("extends") or [-1] * len(keys)
    columns = manifest.get("held_columns") or [0] * len(keys)
    for key, version, base, width in zip(keys, manifest["versions"], extends, columns):
        version, base = int(version), int(base)
        if version == 0 and key not in sent:  # the initial state: this client built it itself
            out[key] = initial_arrays(cfg)[key]
            continue
        if key in sent and base < 0:
            out[key] = sent[key]
            held_arrays.put(key, version, sent[key])
        elif held.get(key, 0) != (base if key in sent else version):
            raise RuntimeError(f"the server did not send {key} version {version} whole, but this client holds "
                               f"{'version ' + str(held[key]) if key in held else 'no version'} of it")
        elif key in sent:
            prefix = initial_arrays(cfg)[key] if base == 0 else held_arrays.prefix(key, base, int(width))
            out[key] = np.concatenate([prefix, sent[key]], axis=1)
            held_arrays.put(key, version, out[key])
        else:
            out[key] = held_arrays.get(key, version)
        held[key] = version
    state["held"] = held
    return out


def train(cfg: DictConfig, run_dir: str, msg: Message, context: Context) -> Message:
    """One logical client's round, on whichever node (execution slot) Flower delivered it to."""
    conf = dict(msg.content["config"])
    client = int(conf["client"])
    manifest = msg.content.config_records.get("manifest")
    restarted = worker_restarted()  # this Ray worker replaces one that died
    payload, metrics = client_step(cfg, run_dir, client, conf, from_record(msg.content["arrays"]),
                                   None if manifest is None else {k: list(v) for k, v in manifest.items()})
    if restarted:
        metrics["worker-restarted"] = 1
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if payload is not None:
        content["arrays"] = to_record(payload)
    return Message(content, reply_to=msg)


def make_client_app(cfg: DictConfig, run_dir: str) -> ClientApp:
    """A ClientApp bound to a config (``run_simulation`` leaves ``run_config`` empty). Flower's Ray
    backend pickles the app with every message: it carries the config as bytes (``worker_config``)."""
    app = ClientApp()
    blob = pickle.dumps(cfg)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(worker_config(blob), run_dir, msg, context)

    return app


@functools.lru_cache(maxsize=4)
def worker_config(blob: bytes) -> DictConfig:
    """The run's config in this process, unpickled once rather than per message, and read-only:
    what is derived from it (``config_key``) is computed once too."""
    cfg = pickle.loads(blob)
    OmegaConf.set_readonly(cfg, True)
    return cfg



def worker_restarted() -> bool:
    """True in the first message a Ray actor handles after Ray restarted it: the message its dead
    predecessor was processing, run again (or, if it died between messages, the next one). The
    runtime asks Ray for the restart (``fedcl.runtime.backend``); the client reports it in its reply
    metrics. Asked once per process (it is a query to Ray's GCS)."""
    global _ASKED
    ray = sys.modules.get("ray")  # not imported: not in a Ray worker
    if _ASKED or ray is None or not ray.is_initialized():
        return False
    _ASKED = True
    try:
        with warnings.catch_warnings():  # Ray's property reads Ray's own deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - not in an actor (a driver, a task)
        return False


_ASKED = False
