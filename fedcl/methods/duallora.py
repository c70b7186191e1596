"""DualLoRA in the federation (Chen et al., arXiv 2411.00623), built from the paper's description.

Per task t after the base session:
1. ``basis_start``: clients send the basis of their task-t inputs to every adapted layer; the
   server merges them into task t's residual subspace U_t.
2. ``train`` rounds: clients train task t's orthogonal adapter (kept outside the merged bases of
   earlier tasks), task t's residual adapter (inside U_t) and task t's head rows, with cross-entropy
   over task t's classes; the server aggregates the factors (``lora_aggregation``) and the rows.
3. ``basis_end``: clients send bases of their task-t layer inputs and key representations; the
   server merges the layer bases into the protected old subspace (orthogonal to what it holds) and
   keeps the key basis as task t's key for the dynamic memory.

Inference (dynamic memory): each sample's key representation f is its pretrained backbone's
feature (``task_key=features``: the backbone without any adapter, the paper's way; one plain
forward pass) or the input image itself (``task_key=input``, for backbones trained from scratch,
where the base session's features know only task 0; no extra pass). ``task_key=auto`` picks
features when ``model.pretrained`` or ``model.checkpoint`` is set. Task t's confidence is
softmax_t(||K_t^T f||^2 / ||f||^2 / temperature) for task t's key basis K_t. A second pass weighs
the residual branches by it, and class scores are calibrated as
log p(class) = log p(task) + log softmax(logits within the task).

Adapted layers: ``targets`` (regexes on module names, suffix match: ``attn.qkv`` by default;
``mlp.fc1``, ``mlp.fc2``, ``attn.proj`` alike), on any backbone that has them (``model=vit``,
``model=timm``). ``qkv_parts=qv`` adapts only q and v of a fused qkv projection (the adapters'
output rows for k stay zero), as LoRA usually does.

Bases and keys are stored and sent at the width they use (no zero padding): a buffer changes shape
when a wider basis arrives (``load_payload``).

Rates: the base session trains at ``base_lr`` (null: ``lr``) for ``base_epochs`` local epochs (null:
``local_epochs``); afterwards adapters and head rows train at ``adapter_lr`` (null: ``lr``): a task
gets only a few dozen local steps, too few at the backbone's rate. Client bases travel as float16
(the server merges in float64).

Base session: without ``model.checkpoint`` or ``model.pretrained``, task 0 trains the whole backbone with FedAvg (its
bytes are counted); from task 1 on, the backbone is frozen. The base session's last round
(``basis_end``) goes to every client: each keeps the final backbone in its own state, so after
the base session no backbone array ever crosses the wire. (The simulator stores that identical
backbone once per run and once per Ray worker's memory, and each client's state names it by
digest: see ``SharedBlobStore``.) With a pretrained backbone every client loads the same
weights instead, and adapters train from task 0.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcl.aggregation.lora import aggregate_lora, check_scheme
from fedcl.aggregation.rules import MEAN, AggregationRule
from fedcl.aggregation.subspace import BASIS_AGGREGATIONS, InputStatistics, merge_covariance, merge_svd
from fedcl.errors import ConfigError
from fedcl.methods.base import BASIS, COVARIANCE, HEAD_ROWS, UPDATE, ClientRound, Method, fit, weighted_mean
from fedcl.models.dual_lora import DualLoRALinear, TaskBases, bare
from fedcl.models.lora import inject_lora, match_targets

ADAPTER_PARTS = ("orth_A", "orth_B", "res_C", "res_B")
TASK_KEYS = ("auto", "features", "input")
QKV_PARTS = ("qkv", "qv")


class DualLoRA(Method):
    def __init__(self, name: str = "duallora", rank: int = 2, alpha: float = 4.0,
                 targets: list[str] | str = "attn.qkv", threshold: float = 0.999,
                 feature_threshold: float = 0.95, max_client_basis: int = 32, temperature: float = 0.02,
                 orthogonal: bool = True, residual: bool = True, task_key: str = "auto",
                 max_key_dims: int = 64, base_lr: float | None = None, base_epochs: int | None = None,
                 adapter_lr: float | None = 0.005, qkv_parts: str = "qkv"):
        super().__init__(name)
        if not (orthogonal or residual):
            raise ConfigError("method.orthogonal and method.residual are both false: enable at least one adapter.")
        if task_key not in TASK_KEYS:
            raise ConfigError(f"method.task_key={task_key!r} is unknown. Choose 'auto' (features for a pretrained "
                              "backbone, else input), 'features' or 'input'.")
        if qkv_parts not in QKV_PARTS:
            raise ConfigError(f"method.qkv_parts={qkv_parts!r} is unknown. Choose 'qkv' (the whole fused "
                              "projection) or 'qv' (q and v only, k untouched).")
        self.rank, self.alpha, self.targets, self.qkv_parts = int(rank), float(alpha), targets, qkv_parts
        self.threshold, self.feature_threshold = float(threshold), float(feature_threshold)
        self.max_client_basis, self.temperature = int(max_client_basis), float(temperature)
        self.orthogonal, self.residual = bool(orthogonal), bool(residual)
        self.task_key_option, self.task_key = task_key, task_key  # resolved by bind
        self.max_key_dims = int(max_key_dims)
        self.base_lr = base_lr
        self.base_epochs = None if base_epochs is None else int(base_epochs)
        self.adapter_lr = adapter_lr

    # ---- shape of the run ----------------------------------------------------------------
    def bind(self, num_tasks: int, task_starts: list[int], cfg) -> None:
        self.num_tasks, self.starts = num_tasks, list(task_starts)
        self.lora_aggregation = check_scheme(str(cfg.strategy.lora_aggregation))
        self.basis_aggregation = str(cfg.strategy.basis_aggregation)
        if self.basis_aggregation not in BASIS_AGGREGATIONS:
            raise ConfigError(f"strategy.basis_aggregation={self.basis_aggregation!r} is unknown. "
                              f"Choose one of {list(BASIS_AGGREGATIONS)}.")
        pretrained = bool(cfg.model.get("checkpoint", None) or cfg.model.get("pretrained", False))
        self.first = 0 if pretrained else 1  # from scratch, task 0 is the base session
        if self.task_key_option == "auto":
            self.task_key = "features" if pretrained else "input"
        self.key_dim = int(cfg.get("input_dim", 0))
        self.base_session_tasks = self.first

    def prepare_model(self, model: nn.Module) -> nn.Module:
        names = match_targets(model.features, self.targets, (nn.Linear,), "method.targets")
        fused = [n for n in names if n.rpartition(".")[2] == "qkv"]
        if self.qkv_parts == "qv" and not fused:
            raise ConfigError(f"method.qkv_parts=qv adapts q and v of fused qkv projections, but no layer of "
                              f"method.targets={self.targets} is one ({names[:4]}); set method.qkv_parts=qkv "
                              "or add attn.qkv to method.targets.")
        # plain LoRA layers first, swapped out below: they draw from the seeded generator before the
        # dual layers do, as DualLoRA always has, so a seed keeps giving the same adapters and run
        inject_lora(model.features, [re.escape(n) for n in names], r=self.rank, alpha=self.alpha)
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.features.get_submodule(parent_name) if parent_name else model.features
            base = getattr(parent, child).base
            mask = qv_mask(base, name) if self.qkv_parts == "qv" and name in fused else None
            layer = DualLoRALinear(base, self.num_tasks, self.rank, self.alpha, out_mask=mask)
            layer.first_adapter_task = self.first
            layer.use_orthogonal, layer.use_residual = self.orthogonal, self.residual
            setattr(parent, child, layer)
        key_dim = self.key_dim if self.task_key == "input" else model.head.in_features
        model.task_keys = TaskBases(self.num_tasks, key_dim)
        model.requires_grad_(True)
        return model

    def layers(self, model: nn.Module) -> dict[str, DualLoRALinear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, DualLoRALinear)}

    def parameter_counts(self, model: nn.Module) -> dict:
        """Backbone parameters against the adapters of the tasks that have them, and the state's
        bytes by kind (``state_bytes``: bases and keys grow over the run)."""
        named = dict(model.named_parameters())
        backbone = sum(p.numel() for k, p in named.items() if self.is_backbone(k))
        added = sum(p.numel() for k, p in named.items() if is_adapter(k) and int(k.rsplit(".", 1)[1]) >= self.first)
        return {"backbone": backbone, "added": added, "added_fraction": added / backbone,
                "adapted_layers": [n.removeprefix("features.") for n in self.layers(model)],
                "state_bytes": state_bytes(model)}

    def set_mode(self, model: nn.Module, task: int, residual_weights: torch.Tensor | str | None,
                 project_current: bool = True) -> None:
        """Which task the layers serve and how residual branches are weighted (see DualLoRALinear);
        ``project_current=False`` at inference, where every orthogonal A is stored projected."""
        for layer in self.layers(model).values():
            layer.task = task
            layer.residual_weights = residual_weights
            layer.project_current = project_current

    # ---- which arrays are which ----------------------------------------------------------
    @staticmethod
    def adapter_keys(model_keys, task: int) -> list[str]:
        return [k for k in model_keys if k.endswith(tuple(f".{p}.{task}" for p in ADAPTER_PARTS))]

    @staticmethod
    def is_backbone(key: str) -> bool:
        return not key.startswith("head.") and not is_adapter(key) and not is_basis(key)

    # ---- client side ---------------------------------------------------------------------
    def client_update(self, model: nn.Module, ctx: ClientRound, state: dict) -> int:
        hold_base_session_backbone(self, model, ctx, state)
        rows = ctx.task_rows(ctx.task)
        if not len(rows):
            return 0
        if ctx.phase.startswith("basis"):
            return len(rows)
        first_class, end = self.starts[ctx.task], self.starts[ctx.task + 1]
        if ctx.task < self.first:  # base session: the whole backbone and head, FedAvg
            for name, p in model.named_parameters():
                p.requires_grad_(not any(f".{part}." in name for part in ADAPTER_PARTS))
            self.set_mode(model, ctx.task, None)
            if self.base_lr:
                ctx.lr = float(self.base_lr)
            if self.base_epochs:
                ctx.local_epochs = self.base_epochs
            fit(model, rows, ctx, lambda x, logits: None, first_class)
            return len(rows)
        parts = [p for p in ADAPTER_PARTS if not (p == "orth_A" and self.lora_aggregation == "ffa")]
        trainable = {f"{name}.{p}.{ctx.task}" for name in self.layers(model) for p in parts}  # ffa: A frozen
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable or name.startswith("head."))
        rows_mask = torch.zeros_like(model.head.weight[:, :1])
        rows_mask[first_class:end] = 1
        hooks = [model.head.weight.register_hook(lambda g: g * rows_mask),
                 model.head.bias.register_hook(lambda g: g * rows_mask[:, 0])]
        self.set_mode(model, ctx.task, "current")
        if self.adapter_lr:
            ctx.lr = float(self.adapter_lr)
        fit(model, rows, ctx, lambda x, logits: None, first_class)
        for h in hooks:
            h.remove()
        return len(rows)

    def load_payload(self, model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
        """Bases arrive at the width they use: the model's basis buffers take that width."""
        rest = {}
        for k, v in arrays.items():
            if not is_basis(k):
                rest[k] = v
                continue
            owner, _, leaf = k.rpartition(".")
            module = model.get_submodule(owner)
            own = module._buffers[leaf]
            setattr(module, leaf, torch.from_numpy(np.array(v)).to(own.device, own.dtype))
        super().load_payload(model, rest)

    def payload(self, model: nn.Module, ctx: ClientRound | None = None) -> dict[str, torch.Tensor]:
        if ctx.task < self.first and ctx.phase == "train":  # base session: backbone and head
            return {k: v for k, v in model.state_dict().items() if self.is_backbone(k) or k.startswith("head.")}
        if ctx.phase.startswith("basis"):
            return self.client_bases(model, ctx)
        s, e = self.starts[ctx.task], self.starts[ctx.task + 1]
        state = model.state_dict()
        out = {k: state[k] for k in self.adapter_keys(state, ctx.task)}
        out["head_rows.weight"] = model.head.weight.detach()[s:e]
        out["head_rows.bias"] = model.head.bias.detach()[s:e]
        return out

    @torch.no_grad()
    def client_bases(self, model: nn.Module, ctx: ClientRound) -> dict[str, torch.Tensor]:
        rows = ctx.task_rows(ctx.task)
        if not len(rows):  # a client without data of this task has no basis to send
            return {}
        layers = self.layers(model)
        for layer in layers.values():  # each layer sums its inputs' x^T x as batches pass
            layer.capture = InputStatistics(2 * self.max_client_basis)
        self.set_mode(model, ctx.task, "current" if ctx.phase == "basis_end" and ctx.task >= self.first else None)
        model.eval()
        stats = {name: layer.capture for name, layer in layers.items()}
        if ctx.phase == "basis_end":
            stats["task_key"] = InputStatistics(2 * self.max_client_basis)
        for i in range(0, len(rows), 256):
            images = ctx.images(rows[i:i + 256])
            model.features(images)
            if ctx.phase == "basis_end":
                stats["task_key"].append(self.key_representation(model, images))
        out = {}
        for name, stat in stats.items():
            if self.basis_aggregation == "covariance":
                out[f"cov.{name}"] = torch.from_numpy(stat.covariance())
            else:
                u, s = stat.basis(self.threshold if name != "task_key" else self.feature_threshold)
                # half precision on the wire (orthonormal columns, entries below 1; the singular
                # values stay float32): the server merges in float64 and re-orthonormalises
                out[f"U.{name}"] = torch.from_numpy(u[:, :self.max_client_basis].astype(np.float16))
                out[f"s.{name}"] = torch.from_numpy(s[:self.max_client_basis].astype(np.float32))
        for layer in layers.values():
            layer.capture = None
            layer.residual_weights = None
        return out

    # ---- server side ---------------------------------------------------------------------
    def phases(self, task: int, rounds: int) -> list[str]:
        start = ["basis_start"] if task >= self.first and self.residual else []
        return start + ["train"] * rounds + ["basis_end"]

    def task_key_release(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A basis reply's task-key part: the span of the client's key representations."""
        return {k: v for k, v in arrays.items() if k in ("U.task_key", "s.task_key", "cov.task_key")}

    def array_role(self, key: str) -> str:
        return sent_role(key)

    def counterpart(self, key: str) -> str:
        return head_of_rows(key)

    def samples_everyone(self, task: int, phase: str) -> bool:
        return task < self.first and phase == "basis_end"  # every client gets the final backbone

    def downlink(self, global_arrays, task, phase, client):
        if task < self.first:
            return global_arrays
        return {k: v for k, v in global_arrays.items() if not self.is_backbone(k)}

    def aggregate(self, global_arrays, replies, task, phase, rule: AggregationRule = MEAN):
        """New arrays for what changed (global arrays are read-only); ``rule`` (median, trimmed
        mean, Krum) combines backbone, head rows and adapter factors; subspace merges are not averages."""
        g = dict(global_arrays)
        if phase == "train" and task < self.first:
            return {**g, **weighted_mean(replies, rule)}
        if phase == "train":
            return self.aggregate_adapters(g, replies, task, rule)
        # every basis is stored at the width it uses, in float32 like the model's buffers
        for name in {k.split(".", 1)[1] for k in replies[0][0] if k.startswith(("U.", "cov."))}:
            if name == "task_key":  # task t's key: the span of its key representations
                key, basis = f"task_keys.{task}", self.merge(replies, name, self.feature_threshold, None)
                basis = basis[:, :self.max_key_dims]
            elif phase == "basis_start":  # task t's residual subspace: its own span, overlaps allowed
                key, basis = f"{name}.task_bases.{task}", self.merge(replies, name, self.threshold, None)
            else:  # protect task t: add its new directions to the old subspace
                key, old = f"{name}.old_basis", g[f"{name}.old_basis"]
                new = self.merge(replies, name, self.threshold, old if old.shape[1] else None)
                basis = np.concatenate([old, new], axis=1)[:, :old.shape[0]]
            g[key] = basis.astype(np.float32)
        return g

    def merge(self, replies, name, threshold, old):
        if self.basis_aggregation == "covariance":
            return merge_covariance([r[f"cov.{name}"] for r, _ in replies], threshold, old)
        return merge_svd([(r[f"U.{name}"], r[f"s.{name}"]) for r, _ in replies], threshold, old)

    def aggregate_adapters(self, g, replies, task, rule: AggregationRule = MEAN):
        weights = [n for _, n in replies]
        layer_names = {k.rsplit(".", 2)[0] for k in replies[0][0] if ".orth_A." in k}
        for name in layer_names:
            a_key, b_key = f"{name}.orth_A.{task}", f"{name}.orth_B.{task}"
            a, b = aggregate_lora([(r[a_key], r[b_key]) for r, _ in replies], weights, self.lora_aggregation, rule)
            old = g[f"{name}.old_basis"]
            g[a_key], g[b_key] = a - (a @ old) @ old.T, b  # stored projected: exact protection
            for part in ("res_C", "res_B"):
                key = f"{name}.{part}.{task}"
                g[key] = weighted_mean([({key: r[key]}, n) for r, n in replies], rule)[key]
        rows = weighted_mean([({k: r[k] for k in ("head_rows.weight", "head_rows.bias")}, n) for r, n in replies], rule)
        s, e = self.starts[task], self.starts[task + 1]
        g["head.weight"] = g["head.weight"].copy()
        g["head.bias"] = g["head.bias"].copy()
        g["head.weight"][s:e] = rows["head_rows.weight"]
        g["head.bias"][s:e] = rows["head_rows.bias"]
        return g

    # ---- export ---------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, model: nn.Module, folder) -> None:
        """The orthogonal adapters (the plain-LoRA part: always on, shared by all tasks) in PEFT's
        format, on the frozen backbone. Residual branches and the dynamic memory have no PEFT form."""
        from fedcl.models.peft_export import export_peft

        last = self.num_tasks - 1
        factors = {}
        for name, layer in self.layers(model).items():
            module = name.removeprefix("features.")
            mask = 1.0 if layer.out_mask is None else layer.out_mask[:, None]
            factors[module] = [(layer.orth_A[i].detach().clone(), (layer.orth_B[i] * mask).detach().clone())
                               for i in range(self.first, last + 1)]
        backbone = {k.removeprefix("features.").replace(".base.", "."): v
                    for k, v in model.state_dict().items() if self.is_backbone(k) and k.startswith("features.")}
        export_peft(folder, factors, self.rank, self.alpha, backbone)

    # ---- inference: dynamic memory ------------------------------------------------------
    @torch.no_grad()
    def key_representation(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What task keys describe: the input image (the representation entering the patch
        embedding) or the backbone's own pooled feature, without any adapter (so a key does not
        depend on adapters trained after it)."""
        if self.task_key == "input":
            return x.flatten(1)
        with bare(model):
            return model.features(x).flatten(1)

    @torch.no_grad()
    def task_confidence(self, model: nn.Module, x: torch.Tensor, seen_tasks: int) -> torch.Tensor:
        f = self.key_representation(model, x)
        energy = f.pow(2).sum(-1)
        explained = torch.stack([(f @ k.to(f.dtype)).pow(2).sum(-1) if k.shape[1] else torch.zeros_like(energy)
                                 for k in (model.task_keys[t] for t in range(seen_tasks))], 1)
        return torch.softmax(explained / energy.clamp_min(1e-12)[:, None] / self.temperature, dim=1)

    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor, seen_classes: int, batch_size: int = 512) -> torch.Tensor:
        model.eval()
        seen_tasks = self.starts.index(seen_classes)
        preds = []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            conf = self.task_confidence(model, xb, seen_tasks)
            weights = torch.zeros(len(xb), self.num_tasks, device=conf.device)
            weights[:, :seen_tasks] = conf
            self.set_mode(model, seen_tasks - 1, weights, project_current=False)
            logits = model(xb)
            log_conf = torch.log(conf.clamp_min(1e-12))
            scores = torch.cat([F.log_softmax(logits[:, self.starts[t]:self.starts[t + 1]], dim=-1)
                                + log_conf[:, t:t + 1] for t in range(seen_tasks)], dim=1)
            preds.append(scores.argmax(1))
        self.set_mode(model, seen_tasks - 1, None)
        return torch.cat(preds)


def sent_role(key: str) -> str:
    """What an array a DualLoRA (or InfLoRA) client sends is: the task's head rows, a layer's basis
    (``U.*``: directions, as many as the client's data needs; ``s.*``: their singular values) or
    covariance (``cov.*``), else an update (backbone, adapters)."""
    if key.startswith("head_rows."):
        return HEAD_ROWS
    if key.startswith(("U.", "s.")):
        return BASIS
    if key.startswith("cov."):
        return COVARIANCE
    return UPDATE


def head_of_rows(key: str) -> str:
    """``head_rows.<p>`` are rows of ``head.<p>``; anything else updates itself."""
    return "head." + key.removeprefix("head_rows.") if key.startswith("head_rows.") else key


def is_basis(key: str) -> bool:
    return key.startswith("task_keys.") or key.endswith(".old_basis") or ".task_bases." in key


def is_adapter(key: str) -> bool:
    return any(f".{p}." in key for p in ADAPTER_PARTS)


def qv_mask(layer: nn.Linear, name: str) -> torch.Tensor:
    """Output rows of a fused qkv projection (q, k, v stacked) that q and v own: 1, k's: 0."""
    if layer.out_features % 3:
        raise ConfigError(f"method.qkv_parts=qv: {name} has {layer.out_features} outputs, not q, k and v "
                          "stacked in three equal parts; set method.qkv_parts=qkv.")
    mask = torch.ones(layer.out_features)
    mask[layer.out_features // 3: 2 * layer.out_features // 3] = 0
    return mask


def state_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of a model's state by kind: ``adapters`` (DualLoRA's branches), ``bases`` (layer
    bases and task keys) and ``backbone`` (everything else, head included); ``total``."""
    out = {"backbone": 0, "adapters": 0, "bases": 0}
    for k, v in model.state_dict().items():
        out["adapters" if is_adapter(k) else "bases" if is_basis(k) else "backbone"] += v.numel() * v.element_size()
    return {**out, "total": sum(out.values())}


def pad_into(target: np.ndarray, basis: np.ndarray) -> None:
    """Write a (d x m) basis into a zero-padded (d x d) slot (InfLoRA's layout; DualLoRA keeps
    every basis at its own width)."""
    target[:] = 0
    m = min(basis.shape[1], target.shape[1])
    target[:, :m] = basis[:, :m]


def hold_base_session_backbone(method, model: nn.Module, ctx: ClientRound, state: dict) -> None:
    """A client keeps the final base-session backbone in its state (the base session's last round),
    and loads it in every later round: after the base session no backbone array crosses the wire.
    ``method`` has ``first`` (the first task after the base session) and ``is_backbone(key)``."""
    if ctx.task < method.first and ctx.phase == "basis_end":  # the final base-session model
        backbone = {k: v.clone() for k, v in model.state_dict().items() if method.is_backbone(k)}
        state["backbone"] = ctx.shared.put(backbone) if ctx.shared is not None else backbone
    elif ctx.task >= method.first and "backbone" in state:
        backbone = state["backbone"]  # a digest into the run's shared store, or the tensors
        model.load_state_dict(ctx.shared.get(backbone) if isinstance(backbone, str) else backbone, strict=False)
