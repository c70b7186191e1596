"""DLC in the federation (Xu et al., arXiv 2512.03537): per-task LoRA plugins and a weighting
unit on a base trained by a federated replay or LwF method, built from the paper's description.

Model (``fedcl.models.dlc_plugins``): the backbone and its head are the base method's model.
Each task t owns a conv-LoRA plugin in the deep stage(s) (``method.stages``, ``method.rank``);
plugin t maps the shallow activation of an input to task t's representation f_t; the weighting
unit scores every f_t (one linear scorer per task), softmax over the plugins of the seen tasks,
and DLC's own head classifies the weighted sum. Prediction uses only that path.

Schedule. Tasks 0 .. ``freeze_base_after`` (F) are base tasks: each round a client trains the
base by the base method (``method.base``: replay exemplars or LwF distillation, on the plain
backbone + head) and, in the same round, plugin t, the weighting unit and the DLC head on the
plugin path. The plugin path's loss does not reach the base, so the base follows exactly the
base method's trajectory and DLC is a pure add-on. The whole base crosses the wire both ways in
these rounds (FedAvg; counted in ``communication``). After task F's training rounds a
``base_end`` round sends the final base to every client, which keeps it in its state; from task
F+1 on the base is frozen (BatchNorm statistics included) and only plugin t, the weighting unit
and DLC head rows go up; plugins of seen tasks, the weighting unit and the DLC head come down.
With ``freeze_base_after: null`` (the default) or F >= num_tasks-1 the base is never frozen:
it is the base method's model learned over the whole sequence, as in the paper.

Loss of the plugin path: cross-entropy of the combined classification over all seen classes
plus ``weight_loss`` x cross-entropy of the weighting unit's softmax against the sample's task
(known from its label: each class belongs to one task). The combined cross-entropy alone can be
satisfied by a blend of plugins, so nothing pushes non-target plugins' weights down; the
auxiliary term does, directly, and replay exemplars are the negatives that teach old tasks'
scorers to stay low on new data (and the new scorer to stay low on old data). In that term each
task present in a batch weighs the same (``balance_tasks``), so a client's few exemplars of an
old task count as much as its current-task data; ``balance_classification`` does the same for
the classification term (off by default: it helped on one seed and hurt on another).

Only plugin t trains in task t (plugins of earlier tasks are frozen); the weighting unit and the
DLC head rows of all seen classes train when the base method keeps exemplars (replay), only the
current task's rows without (LwF). Plugins are aggregated by ``strategy.lora_aggregation``
(conv factors flattened to r x (in*k*k) and out x r), everything else by FedAvg.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcl.aggregation.lora import aggregate_lora, check_scheme
from fedcl.aggregation.rules import MEAN, AggregationRule
from fedcl.errors import ConfigError
from fedcl.methods.base import ClientRound, Method, autocast, local_batches, local_optimizer, weighted_mean
from fedcl.methods.lwf import LwF
from fedcl.methods.replay import Replay
from fedcl.models.dlc_plugins import DLCNet, resolve_stages

BASES = ("replay", "lwf")


def is_plugin(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def plugin_task(key: str) -> int:
    return int(key.split(".lora_")[1].split(".")[1])


def is_dlc_part(key: str) -> bool:
    """Plugins, weighting unit, DLC head: what DLC adds to the base model."""
    return is_plugin(key) or key.startswith(("weighting.", "dlc_head."))


def balanced(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return losses.mean() if weights is None else (weights * losses).sum() / weights.sum()


def is_base(key: str) -> bool:
    """The base method's model: backbone (minus plugins) and its own head."""
    return not is_dlc_part(key)


class DLC(Method):
    supports_dp_sgd = False  # a step trains the base and the plugin path with two separate gradients

    def __init__(self, name: str = "dlc", base: str = "replay", memory_per_class: int = 5,
                 kd_weight: float = 1.0, temperature: float = 2.0, stages="auto", rank: int = 2,
                 alpha: float = 4.0, freeze_base_after: int | None = None, weight_loss: float = 1.0,
                 balance_tasks: bool = True, balance_classification: bool = False,
                 memory_total: int | None = None):
        super().__init__(name)
        if base not in BASES:
            raise ConfigError(f"method.base={base!r} is unknown. Choose one of {list(BASES)}.")
        self.base_name = base
        self.base = Replay(memory_per_class=memory_per_class, memory_total=memory_total) if base == "replay" else \
            LwF(kd_weight=kd_weight, temperature=temperature)
        self.stages, self.rank, self.alpha = stages, int(rank), float(alpha)
        self.freeze_base_after = None if freeze_base_after is None else int(freeze_base_after)
        if self.freeze_base_after is not None and self.freeze_base_after < 0:
            raise ConfigError(f"method.freeze_base_after={freeze_base_after} must be >= 0: the base "
                              "trains from scratch during tasks 0 .. freeze_base_after.")
        self.weight_loss, self.balance_tasks = float(weight_loss), bool(balance_tasks)
        self.balance_classification = bool(balance_classification)
        self.exemplars = base == "replay" and (int(memory_per_class) > 0 if memory_total is None else memory_total > 0)

    # ---- shape of the run ----------------------------------------------------------------
    def bind(self, num_tasks: int, task_starts: list[int], cfg) -> None:
        if cfg.model.name == "vit":
            raise ConfigError("method=dlc puts conv-LoRA plugins in a CNN's deep stage; "
                              "use model=small_cnn or model=resnet18 (not model=vit).")
        self.num_tasks, self.starts = num_tasks, list(task_starts)
        self.base.bind(num_tasks, task_starts, cfg)
        self.model_name = str(cfg.model.name)
        self.lora_aggregation = check_scheme(str(cfg.strategy.lora_aggregation))
        never = self.freeze_base_after is None
        self.last_base_task = num_tasks - 1 if never else min(self.freeze_base_after, num_tasks - 1)
        self.base_session_tasks = self.last_base_task + 1

    def prepare_model(self, model: nn.Module) -> DLCNet:
        stages = resolve_stages(model.features, self.model_name, self.stages)
        net = DLCNet(model.features, model.head, stages, self.num_tasks, self.rank, self.alpha)
        net.requires_grad_(True)
        return net

    def frozen(self, task: int) -> bool:
        return task > self.last_base_task

    def head_rows(self, task: int) -> tuple[int, int]:
        """DLC head rows that train (and travel) in task ``task``."""
        return (0 if self.exemplars else self.starts[task]), self.starts[task + 1]

    def task_of(self, y: torch.Tensor) -> torch.Tensor:
        bounds = torch.tensor(self.starts[1:-1], device=y.device)
        return torch.bucketize(y, bounds, right=True)

    # ---- client side ---------------------------------------------------------------------
    def client_update(self, model: DLCNet, ctx: ClientRound, state: dict) -> int:
        if ctx.phase == "base_end":  # every client keeps the final base; nothing to train
            base = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if is_base(k)}
            # identical on every client: the run stores it once (SharedBlobStore), states name it
            state["base"] = ctx.shared.put(base) if ctx.shared is not None else base
            return 0
        if getattr(ctx, "dp_sgd", None) is not None:  # never train without the DP the user asked for
            raise ConfigError("privacy.local_dp_sgd=true does not support method=dlc: its two-path training "
                              "step is not Opacus' DP-SGD. Use client-level DP (privacy=client_dp).")
        frozen = self.frozen(ctx.task)
        if frozen:
            if "base" not in state:
                raise RuntimeError(f"client {ctx.client} has no frozen base: it missed the base_end round "
                                   f"of task {self.last_base_task}")
            base = ctx.shared.get(state["base"]) if isinstance(state["base"], str) else state["base"]
            model.load_state_dict({k: v.to(ctx.device) for k, v in base.items()}, strict=False)
        model.frozen_norms = frozen
        model.mode = "dlc" if frozen else "plain"   # the path an LwF teacher distils
        model.tasks_in_use = ctx.task               # the teacher combines the old plugins only
        self.base.begin_round(model, ctx, state)
        model.tasks_in_use = ctx.task + 1
        rows = self.base.training_rows(ctx, state)
        if not len(rows):
            return 0
        train_ffa_a = self.lora_aggregation != "ffa"
        for name, p in model.named_parameters():
            if is_plugin(name):
                p.requires_grad_(plugin_task(name) == ctx.task and (".lora_B." in name or train_ffa_a))
            else:
                p.requires_grad_(not frozen or not is_base(name))
        lo, hi = self.head_rows(ctx.task)
        kept = {k: v.detach().clone() for k, v in model.dlc_head.state_dict().items()}
        self.local_train(model, rows, ctx, state, frozen)
        with torch.no_grad():  # rows outside lo:hi stay exactly as received
            for k, v in model.dlc_head.state_dict().items():
                v[:lo] = kept[k][:lo]
                v[hi:] = kept[k][hi:]
        return len(rows)

    def local_train(self, model: DLCNet, rows: np.ndarray, ctx: ClientRound, state: dict, frozen: bool) -> None:
        base_params = [p for n, p in model.named_parameters() if p.requires_grad and is_base(n)]
        dlc_params = [p for n, p in model.named_parameters() if p.requires_grad and is_dlc_part(n)]
        opt = local_optimizer(base_params + dlc_params, ctx)
        lo, hi = self.head_rows(ctx.task)
        mask = torch.zeros(model.dlc_head.out_features, 1, device=ctx.device)
        mask[lo:hi] = 1
        hooks = [model.dlc_head.weight.register_hook(lambda g: g * mask),
                 model.dlc_head.bias.register_hook(lambda g: g * mask[:, 0])]
        seen = ctx.seen_classes
        model.train()
        for x, y in local_batches(rows, ctx):
            opt.zero_grad(set_to_none=True)
            h = None
            if base_params:  # the base method's own step, on the plain path
                model.mode = "plain"
                with autocast(ctx):
                    h = model.shallow(x)  # computed once: the plugin path starts from it, detached
                    logits = model(x, h)[:, :seen]
                    loss = F.cross_entropy(logits, y)
                    extra = self.base.extra_loss(model, x, logits, ctx, state)
                (loss if extra is None else loss + extra).backward()
                h = h.detach()
            model.mode = "dlc"
            with autocast(ctx):
                loss = self.plugin_loss(model, x, y, ctx, state, frozen, h)
            if base_params:  # the plugin path's gradient stops at the base
                grads = torch.autograd.grad(loss, dlc_params, allow_unused=True)
                for p, g in zip(dlc_params, grads):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
            else:
                loss.backward()
            opt.step()
        for h in hooks:
            h.remove()
        model.mode = "dlc"

    def plugin_loss(self, model: DLCNet, x, y, ctx: ClientRound, state: dict, frozen: bool,
                    h: torch.Tensor | None = None) -> torch.Tensor:
        logits = model(x, h)[:, :ctx.seen_classes]
        task = self.task_of(y)
        # every task present in the batch weighs the same (a few exemplars vs the current task)
        w = 1.0 / torch.bincount(task, minlength=ctx.task + 1)[task].float()
        loss = balanced(F.cross_entropy(logits, y, reduction="none"), w if self.balance_classification else None)
        if frozen:  # LwF after the freeze: distil the old DLC path's old-class logits
            extra = self.base.extra_loss(model, x, logits, ctx, state)
            if extra is not None:
                loss = loss + extra
        if self.weight_loss > 0 and ctx.task > 0:
            nll = F.nll_loss(torch.log(model.last_weights.clamp_min(1e-12)), task, reduction="none")
            loss = loss + self.weight_loss * balanced(nll, w if self.balance_tasks else None)
        return loss

    # ---- wire --------------------------------------------------------------------------
    def payload(self, model: DLCNet, ctx: ClientRound | None = None) -> dict[str, torch.Tensor]:
        if ctx.phase == "base_end":
            return {}
        state = model.state_dict()
        # 0-d arrays (BatchNorm's num_batches_tracked, unused with a momentum) come back as (1,) from
        # np.ascontiguousarray in the codec and the server rejects the reply's shape: they stay home
        out = {k: v for k, v in state.items()
               if v.dim() and ((is_plugin(k) and plugin_task(k) == ctx.task) or k.startswith("weighting.")
                               or (is_base(k) and not self.frozen(ctx.task)))}
        lo, hi = self.head_rows(ctx.task)
        out["dlc_head_rows.weight"] = model.dlc_head.weight.detach()[lo:hi]
        out["dlc_head_rows.bias"] = model.dlc_head.bias.detach()[lo:hi]
        return out

    # ---- server side ---------------------------------------------------------------------
    def phases(self, task: int, rounds: int) -> list[str]:
        freeze_now = task == self.last_base_task and task < self.num_tasks - 1
        return ["train"] * rounds + (["base_end"] if freeze_now else [])

    def samples_everyone(self, task: int, phase: str) -> bool:
        return phase == "base_end"

    def downlink(self, global_arrays, task, phase, client):
        return {k: v for k, v in global_arrays.items()
                if not (is_plugin(k) and plugin_task(k) > task)          # not yet trained: clients' init
                and not (is_base(k) and self.frozen(task))}               # frozen: clients keep it

    def aggregate(self, global_arrays, replies, task, phase, rule: AggregationRule = MEAN):
        g = dict(global_arrays)
        if phase != "train":
            return g
        weights = [n for _, n in replies]
        keys = list(replies[0][0])
        for layer in sorted({k.split(".lora_")[0] for k in keys if is_plugin(k)}):
            a_key, b_key = f"{layer}.lora_A.{task}.weight", f"{layer}.lora_B.{task}.weight"
            a_shape, b_shape = g[a_key].shape, g[b_key].shape
            a, b = aggregate_lora([(r[a_key].reshape(a_shape[0], -1), r[b_key].reshape(b_shape[0], -1))
                                   for r, _ in replies], weights, self.lora_aggregation, rule)
            g[a_key], g[b_key] = a.reshape(a_shape), b.reshape(b_shape)
        rest = [k for k in keys if not is_plugin(k) and not k.startswith("dlc_head_rows.")]
        g.update(weighted_mean([({k: r[k] for k in rest}, n) for r, n in replies], rule))
        rows = weighted_mean([({k: r[k] for k in ("dlc_head_rows.weight", "dlc_head_rows.bias")}, n)
                              for r, n in replies], rule)
        lo, hi = self.head_rows(task)
        for part in ("weight", "bias"):
            g[f"dlc_head.{part}"] = g[f"dlc_head.{part}"].copy()
            g[f"dlc_head.{part}"][lo:hi] = rows[f"dlc_head_rows.{part}"]
        return g

    @torch.no_grad()
    def predict(self, model: DLCNet, x: torch.Tensor, seen_classes: int, batch_size: int = 512) -> torch.Tensor:
        model.eval()
        model.mode, model.tasks_in_use = "dlc", self.starts.index(seen_classes)
        preds = [model(x[i:i + batch_size])[:, :seen_classes].argmax(1) for i in range(0, len(x), batch_size)]
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def plugin_weights(self, model: DLCNet, x: torch.Tensor, seen_tasks: int) -> torch.Tensor:
        """The weighting unit's (N, seen_tasks) weights: for diagnostics and tests."""
        model.eval()
        model.mode, model.tasks_in_use = "dlc", seen_tasks
        model(x)
        return model.last_weights

    @torch.no_grad()
    def diagnostics(self, model: DLCNet, x: torch.Tensor, y: torch.Tensor, seen_tasks: int) -> dict:
        """Where accuracy comes from, on labelled inputs of the first ``seen_tasks`` tasks:
        ``dlc`` (the prediction), ``base`` (the base method's own backbone + head), ``task_id``
        (the weighting unit's largest weight is on the sample's task), ``target_weight`` (mean
        weight of that plugin) and ``oracle_plugin`` (DLC's head on the sample's own plugin alone)."""
        seen = self.starts[seen_tasks]
        task = self.task_of(y)
        pred = self.predict(model, x, seen)
        weights = self.plugin_weights(model, x, seen_tasks)
        model.mode = "plain"
        base = model(x)[:, :seen].argmax(1)
        model.mode = "dlc"
        reps = model.representations(x, seen_tasks)
        oracle = model.dlc_head(reps[task, torch.arange(len(x))])[:, :seen].argmax(1)
        rate = lambda hit: float(hit.float().mean())
        return {"dlc": rate(pred == y), "base": rate(base == y), "task_id": rate(weights.argmax(1) == task),
                "target_weight": float(weights[torch.arange(len(x)), task].mean()),
                "oracle_plugin": rate(oracle == y)}

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
