"""The Flower ``ClientApp``: one simulated client's round of continual learning.

A message says which task and round it is and carries the global arrays; the client loads its own
state from the store, lets the method train, saves the state, and replies with the method's
payload plus ``num-examples``. ``partition-id`` from the node config is the client's identity:
Flower's node ids change on every run, partition ids do not.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from fedcl.experiment import derive_seed, get_experiment, resolve_device
from fedcl.federation import faults
from fedcl.federation.codec import from_record, to_record
from fedcl.federation.run_config import config_from_context, run_dir_from_context
from fedcl.federation.store import ClientStateStore, SharedBlobStore
from fedcl.methods.base import ClientRound
from fedcl.privacy import begin_round, privatize_payload


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
        labels=lambda rows: exp.train_labels(rows, device),
        local_epochs=int(cfg.local_epochs), batch_size=int(cfg.batch_size),
        optimizer=str(cfg.optimizer), lr=float(cfg.lr),
        momentum=float(cfg.momentum), weight_decay=float(cfg.weight_decay),
        generator=torch.Generator().manual_seed(derive_seed(seed, task, rnd, client)),
        device=device, mixed_precision=str(cfg.get("precision", "fp32")) == "auto" and device.type == "cuda",
    )


def client_step(cfg: DictConfig, run_dir: str, client: int, conf: dict,
                received: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """One client's round without any transport: the round's config and the arrays it received in,
    (payload, metrics) out; payload None when the client sends nothing. ``train`` wraps it in
    Flower messages; ``simulations/benchmark.py`` calls it directly."""
    exp = get_experiment(cfg)
    task, rnd = int(conf["task"]), int(conf["round"])
    ctx = client_round(cfg, client, task, rnd, str(conf["phase"]))
    ctx.shared = SharedBlobStore(f"{run_dir}/shared")
    torch.manual_seed(derive_seed(ctx.seed, task, rnd, client, 1))
    started = time.monotonic()
    idle = {"num-examples": 0, "client": client}  # the metrics of a client that sends nothing

    fault = str(conf.get("fault", ""))  # faults.*: the server's instruction to misbehave
    global_round = int(conf.get("global-round", 0))
    if not faults.act_before_training(fault):
        return None, {**idle, "arrival-s": math.inf}  # dropped: its reply never arrives

    model = exp.new_model().to(ctx.device)
    exp.method.load_payload(model, received)
    store = ClientStateStore(f"{run_dir}/client_state")
    state = store.load(client, before_round=global_round)
    if not begin_round(cfg, ctx, state):  # privacy (issue 6): budget spent -> no training, no data sent
        return None, idle
    num_examples = exp.method.client_update(model, ctx, state)
    # privacy (issue 6): clip + noise what leaves the client; its accountant lives in `state`
    private, dp_metrics = privatize_payload(cfg, ctx, received, exp.method.payload(model, ctx), state,
                                            num_examples, exp.method)
    state["task"] = task
    store.save(client, state, round=global_round)
    payload, delay = faults.act_after_training(fault, cfg, private)
    return payload, {"num-examples": num_examples, "client": client, **dp_metrics,
                     "arrival-s": time.monotonic() - started + delay}  # simulated arrival time


def train(cfg: DictConfig, run_dir: str, msg: Message, context: Context) -> Message:
    client = int(context.node_config["partition-id"])
    payload, metrics = client_step(cfg, run_dir, client, dict(msg.content["config"]),
                                   from_record(msg.content["arrays"]))
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if payload is not None:
        content["arrays"] = to_record(payload)
    return Message(content, reply_to=msg)


def identify(msg: Message, context: Context, cfg: DictConfig | None = None) -> Message:
    """Handshake: tell the server which partition (client id) this node simulates. The worker
    loads the data set here, so no round's first client pays for it."""
    if cfg is not None:
        get_experiment(cfg)
    record = ConfigRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(RecordDict({"identity": record}), reply_to=msg)


def make_client_app(cfg: DictConfig, run_dir: str) -> ClientApp:
    """A ClientApp bound to a config (``run_simulation`` leaves ``run_config`` empty)."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(cfg, run_dir, msg, context)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return identify(msg, context, cfg)

    return app


# `flwr run .`: the config comes from the run config (see fedcl.federation.run_config).
app = ClientApp()


@app.train()
def _train_from_run_config(msg: Message, context: Context) -> Message:
    return train(config_from_context(context), run_dir_from_context(context), msg, context)


@app.query()
def _query_from_run_config(msg: Message, context: Context) -> Message:
    return identify(msg, context, config_from_context(context))
