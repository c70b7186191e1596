"""What a continual-learning method is: client-side hooks plus server-side aggregation.

A method sees one client's round through a ``ClientRound`` (which task and round it is, that
client's data, hyperparameters, a seeded RNG) and a ``state`` dict that persists for that client
across rounds and tasks. It says which arrays cross the wire (``payload``), what each of them is
(``array_role``) and how the server combines them (``aggregate``). The server and the client only
move named arrays; what they do to one (screen it, combine it by the aggregation rule, clip and
noise it under privacy) follows from the role its method declares, never from its name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcl.aggregation.rules import MEAN, AggregationRule, current_rule

# The roles of the arrays a client sends (``Method.array_role``).
UPDATE = "update"          # a trained array, an update of the global array of the same name: screened by
                           # its norm, combined by the aggregation rule, clipped and noised under
                           # client-level DP
HEAD_ROWS = "head_rows"    # an update of some rows of a global classifier (``Method.counterpart``): the
                           # round's classes, or every seen class. Treated as an update of those rows
BASIS = "basis"            # a release: directions of the client's data and their singular values, as
                           # many as its data needs (the last dimension may differ between clients)
COVARIANCE = "covariance"  # a release: a Gram matrix F^T F of the client's data (noised as one under
                           # privacy.bases=noisy_covariance)
RELEASE = "release"        # another release: statistics of the client's data (class means, counts)
ROLES = (UPDATE, HEAD_ROWS, BASIS, COVARIANCE, RELEASE)
RELEASES = (BASIS, COVARIANCE, RELEASE)  # updates nothing the server holds: never screened by norm;
                                          # privacy noises covariances and counts the rest as raw releases


@dataclass
class ClientRound:
    """One client's view of one federated round."""

    client: int
    seed: int
    task: int
    round: int                       # round within the task
    phase: str                       # "train", or a method's own phase (e.g. "basis")
    first_class: int                 # the current task's labels are first_class .. seen_classes-1
    seen_classes: int                # labels 0 .. seen_classes-1 are known
    task_rows: Callable[[int], np.ndarray]   # task -> this client's training rows
    images: Callable[[np.ndarray], torch.Tensor]  # rows -> normalised float batch on device
    labels: Callable[[np.ndarray], torch.Tensor]  # rows -> re-indexed labels on device
    local_epochs: int
    batch_size: int
    optimizer: str                   # "sgd" (with momentum) or "adam"
    lr: float
    momentum: float
    weight_decay: float
    generator: torch.Generator       # derived from (seed, task, round, client)
    device: torch.device
    mixed_precision: bool = False    # bf16 autocast (``precision=auto`` on a GPU)
    shared: object | None = None     # the run's SharedBlobStore: tensors many clients hold identically
    train_images: Callable[[np.ndarray], torch.Tensor] | None = None  # rows -> training batch, augmented
                                     # under dataset.augment (None: ``images``); features/bases use ``images``
    # the local training loop ``fit`` hands over to, e.g. DP-SGD set by the privacy client hook:
    # trainer(model, rows, ctx, extra_loss, first_class); None: plain local SGD/Adam
    trainer: Callable | None = None


class Method:
    """FedAvg over the whole model, sequential fine-tuning: subclasses change the hooks."""

    base_session_tasks = 0  # leading tasks that train the whole backbone (not counted as adapter rounds)

    def __init__(self, name: str):
        self.name = name

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if replaced := [h for h in ("varies_across_clients", "is_covariance", "privacy_reference") if h in vars(cls)]:
            raise TypeError(f"{cls.__name__} overrides {replaced}, which fedcl no longer calls: declare what its "
                            "arrays are with array_role (BASIS, COVARIANCE, HEAD_ROWS with counterpart, ...)")

    # ---- client side -------------------------------------------------------------------
    def training_rows(self, ctx: ClientRound, state: dict) -> np.ndarray:
        return ctx.task_rows(ctx.task)

    def extra_loss(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor,
                   ctx: ClientRound, state: dict) -> torch.Tensor | None:
        return None

    def begin_round(self, model: nn.Module, ctx: ClientRound, state: dict) -> None:
        """Called with the freshly received global model, before training."""

    def client_update(self, model: nn.Module, ctx: ClientRound, state: dict) -> int:
        """Train ``model`` in place; return the number of examples it trained on."""
        self.begin_round(model, ctx, state)
        rows = self.training_rows(ctx, state)
        if len(rows):
            fit(model, rows, ctx, lambda x, logits: self.extra_loss(model, x, logits, ctx, state))
        return int(len(rows))

    def bind(self, num_tasks: int, task_starts: list[int], cfg) -> None:
        """Learn the run's shape (tasks, classes, model config) before any model is built."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Turn the backbone into this method's model (e.g. add adapters); same on both sides."""
        return model

    # ---- wire --------------------------------------------------------------------------
    def payload(self, model: nn.Module, ctx: ClientRound | None = None) -> dict[str, torch.Tensor]:
        """Arrays a client sends up (here: the whole model)."""
        return model.state_dict()

    def load_payload(self, model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
                              strict=False)

    # ---- server side -------------------------------------------------------------------
    def init_global(self, model: nn.Module) -> dict[str, np.ndarray]:
        """The server's global state at the start: arrays it sends down."""
        return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}

    def sends_update(self, phase: str) -> bool:
        """Whether a round of ``phase`` carries trained updates (privacy plans and admits it as an
        update message); other phases (e.g. DualLoRA's ``basis_*``) release statistics of the data."""
        return phase == "train"

    def phases(self, task: int, rounds: int) -> list[str]:
        """The communication rounds of a task, in order."""
        return ["train"] * rounds

    def samples_everyone(self, task: int, phase: str) -> bool:
        """A round that goes to every client instead of a ``fraction_train`` sample."""
        return False

    def downlink(self, global_arrays: dict[str, np.ndarray], task: int, phase: str,
                 client: int) -> dict[str, np.ndarray]:
        """What the server sends to this sampled client this round."""
        return global_arrays

    def aggregate(self, global_arrays: dict[str, np.ndarray], replies: list[tuple[dict[str, np.ndarray], int]],
                  task: int, phase: str, rule: AggregationRule = MEAN) -> dict[str, np.ndarray]:
        """The new global state from the replies (sorted by client id): FedAvg here, or ``rule``.

        Global arrays are read-only: return new arrays for what changed (the server versions each
        array by the round that last replaced it, and sends a client only what it does not hold)."""
        declared = {k: role_of(self, k) for arrays, _ in replies for k in arrays}
        if others := sorted(k for k, role in declared.items() if role != UPDATE):
            raise NotImplementedError(f"{type(self).__name__} sends {others[:3]} as {declared[others[0]]!r}: FedAvg "
                                      "averages updates only; override aggregate to place head rows and merge releases")
        return {**global_arrays, **weighted_mean(replies, rule)}

    def predict(self, model: nn.Module, x: torch.Tensor, seen_classes: int) -> torch.Tensor:
        return predict(model, x, seen_classes)

    def parameter_counts(self, model: nn.Module) -> dict | None:
        """``results.json``'s ``parameters`` (backbone / added / added_fraction), for methods
        that add parameters to a backbone; None leaves the key out."""
        return None

    def report(self, model: nn.Module, exp, global_arrays: dict) -> dict | None:
        """``results.json``'s ``diagnostics`` for the final global model (None leaves the key out)."""
        return None

    def export(self, model: nn.Module, folder) -> None:
        """Write the final global adapters (LoRA methods: PEFT's format) into ``folder``; nothing here."""

    # ---- what the arrays mean (screening, aggregation, privacy) ---------------------------------
    def array_role(self, key: str) -> str:
        """The role of the array ``key`` a client sends, one of ``ROLES``: the one declaration
        screening, the aggregation rule and privacy act on. Everything is an update here; a method
        that sends head rows, bases, covariances or other statistics of its data says so."""
        return UPDATE

    def counterpart(self, key: str) -> str:
        """The global array the update ``key`` changes: itself here; head rows name their classifier."""
        return key

    supports_dp_sgd = True  # trains through ``fit`` with one per-sample loss (record-level DP-SGD applies)

    def task_key_release(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays of a reply that describe the client's task-identity subspace (for the
        basis-residual membership audit); none here."""
        return {}


def role_of(method: Method, key: str) -> str:
    """``method.array_role(key)``, checked: a role that is not one of ``ROLES`` (a typo) must not
    switch off what the server and privacy do to the array."""
    role = method.array_role(key)
    if role not in ROLES:
        raise ValueError(f"{type(method).__name__}.array_role({key!r}) is {role!r}; a role is one of {list(ROLES)}")
    return role


def weighted_mean(replies: list[tuple[dict[str, np.ndarray], int]],
                  rule: AggregationRule | None = None) -> dict[str, np.ndarray]:
    """FedAvg: per-array mean weighted by example counts, in reply order (callers sort it); another
    ``rule`` (median, trimmed mean, Krum) combines the same updates its own way. No ``rule``: the
    one the server applies to the aggregation in progress (``aggregator=``)."""
    if sum(n for _, n in replies) <= 0:
        raise ValueError("weighted_mean needs at least one reply with examples")
    return (rule or current_rule()).combine([arrays for arrays, _ in replies], [n for _, n in replies])


def fit(model: nn.Module, rows: np.ndarray, ctx: ClientRound,
        extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
        first_class: int = 0, memory: np.ndarray | None = None) -> None:
    """Plain local SGD on the logits of classes first_class .. seen-1 (all seen by default),
    shuffled by the round's generator; each batch of ``rows`` is paired with an equally sized batch
    drawn from ``memory`` (experience replay) when one is given."""
    if ctx.trainer is not None:  # a client hook's own loop (record-level DP-SGD): one pool of records
        pool = rows if memory is None or not len(memory) else np.concatenate([rows, memory])
        ctx.trainer(model, pool, ctx, extra_loss, first_class)
        return
    opt = local_optimizer([p for p in model.parameters() if p.requires_grad], ctx)
    model.train()
    for x, y in local_batches(rows, ctx, memory):
        with autocast(ctx):
            logits = model(x)[:, first_class:ctx.seen_classes]
            loss = F.cross_entropy(logits, y - first_class)
            extra = extra_loss(x, logits)
            if extra is not None:
                loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def local_optimizer(params: list[torch.nn.Parameter], ctx: ClientRound) -> torch.optim.Optimizer:
    """The client's optimiser from the config: Adam, or SGD with momentum."""
    if ctx.optimizer == "adam":  # ViTs from scratch do not train with plain SGD here
        return torch.optim.Adam(params, lr=ctx.lr, weight_decay=ctx.weight_decay)
    return torch.optim.SGD(params, lr=ctx.lr, momentum=ctx.momentum, weight_decay=ctx.weight_decay)


def local_batches(rows: np.ndarray, ctx: ClientRound, memory: np.ndarray | None = None):
    """(images, labels) batches over ``local_epochs`` epochs of ``rows``, shuffled by the round's
    generator. With a non-empty ``memory`` (row indices), every batch is followed by as many rows
    drawn from it without replacement (as Mammoth's and Avalanche's ER pair a stream batch with a
    buffer batch), in the same forward pass."""
    images = ctx.train_images or ctx.images
    replay = memory is not None and len(memory) > 0
    for _ in range(ctx.local_epochs):
        order = torch.randperm(len(rows), generator=ctx.generator).numpy()
        for start in range(0, len(rows), ctx.batch_size):
            batch = rows[order[start:start + ctx.batch_size]]
            if replay:
                picked = torch.randperm(len(memory), generator=ctx.generator)[:len(batch)].numpy()
                batch = np.concatenate([batch, memory[picked]])
            yield images(batch), ctx.labels(batch)


def autocast(ctx: ClientRound):
    """bf16 autocast when the round trains with mixed precision (``precision=auto`` on a GPU)."""
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.mixed_precision)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, seen_classes: int, batch_size: int = 512) -> torch.Tensor:
    """Class-incremental prediction: argmax over every class seen so far (no task id)."""
    model.eval()
    preds = [model(x[i:i + batch_size])[:, :seen_classes].argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
