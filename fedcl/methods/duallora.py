"""DualLoRA in the federation (Chen et al., arXiv 2411.00623), built from the paper's description.

Per task t after the base session:
1. ``basis_start``: clients send the basis of their task-t inputs to every adapted layer; the
   server merges them into task t's residual subspace U_t.
2. ``train`` rounds: clients train task t's orthogonal adapter (kept outside the merged bases of
   earlier tasks), task t's residual adapter (inside U_t) and task t's head rows, with cross-entropy
   over task t's classes; the server aggregates the factors (``lora_aggregation``) and the rows.
3. ``basis_end``: clients send bases of their task-t layer inputs and final features; the server
   merges the layer bases into the protected old subspace (orthogonal to what it holds) and keeps
   the feature basis as task t's key for the dynamic memory.

Inference (dynamic memory): a first pass without residual branches gives each sample's feature f;
task t's confidence is softmax_t(||U_t^T f||^2 / ||f||^2 / temperature). A second pass weighs the
residual branches by it, and class scores are calibrated as
log p(class) = log p(task) + log softmax(logits within the task).

Rates: the base session trains at ``base_lr`` (null: ``lr``) for ``base_epochs`` local epochs (null:
``local_epochs``); afterwards adapters and head rows train at ``adapter_lr`` (null: ``lr``): a task
gets only a few dozen local steps, too few at the backbone's rate. Client bases travel as float16
(the server merges in float64).

Base session: without ``model.checkpoint``, task 0 trains the whole backbone with FedAvg (its
bytes are counted); from task 1 on, the backbone is frozen. The base session's last round
(``basis_end``) goes to every client: each keeps the final backbone in its own state, so after
the base session no backbone array ever crosses the wire. (The simulator stores that identical
backbone once per run and once per Ray worker's memory, and each client's state names it by
digest: see ``SharedBlobStore``.) With ``model.checkpoint`` every client
loads the same file instead.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcl.errors import ConfigError
from fedcl.federation.lora_aggregation import aggregate_lora, check_scheme
from fedcl.methods.base import ClientRound, Method, fit, weighted_mean
from fedcl.models.dual_lora import DualLoRALinear
from fedcl.models.lora import inject_lora
from fedcl.subspace import BASIS_AGGREGATIONS, client_basis, merge_covariance, merge_svd

ADAPTER_PARTS = ("orth_A", "orth_B", "res_C", "res_B")


class DualLoRA(Method):
    def __init__(self, name: str = "duallora", rank: int = 2, alpha: float = 4.0,
                 targets: list[str] | str = "attn.qkv", threshold: float = 0.999,
                 feature_threshold: float = 0.95, max_client_basis: int = 32, temperature: float = 0.02,
                 orthogonal: bool = True, residual: bool = True, task_key: str = "input",
                 max_key_dims: int = 64, base_lr: float | None = None, base_epochs: int | None = None,
                 adapter_lr: float | None = 0.005):
        super().__init__(name)
        if not (orthogonal or residual):
            raise ValueError("method.orthogonal and method.residual are both false: enable at least one adapter")
        self.rank, self.alpha, self.targets = int(rank), float(alpha), targets
        self.threshold, self.feature_threshold = float(threshold), float(feature_threshold)
        self.max_client_basis, self.temperature = int(max_client_basis), float(temperature)
        self.orthogonal, self.residual = bool(orthogonal), bool(residual)
        if task_key not in ("input", "features"):
            raise ValueError(f"method.task_key={task_key!r}: choose 'input' or 'features'")
        self.task_key, self.max_key_dims = task_key, int(max_key_dims)
        self.base_lr = base_lr
        self.base_epochs = None if base_epochs is None else int(base_epochs)
        self.adapter_lr = adapter_lr

    # ---- shape of the run ----------------------------------------------------------------
    def bind(self, num_tasks: int, task_starts: list[int], cfg) -> None:
        if cfg.model.name != "vit":
            raise ConfigError(f"method=duallora adapts a ViT's attention; set model=vit (not model={cfg.model.name}).")
        self.num_tasks, self.starts = num_tasks, list(task_starts)
        self.lora_aggregation = check_scheme(str(cfg.strategy.lora_aggregation))
        self.basis_aggregation = str(cfg.strategy.basis_aggregation)
        if self.basis_aggregation not in BASIS_AGGREGATIONS:
            raise ConfigError(f"strategy.basis_aggregation={self.basis_aggregation!r} is unknown. "
                              f"Choose one of {list(BASIS_AGGREGATIONS)}.")
        self.first = 0 if cfg.model.get("checkpoint", None) else 1  # task 0 is the base session
        self.key_dim = int(cfg.get("input_dim", 0))
        self.base_session_tasks = self.first

    def prepare_model(self, model: nn.Module) -> nn.Module:
        names = inject_lora(model.features, self.targets, r=self.rank, alpha=self.alpha)
        for name in names:  # swap the plain LoRA layer for the dual one, on the same frozen base
            parent_name, _, child = name.rpartition(".")
            parent = model.features.get_submodule(parent_name)
            layer = DualLoRALinear(getattr(parent, child).base, self.num_tasks, self.rank, self.alpha)
            layer.first_adapter_task = self.first
            layer.use_orthogonal, layer.use_residual = self.orthogonal, self.residual
            setattr(parent, child, layer)
        d = self.key_dim if self.task_key == "input" else model.head.in_features
        model.register_buffer("task_keys", torch.zeros(self.num_tasks, d, min(d, self.max_key_dims)))
        model.requires_grad_(True)
        return model

    def layers(self, model: nn.Module) -> dict[str, DualLoRALinear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, DualLoRALinear)}

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
        return (not key.startswith("head.") and key != "task_keys"
                and not any(f".{p}." in key for p in ADAPTER_PARTS)
                and not key.endswith(("old_basis", "task_bases")))

    # ---- client side ---------------------------------------------------------------------
    def client_update(self, model: nn.Module, ctx: ClientRound, state: dict) -> int:
        if ctx.task < self.first and ctx.phase == "basis_end":  # the final base-session model
            backbone = {k: v.clone() for k, v in model.state_dict().items() if self.is_backbone(k)}
            state["backbone"] = ctx.shared.put(backbone) if ctx.shared is not None else backbone
        elif ctx.task >= self.first and "backbone" in state:
            backbone = state["backbone"]  # a digest into the run's shared store, or the tensors
            model.load_state_dict(ctx.shared.get(backbone) if isinstance(backbone, str) else backbone, strict=False)
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
        """Bases arrive without their zero padding: pad them back to the buffers' shape."""
        own = model.state_dict()
        padded = {}
        for k, v in arrays.items():
            if is_basis(k) and v.shape != tuple(own[k].shape):
                full = np.zeros(tuple(own[k].shape), dtype=v.dtype)
                full[..., :v.shape[-1]] = v
                v = full
            padded[k] = v
        super().load_payload(model, padded)

    def payload(self, model: nn.Module, ctx: ClientRound | None = None) -> dict[str, torch.Tensor]:
        if ctx.task < self.first and ctx.phase == "train":  # base session: backbone and head
            return {k: v for k, v in model.state_dict().items() if self.is_backbone(k) or k.startswith("head.")}
        if ctx.phase.startswith("basis"):
            return self.client_bases(model, ctx)
        s, e = self.starts[ctx.task], self.starts[ctx.task + 1]
        out = {k: v for k, v in model.state_dict().items() if k in self.adapter_keys(model.state_dict(), ctx.task)}
        out["head_rows.weight"] = model.head.weight.detach()[s:e]
        out["head_rows.bias"] = model.head.bias.detach()[s:e]
        return out

    @torch.no_grad()
    def client_bases(self, model: nn.Module, ctx: ClientRound) -> dict[str, torch.Tensor]:
        rows = ctx.task_rows(ctx.task)
        if not len(rows):  # a client without data of this task has no basis to send
            return {}
        layers = self.layers(model)
        for layer in layers.values():
            layer.capture = []
        self.set_mode(model, ctx.task, "current" if ctx.phase == "basis_end" and ctx.task >= self.first else None)
        model.eval()
        feats = torch.cat([model.features(ctx.images(rows[i:i + 256])) for i in range(0, len(rows), 256)])
        out = {}
        captured = {name: torch.cat(layer.capture) for name, layer in layers.items()}
        if ctx.phase == "basis_end":
            captured["task_key"] = self.key_representation(model, ctx.images(rows), feats)
        for name, x in captured.items():
            x = x.double().numpy()
            if self.basis_aggregation == "covariance":
                out[f"cov.{name}"] = torch.from_numpy(x.T @ x)
            else:
                u, s = client_basis(x, self.threshold if name != "task_key" else self.feature_threshold)
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

    def varies_across_clients(self, key: str) -> bool:
        return key.startswith(("U.", "s."))  # a client's basis keeps as many directions as its data needs

    def samples_everyone(self, task: int, phase: str) -> bool:
        return task < self.first and phase == "basis_end"  # every client gets the final backbone

    def downlink(self, global_arrays, task, phase, client):
        if task < self.first:
            return global_arrays
        return {k: trim_basis(v) if is_basis(k) else v for k, v in global_arrays.items() if not self.is_backbone(k)}

    def aggregate(self, global_arrays, replies, task, phase):
        g = dict(global_arrays)
        if phase == "train" and task < self.first:
            return {**g, **weighted_mean(replies)}
        if phase == "train":
            return self.aggregate_adapters(g, replies, task)
        for name in {k.split(".", 1)[1] for k in replies[0][0] if k.startswith(("U.", "cov."))}:
            key_t = "task_keys" if name == "task_key" else None
            old_key = None if key_t else f"{name}.old_basis"
            threshold = self.feature_threshold if key_t else self.threshold
            if phase == "basis_start":  # task t's residual subspace: its own span, overlaps allowed
                basis = self.merge(replies, name, threshold, None)
                pad_into(g[f"{name}.task_bases"][task], basis)
            elif key_t:
                pad_into(g["task_keys"][task], self.merge(replies, name, threshold, None))
            else:  # protect task t: add its new directions to the old subspace
                old = g[old_key]
                old_used = old[:, np.abs(old).sum(0) > 0]
                new = self.merge(replies, name, threshold, old_used if old_used.shape[1] else None)
                pad_into(old, np.concatenate([old_used, new], axis=1))
        return g

    def merge(self, replies, name, threshold, old):
        if self.basis_aggregation == "covariance":
            return merge_covariance([r[f"cov.{name}"] for r, _ in replies], threshold, old)
        return merge_svd([(r[f"U.{name}"], r[f"s.{name}"]) for r, _ in replies], threshold, old)

    def aggregate_adapters(self, g, replies, task):
        weights = [n for _, n in replies]
        layer_names = {k.rsplit(".", 2)[0] for k in replies[0][0] if ".orth_A." in k}
        for name in layer_names:
            a_key, b_key = f"{name}.orth_A.{task}", f"{name}.orth_B.{task}"
            a, b = aggregate_lora([(r[a_key], r[b_key]) for r, _ in replies], weights, self.lora_aggregation)
            old = g[f"{name}.old_basis"]
            g[a_key], g[b_key] = a - (a @ old) @ old.T, b  # stored projected: exact protection
            for part in ("res_C", "res_B"):
                key = f"{name}.{part}.{task}"
                g[key] = weighted_mean([({key: r[key]}, n) for r, n in replies])[key]
        rows = weighted_mean([({k: r[k] for k in ("head_rows.weight", "head_rows.bias")}, n) for r, n in replies])
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
            factors[module] = [(layer.orth_A[i].detach().clone(), layer.orth_B[i].detach().clone())
                               for i in range(self.first, last + 1)]
        backbone = {k.removeprefix("features.").replace(".base.", "."): v
                    for k, v in model.state_dict().items() if self.is_backbone(k) and k.startswith("features.")}
        export_peft(folder, factors, self.rank, self.alpha, backbone)

    # ---- inference: dynamic memory ------------------------------------------------------
    def key_representation(self, model: nn.Module, x: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        """What task keys describe: the input image (the representation entering the patch
        embedding) or the backbone's final feature."""
        if self.task_key == "input":
            return x.flatten(1)
        return feats if feats is not None else model.features(x)

    @torch.no_grad()
    def task_confidence(self, model: nn.Module, x: torch.Tensor, seen_tasks: int) -> torch.Tensor:
        self.set_mode(model, seen_tasks - 1, None, project_current=False)
        f = self.key_representation(model, x)
        keys = model.task_keys[:seen_tasks]                       # (T, d, m) zero-padded bases
        explained = torch.einsum("nd,tdm->ntm", f, keys).pow(2).sum(-1) / f.pow(2).sum(-1, keepdim=True)
        return torch.softmax(explained / self.temperature, dim=1)

    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor, seen_classes: int, batch_size: int = 512) -> torch.Tensor:
        model.eval()
        seen_tasks = self.starts.index(seen_classes)
        preds = []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            conf = self.task_confidence(model, xb, seen_tasks)
            weights = torch.zeros(len(xb), self.num_tasks)
            weights[:, :seen_tasks] = conf
            self.set_mode(model, seen_tasks - 1, weights, project_current=False)
            logits = model(xb)
            log_conf = torch.log(conf.clamp_min(1e-12))
            scores = torch.cat([F.log_softmax(logits[:, self.starts[t]:self.starts[t + 1]], dim=-1)
                                + log_conf[:, t:t + 1] for t in range(seen_tasks)], dim=1)
            preds.append(scores.argmax(1))
        self.set_mode(model, seen_tasks - 1, None)
        return torch.cat(preds)


def is_basis(key: str) -> bool:
    return key == "task_keys" or key.endswith((".old_basis", ".task_bases"))


def trim_basis(bases: np.ndarray) -> np.ndarray:
    """Drop the all-zero padding columns (last axis) that no basis uses yet."""
    used = np.flatnonzero(np.abs(bases).reshape(-1, bases.shape[-1]).sum(0) > 0)
    return bases[..., : (used[-1] + 1 if len(used) else 0)]


def pad_into(target: np.ndarray, basis: np.ndarray) -> None:
    """Write a (d x m) basis into a zero-padded (d x d) slot."""
    target[:] = 0
    m = min(basis.shape[1], target.shape[1])
    target[:, :m] = basis[:, :m]
