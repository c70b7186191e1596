"""DLC in the federation (Xu et al., arXiv 2512.03537): per-task LoRA plugins and a weighting unit
on a base trained by a federated replay or distillation method, built from the paper's description
as a plug-in that contains its base.

Model (``fedcl.models.dlc_plugins``): the backbone and its ``head`` are the base method's model.
Plugin t (a conv-LoRA pair per layer of the deep stage, ``method.stages``) turns an input's shallow
activation into task t's representation f_t; the weighting unit scores every f_t, softmax over the
seen tasks' plugins, and ``dlc_head`` classifies the weighted sum: the plugin path. DLC predicts
from (1 - mix) log p_base + mix log p_path (the path's logits over a temperature), with ``mix`` and
the temperature chosen by the server on held-out rows after each task; the mix starts at 0 (the
base's prediction) and stays there while the plugin path does not help.

Each task t, in communication rounds (``method.rounds``):

1. ``train``: the base method's own rounds (``method.base``: ``replay`` or ``icarl``), on the bare
   backbone + head. The base is the same model ``method=<base>`` trains: DLC never moves it.
2. plugin: the base is frozen (its BatchNorm statistics included: the whole base runs in eval
   mode); plugin t trains on task t's rows and the memory, class-balanced, cross-entropy over all
   seen classes of the path's classifier, which starts each task as the base head (a copy, or with
   ``residual`` the base head plus a zero ``dlc_head``); with ``path_head=sgd`` that classifier
   trains too, at ``head_lr``. Plugins are aggregated by ``strategy.lora_aggregation`` (``ffa``, the
   default here: A stays at its shared seeded initial value and only B trains, so the mean of B A is
   exact; ``fedit`` would shrink B A when clients disagree).
3. weighting: with everything else frozen, the weighting unit learns to name each row's task from
   the plugins' representations, computed without gradient (so its loss never reaches a plugin), on
   the client's memory plus task t's rows, each class weighted by 1 / its count there. With
   ``path_head=lda`` (the default) the client then sums the path's features per class and their
   Gram matrix over the same rows; the server adds these up over clients and sets ``dlc_head`` to
   their linear discriminant analysis (``lda_classifier``: equal class priors, so the base's recency
   bias does not carry over; the pooled rows' classifier, however non-IID the clients).
4. calibrate: every client scores, on its held-out rows of each task, each candidate mix in
   ``CANDIDATES`` (a mix and the path's temperature: negative log-likelihood of the mixed
   prediction, and hits); the server sums the scores and keeps the pair with the lowest mean over
   tasks of held-out NLL (ties: the smallest mix, i.e. towards the base).

``rounds=shared`` (the default): no round of its own. Steps 2-4 ride on the base's last two rounds
of the task: in ``train+plugin+weighting`` a client first trains the base as its base method would
(same data, same seeded order), then, from the base it received (frozen), the plugin and the
weighting unit (and the statistics or the head); in ``train+calibrate`` it counts with the parts
aggregated in the round before and trains the base. DLC then uses exactly the base's rounds: its
round-matched base is the base.
``rounds=extra``: steps 2-4 in rounds of their own after the base's (``plugin_rounds``,
``weighting_rounds``, one calibration): 3 rounds per task more than the base.

Held-out rows: ``holdout_fraction`` of each task's rows of a client never train the plugin path
(the base does train on them: a base that looks better on them only makes the choice more
conservative); a client keeps ``holdout_total // num_clients`` of them over the tasks (reservoir),
a memory cost besides the base's exemplars, stated in docs/methods/dlc.md.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcl.aggregation.lora import aggregate_lora, check_scheme
from fedcl.aggregation.rules import MEAN, AggregationRule
from fedcl.errors import ConfigError
from fedcl.methods.base import (
    RELEASE,
    UPDATE,
    ClientRound,
    Method,
    autocast,
    local_batches,
    local_optimizer,
    weighted_mean,
)
from fedcl.methods.icarl import ICaRL
from fedcl.methods.replay import Replay, reservoir
from fedcl.models.dlc_plugins import DLCNet, mix_log_probs, resolve_stages

BASES = ("replay", "icarl")
ROUNDS = ("shared", "extra")
MIXES = tuple(i / 10 for i in range(11))  # candidate weights of the plugin path in the prediction
TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # candidate temperatures of the plugin path's logits
CANDIDATES = tuple((lam, tau) for lam in MIXES for tau in TEMPERATURES)  # in order of preference on ties
COUNTS = "mix_scores"                # a calibrate reply: per task, NLL and hits per candidate mix, and rows
STATS = "path_statistics"            # a weighting reply (path_head=lda): per-class feature sums and counts, Gram
PATH_HEADS = ("lda", "sgd")
TASK_MIX = "dlc_mix_by_task"         # the server's record of the mix chosen after each task
TASK_TEMPERATURE = "dlc_temperature_by_task"  # and of the path's temperature


def is_plugin(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def plugin_task(key: str) -> int:
    return int(key.split(".lora_")[1].split(".")[1])


def is_dlc_part(key: str) -> bool:
    """Plugins, weighting unit, DLC head, mix: what DLC adds to the base model."""
    return is_plugin(key) or key.startswith(("weighting.", "dlc_head.")) or key in (
        "mix", "temperature", TASK_MIX, TASK_TEMPERATURE, COUNTS, STATS)


def is_base(key: str) -> bool:
    """The base method's model: backbone (minus plugins) and its own head."""
    return not is_dlc_part(key)


class DLC(Method):
    supports_dp_sgd = False  # the plugin and weighting rounds train through their own loops

    def __init__(self, name: str = "dlc", base: str = "replay", memory_total: int = 2000,
                 kd_weight: float = 1.0, temperature: float = 2.0, stages="auto", rank: int = 2,
                 alpha: float = 4.0, plugin_rounds: int = 1, weighting_rounds: int = 1,
                 plugin_lr: float | None = None, head_lr: float = 0.005, holdout_fraction: float = 0.1,
                 holdout_total: int = 500, rounds: str = "shared", path_head: str = "lda",
                 residual: bool = False, lda_shrinkage: float = 0.1):
        super().__init__(name)
        if base not in BASES:
            raise ConfigError(f"method.base={base!r} is unknown. Choose one of {list(BASES)}.")
        self.base_name = base
        self.base = Replay(memory_total=memory_total) if base == "replay" else \
            ICaRL(memory_total=memory_total, kd_weight=kd_weight, temperature=temperature)
        if rounds not in ROUNDS:
            raise ConfigError(f"method.rounds={rounds!r} is unknown. Choose shared (DLC trains beside the base in "
                              "the base's last two rounds of a task) or extra (rounds of its own after them).")
        self.rounds = rounds
        self.stages, self.rank, self.alpha = stages, int(rank), float(alpha)
        for key, value in (("plugin_rounds", plugin_rounds), ("weighting_rounds", weighting_rounds)):
            if int(value) < 1:
                raise ConfigError(f"method.{key}={value} must be >= 1: DLC trains its plugins and weighting unit "
                                  "in rounds of their own after the base's rounds of each task.")
        if not 0 < float(holdout_fraction) < 1 or int(holdout_total) < 1:
            raise ConfigError(f"method.holdout_fraction={holdout_fraction} must be in (0, 1) and method.holdout_total="
                              f"{holdout_total} >= 1: DLC chooses its mix on held-out rows.")
        self.plugin_rounds, self.weighting_rounds = int(plugin_rounds), int(weighting_rounds)
        if path_head not in PATH_HEADS:
            raise ConfigError(f"method.path_head={path_head!r} is unknown. Choose lda (the server builds the plugin "
                              "path's classifier from the clients' feature statistics) or sgd (clients train it).")
        if not 0 <= float(lda_shrinkage) <= 1:
            raise ConfigError(f"method.lda_shrinkage={lda_shrinkage} must be in [0, 1].")
        self.path_head, self.residual, self.lda_shrinkage = path_head, bool(residual), float(lda_shrinkage)
        self.plugin_lr = None if plugin_lr is None else float(plugin_lr)
        self.head_lr = float(head_lr)
        self.holdout_fraction, self.holdout_total = float(holdout_fraction), int(holdout_total)

    # ---- shape of the run ----------------------------------------------------------------
    def bind(self, num_tasks: int, task_starts: list[int], cfg) -> None:
        if cfg.model.name == "vit":
            raise ConfigError("method=dlc puts conv-LoRA plugins in a CNN's deep stage; "
                              "use model=small_cnn or model=resnet18 (not model=vit).")
        self.num_tasks, self.starts = num_tasks, list(task_starts)
        self.base.bind(num_tasks, task_starts, cfg)
        self.num_clients = int(cfg.num_clients)
        self.model_name = str(cfg.model.name)
        self.lora_aggregation = check_scheme(str(cfg.strategy.lora_aggregation))

    def prepare_model(self, model: nn.Module) -> DLCNet:
        stages = resolve_stages(model.features, self.model_name, self.stages)
        return DLCNet(model.features, model.head, stages, self.num_tasks, self.rank, self.alpha, self.residual)

    def init_global(self, model: nn.Module) -> dict[str, np.ndarray]:
        return {**super().init_global(model), TASK_MIX: np.zeros(self.num_tasks, np.float32),
                TASK_TEMPERATURE: np.ones(self.num_tasks, np.float32)}

    def task_of(self, y: torch.Tensor) -> torch.Tensor:
        bounds = torch.tensor(self.starts[1:-1], device=y.device)
        return torch.bucketize(y, bounds, right=True)

    # ---- client side ---------------------------------------------------------------------
    def holdout(self, ctx: ClientRound, state: dict) -> tuple[np.ndarray, np.ndarray]:
        """(the current task's held-out rows, every held-out row this client keeps, current task's included)."""
        held = state.setdefault("holdout", {"rows": np.empty(0, np.int64), "seen": 0, "tasks": 0})
        capacity = max(1, self.holdout_total // self.num_clients)

        def of_task(t: int) -> np.ndarray:
            rows = ctx.task_rows(t)
            rng = np.random.default_rng([ctx.seed, ctx.client, t, 4241])
            return np.sort(rng.permutation(rows)[:int(round(self.holdout_fraction * len(rows)))])

        while held["tasks"] < ctx.task:
            t = held["tasks"]
            held["rows"], held["seen"] = reservoir(held["rows"], held["seen"], of_task(t), capacity,
                                                   np.random.default_rng([ctx.seed, ctx.client, t, 4242]))
            held["tasks"] = t + 1
        current = of_task(ctx.task)
        return current, np.concatenate([held["rows"], current])

    def client_update(self, model: DLCNet, ctx: ClientRound, state: dict) -> int:
        if getattr(ctx, "dp_sgd", None) is not None:  # never train without the DP the user asked for
            raise ConfigError("privacy.local_dp_sgd=true does not support method=dlc: its plugin and weighting "
                              "rounds are not Opacus' DP-SGD. Use client-level DP (privacy=client_dp).")
        steps = ctx.phase.split("+")
        if steps[0] != "train":
            return self.train_parts(model, ctx, state, steps)
        base_state = lambda: {k: v.clone() for k, v in model.state_dict().items() if is_base(k)}  # noqa: E731
        received = base_state() if len(steps) > 1 else None
        n = self.train_base(model, ctx, state)
        if received is not None:  # a shared round: DLC's parts train on the base as received, frozen
            trained = base_state()
            model.load_state_dict(received, strict=False)
            self.train_parts(model, ctx, state, steps[1:])
            model.load_state_dict(trained, strict=False)
        return n

    def train_base(self, model: DLCNet, ctx: ClientRound, state: dict) -> int:
        """The base method's own round on the bare backbone + head (what ``method=<base>`` does)."""
        model.mode = "plain"
        for name, p in model.named_parameters():
            p.requires_grad_(is_base(name))
        return self.base.client_update(model, ctx, state)

    def train_parts(self, model: DLCNet, ctx: ClientRound, state: dict, steps: list[str]) -> int:
        """DLC's own steps of a round, in order, with the base frozen (BatchNorm statistics included)."""
        model.requires_grad_(False)
        model.eval()
        model.tasks_in_use = ctx.task + 1
        current_holdout, holdout = self.holdout(ctx, state)
        rows = np.setdiff1d(ctx.task_rows(ctx.task), current_holdout)
        memory = self.base.memory(ctx, state)
        memory = memory[~np.isin(memory, holdout)]
        trained_on = np.concatenate([rows, memory])  # what the plugin, weighting unit and statistics see
        n = 0
        for step in steps:
            if step == "calibrate":
                n = self.score_mixes(model, holdout, ctx, state)
            elif step not in ("plugin", "weighting"):
                raise ValueError(f"DLC has no phase {ctx.phase!r}")
            elif len(rows):
                if step == "plugin":
                    if self.rounds == "shared":  # the path's classifier starts the task as the base head
                        model.reset_path_head()
                    self.train_plugin(model, trained_on, ctx)
                else:
                    self.train_weighting(model, trained_on, ctx)
                    if self.path_head == "lda":
                        model.path_statistics = self.path_statistics(model, trained_on, ctx)
                n = int(len(rows))
        return n

    def train_plugin(self, model: DLCNet, rows: np.ndarray, ctx: ClientRound) -> None:
        """Plugin t and the plugin path's head against the frozen base, on the task's rows and the
        memory, each class weighted by 1 / its count there (class-balanced: the base's ER steps see
        the current task's classes far more often than the old ones)."""
        plugin = [p for layer in model.layers() for p in (
            *layer.lora_B[ctx.task].parameters(),
            *(layer.lora_A[ctx.task].parameters() if self.lora_aggregation != "ffa" else ()))]
        head = list(model.dlc_head.parameters()) if self.path_head == "sgd" else []
        for p in [*plugin, *head]:
            p.requires_grad_(True)
        opt = local_optimizer(plugin, ctx)
        if head:
            opt.add_param_group({"params": head, "lr": self.head_lr})
        if self.plugin_lr is not None:
            opt.param_groups[0]["lr"] = self.plugin_lr
        class_weight = balanced_weights(rows, ctx)
        for x, y in local_batches(rows, ctx):
            with autocast(ctx):
                with torch.no_grad():
                    h = model.shallow(x)
                logits = model.path_head(model.deep(h, ctx.task))[:, :ctx.seen_classes]
                w = class_weight[y]
                loss = (w * F.cross_entropy(logits, y, reduction="none")).sum() / w.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def train_weighting(self, model: DLCNet, rows: np.ndarray, ctx: ClientRound) -> None:
        """The weighting unit names each row's task from detached plugin representations, class-balanced."""
        params = list(model.weighting.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = local_optimizer(params, ctx)
        class_weight = balanced_weights(rows, ctx)
        for x, y in local_batches(rows, ctx):
            with torch.no_grad(), autocast(ctx):
                reps = model.representations(x)
            scores = model.weighting(reps.float())
            w = class_weight[y]
            loss = (w * F.cross_entropy(scores, self.task_of(y), reduction="none")).sum() / w.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    @torch.no_grad()
    def path_statistics(self, model: DLCNet, rows: np.ndarray, ctx: ClientRound) -> np.ndarray:
        """Sufficient statistics of the plugin path's features z over ``rows``: per class the sum of z
        and the count, and the sum of z z^T; (classes + D, D + 1), summed in float64 (sent in float32).
        They add up over clients, so the server's classifier is the one the pooled rows would give,
        however non-IID they are."""
        d = model.head.in_features
        stats = np.zeros((model.head.out_features + d, d + 1))
        for start in range(0, len(rows), 256):
            batch = rows[start:start + 256]
            x, y = ctx.images(batch), ctx.labels(batch).cpu().numpy()
            z = model.path_features(model.representations(x)).double().cpu().numpy()
            np.add.at(stats[:, :d], y, z)
            np.add.at(stats[:, d], y, 1.0)
            stats[-d:, :d] += z.T @ z
        return stats

    @torch.no_grad()
    def score_mixes(self, model: DLCNet, rows: np.ndarray, ctx: ClientRound, state: dict) -> int:
        """Per task, on the held-out rows, for every candidate (mix, temperature): the summed negative
        log-likelihood of the mixed prediction and the correct predictions; and the rows. A
        (tasks, 2 candidates + 1) array kept for ``payload``."""
        k = len(CANDIDATES)
        counts = np.zeros((self.num_tasks, 2 * k + 1), np.float32)
        seen = ctx.seen_classes
        for start in range(0, len(rows), 256):
            batch = rows[start:start + 256]
            x, y = ctx.images(batch), ctx.labels(batch)
            task = self.task_of(y).cpu().numpy()
            h = model.shallow(x)
            base = model.base_log_probs(h, seen)
            path = model.plugin_path(model.representations(x, h=h))[:, :seen]
            for i, (lam, tau) in enumerate(CANDIDATES):
                mixed = torch.log_softmax(mix_log_probs(base, path, lam, tau), 1)
                nll = -mixed[torch.arange(len(y)), y]
                np.add.at(counts[:, i], task, nll.float().cpu().numpy())
                np.add.at(counts[:, k + i], task, (mixed.argmax(1) == y).float().cpu().numpy())
            np.add.at(counts[:, -1], task, 1.0)
        model.mix_counts = counts  # what this round's reply carries
        return int(len(rows))

    # ---- wire --------------------------------------------------------------------------
    def payload(self, model: DLCNet, ctx: ClientRound | None = None) -> dict[str, torch.Tensor]:
        state, up = model.state_dict(), {}
        for step in ctx.phase.split("+"):
            if step == "train":
                # 0-d arrays (BatchNorm's num_batches_tracked, unused with a momentum) stay home
                up.update({k: v for k, v in state.items() if is_base(k) and v.dim()})
            elif step == "plugin":
                sent = lambda k: ".lora_B." in k or self.lora_aggregation != "ffa"  # noqa: E731 (ffa: A stays)
                trained_head = self.path_head == "sgd"  # lda: the server builds the head
                up.update({k: v for k, v in state.items() if (k.startswith("dlc_head.") and trained_head) or (
                    is_plugin(k) and plugin_task(k) == ctx.task and sent(k))})
            elif step == "weighting":
                up.update({k: v for k, v in state.items() if k.startswith("weighting.")})
                if self.path_head == "lda":
                    up[STATS] = torch.from_numpy(model.path_statistics.astype(np.float32))  # half the bytes
            else:
                up[COUNTS] = torch.from_numpy(model.mix_counts)
        return up

    def sends_update(self, phase: str) -> bool:
        """Every round but a calibration of its own trains something (the base, a plugin, the head,
        the weighting unit)."""
        return phase != "calibrate"

    def array_role(self, key: str) -> str:
        """The calibration's scores and the path's feature statistics are statistics of the client's
        rows, not an update of anything."""
        return RELEASE if key in (COUNTS, STATS) else UPDATE

    # ---- server side ---------------------------------------------------------------------
    def phases(self, task: int, rounds: int) -> list[str]:
        if self.rounds == "shared":
            if rounds < 2:
                raise ConfigError(f"method=dlc with method.rounds=shared needs rounds_per_task >= 2 (it is {rounds}): "
                                  "DLC's plugin and calibration ride on the base's last two rounds of a task. Raise "
                                  "rounds_per_task or set method.rounds=extra.")
            return ["train"] * (rounds - 2) + ["train+plugin+weighting", "train+calibrate"]
        return ["train"] * rounds + ["plugin"] * self.plugin_rounds + ["weighting"] * self.weighting_rounds + \
            ["calibrate"]

    def downlink(self, global_arrays, task, phase, client):
        if phase == "train":
            return {k: v for k, v in global_arrays.items() if is_base(k)}
        return {k: v for k, v in global_arrays.items()
                if k not in (TASK_MIX, TASK_TEMPERATURE)
                and not (is_plugin(k) and plugin_task(k) > task)}  # later plugins: clients' init

    def aggregate(self, global_arrays, replies, task, phase, rule: AggregationRule = MEAN):
        g = dict(global_arrays)
        steps = phase.split("+")
        if steps[0] == "train":
            g.update(weighted_mean([({k: v for k, v in r.items() if is_base(k)}, n) for r, n in replies], rule))
            if len(steps) == 1:  # a plain base round: the next plugin step starts from the base head
                zero = lambda k: np.zeros_like(g[f"dlc_head.{k}"])  # noqa: E731
                g["dlc_head.weight"], g["dlc_head.bias"] = (zero("weight"), zero("bias")) if self.residual else \
                    (g["head.weight"], g["head.bias"])
                return g
            replies = [({k: v for k, v in r.items() if not is_base(k)}, n) for r, n in replies]
        if "calibrate" in steps:  # counts add up over clients; ties go to the smaller mix (the base)
            lam, tau = best_mix(np.sum([r[COUNTS] for r, _ in replies], axis=0))
            g["mix"], g["temperature"] = np.array([lam], np.float32), np.array([tau], np.float32)
            for key, value in ((TASK_MIX, lam), (TASK_TEMPERATURE, tau)):
                by_task = np.array(g[key], np.float32)
                by_task[task] = value
                g[key] = by_task
            return g
        weights = [n for _, n in replies]
        keys = list(replies[0][0])
        for layer in sorted({k.split(".lora_")[0] for k in keys if is_plugin(k)}):
            a_key, b_key = f"{layer}.lora_A.{task}.weight", f"{layer}.lora_B.{task}.weight"
            a_shape, b_shape = g[a_key].shape, g[b_key].shape
            a_sent = a_key in keys  # under ffa A stays at its shared value and is not sent
            a, b = aggregate_lora([((r[a_key] if a_sent else g[a_key]).reshape(a_shape[0], -1),
                                    r[b_key].reshape(b_shape[0], -1)) for r, _ in replies],
                                  weights, self.lora_aggregation, rule)
            g[a_key], g[b_key] = a.reshape(a_shape), b.reshape(b_shape)
        rest = [k for k in keys if not is_plugin(k) and k != STATS]
        g.update(weighted_mean([({k: r[k] for k in rest}, n) for r, n in replies], rule))
        if STATS in keys:  # statistics add up over clients; the path's classifier is their LDA
            stats = np.sum([np.asarray(r[STATS], np.float64) for r, _ in replies], axis=0)
            weight, bias = lda_classifier(stats, self.lda_shrinkage)
            if self.residual:  # against the head of the base the statistics were computed on
                weight, bias = weight - global_arrays["head.weight"], bias - global_arrays["head.bias"]
            g["dlc_head.weight"], g["dlc_head.bias"] = weight.astype(np.float32), bias.astype(np.float32)
        return g

    @torch.no_grad()
    def predict(self, model: DLCNet, x: torch.Tensor, seen_classes: int, batch_size: int = 512) -> torch.Tensor:
        model.eval()
        model.tasks_in_use = self.starts.index(seen_classes)
        preds = [model.mixed_log_probs(x[i:i + batch_size], seen_classes).argmax(1)
                 for i in range(0, len(x), batch_size)]
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def diagnostics(self, model: DLCNet, x: torch.Tensor, y: torch.Tensor, seen_tasks: int) -> dict:
        """Where accuracy comes from, on labelled inputs of the first ``seen_tasks`` tasks: ``dlc``
        (the prediction), ``base`` (backbone + head alone), ``plugin_path`` (mix 1), ``plugins_off``
        (the plugin path's head on the base feature), ``oracle_plugin`` (its head on the sample's own
        plugin), ``task_id`` (the weighting unit's largest weight is on the sample's task)."""
        model.eval()
        seen = self.starts[seen_tasks]
        model.tasks_in_use = seen_tasks
        task = self.task_of(y)
        h = model.shallow(x)
        plain = model.deep(h, None)
        reps = model.representations(x, h=h)
        path = model.plugin_path(reps)[:, :seen]
        weights = model.last_weights
        rate = lambda logits: float((logits.argmax(1) == y).float().mean())
        return {"dlc": float((self.predict(model, x, seen) == y).float().mean()),
                "base": rate(model.head(plain)[:, :seen]), "plugin_path": rate(path),
                "plugins_off": rate(model.path_head(plain)[:, :seen]),
                "oracle_plugin": rate(model.path_head(reps[task, torch.arange(len(x))])[:, :seen]),
                "task_id": float((weights.argmax(1) == task).float().mean()),
                "target_weight": float(weights[torch.arange(len(x)), task].mean())}

    @torch.no_grad()
    def report(self, model: DLCNet, exp, global_arrays: dict) -> dict:
        """results.json's ``diagnostics``: ``diagnostics`` on every test sample after the last task, the
        mix chosen after each task, and each plugin's relative size ||B A|| / ||W|| per task."""
        tasks = self.num_tasks
        rows = np.concatenate(exp.scenario.test_indices[:tasks])
        rows = rows[np.random.default_rng([int(exp.cfg.seed), 3, tasks]).permutation(len(rows))]
        device = next(model.parameters()).device
        out = {k: [] for k in ("dlc", "base", "plugin_path", "plugins_off", "oracle_plugin", "task_id",
                               "target_weight")}
        for i in range(0, len(rows), 512):  # averaged over chunks weighted by their size
            part = rows[i:i + 512]
            d = self.diagnostics(model, exp.test_images(part, device),
                                 torch.from_numpy(exp.scenario.y_test[part]).to(device), tasks)
            for k, v in d.items():
                out[k].append(v * len(part))
        result = {k: sum(v) / len(rows) for k, v in out.items()}
        result["mix_by_task"] = [float(v) for v in global_arrays.get(TASK_MIX, [])]
        result["temperature_by_task"] = [float(v) for v in global_arrays.get(TASK_TEMPERATURE, [])]
        result["plugin_relative_norm"] = [
            float(np.sqrt(sum(float(layer.delta_weight(t).norm() ** 2) for layer in model.layers())) /
                  np.sqrt(sum(float(layer.base.weight.norm() ** 2) for layer in model.layers())))
            for t in range(tasks)]
        return result

    def parameter_counts(self, model: DLCNet) -> dict:
        named = dict(model.named_parameters())
        backbone = sum(p.numel() for k, p in named.items() if k.startswith("features.") and is_base(k))
        plugins = sum(p.numel() for k, p in named.items() if is_plugin(k))
        weighting = sum(p.numel() for k, p in named.items() if k.startswith("weighting."))
        head = sum(p.numel() for k, p in named.items() if k.startswith("dlc_head."))
        added = plugins + weighting + head
        return {"backbone": backbone, "added": added, "added_fraction": added / backbone,
                "plugins": plugins, "weighting_unit": weighting, "head_rows": head,
                "plugins_and_weighting_fraction": (plugins + weighting) / backbone,
                "plugin_layers": list(model.plugin_layers)}


def best_mix(counts: np.ndarray) -> tuple[float, float]:
    """The (mix, temperature) with the lowest held-out negative log-likelihood, averaged over tasks
    (the metric weighs every task the same, while held-out rows of the current task outnumber each
    old task's). Likelihood, as temperature scaling fits its one parameter (Guo et al., 2017): on a
    few hundred rows accuracy moves by whole rows and picks at random among near ties; and the
    temperature, because a path whose logits are too confident (an LDA head's Gaussian likelihoods)
    would otherwise lose on likelihood what it wins on accuracy. Ties go to the earlier candidate:
    the smaller mix (towards the base), then the lower temperature. ``counts``: per task, summed NLL
    per candidate, correct rows per candidate, rows."""
    held = counts[:, -1] > 0
    if not held.any():
        return 0.0, 1.0
    k = len(CANDIDATES)
    loss = (counts[held, :k] / counts[held, -1:]).mean(axis=0)
    return CANDIDATES[int(np.flatnonzero(loss <= loss.min() + 1e-9)[0])]


def lda_classifier(stats: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear discriminant analysis from summed ``path_statistics``: class means, the pooled
    within-class covariance shrunk towards its mean variance (Sigma = (1 - s) S_w + s tr(S_w)/D I),
    and equal class priors, so every class weighs the same however many rows it has (the base's
    recency bias does not carry over): w_c = Sigma^-1 mu_c, b_c = -mu_c^T Sigma^-1 mu_c / 2. Classes
    without rows get zero rows (they are never among the seen classes). As streaming LDA
    (Hayes & Kanan, 2020) on a frozen feature extractor."""
    d = stats.shape[1] - 1
    sums, counts, gram = stats[:-d, :d], stats[:-d, d], stats[-d:, :d]
    have = counts > 0
    mu = sums[have] / counts[have, None]
    within = (gram - sums[have].T @ mu) / max(float(counts.sum() - have.sum()), 1.0)
    sigma = (1 - shrinkage) * within + shrinkage * np.trace(within) / d * np.eye(d)
    p = np.linalg.solve(sigma + 1e-9 * np.eye(d), mu.T)          # (D, k)
    weight, bias = np.zeros((len(counts), d)), np.zeros(len(counts))
    weight[have], bias[have] = p.T, -0.5 * np.einsum("kd,dk->k", mu, p)
    return weight, bias


def balanced_weights(rows: np.ndarray, ctx: ClientRound) -> torch.Tensor:
    """Per class, 1 / its count among ``rows``: every class weighs the same in a loss over them."""
    counts = np.bincount(ctx.labels(rows).cpu().numpy(), minlength=ctx.seen_classes).astype(np.float32)
    return torch.from_numpy(1.0 / np.maximum(counts, 1)).to(ctx.device)
