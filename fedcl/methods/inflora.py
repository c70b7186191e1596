"""InfLoRA in the federation (Liang & Li, CVPR 2024, "Interference-Free Low-Rank Adaptation for
Continual Learning"), built from the paper and its public code's description.

Every adapted layer (a ViT block's qkv projection) gets one LoRA branch ``B_t A_t`` per task. A_t,
the down-projection, is designed before task t trains and then frozen; only B_t (and task t's head
rows) train. Per task t after the base session:

1. ``basis_start``: clients send the statistics of their task-t inputs to every adapted layer (a
   basis scaled by its singular values, or the covariance: ``strategy.basis_aggregation``); the
   server projects them off the protected subspace M of earlier tasks and takes the top ``rank``
   eigenvectors of the projected covariance as A_t's rows. A_t is the same on every client.
2. ``train`` rounds: clients train B_t and task t's head rows with cross-entropy over task t's
   classes; the server averages B_t and the rows. A_t is shared and frozen, so the mean of B_t
   gives exactly the mean of the clients' updates B_k A_t (FFA-LoRA's argument).
3. ``basis_end``: clients send statistics of their task-t inputs under the trained model; the
   server adds task t's new directions to M, kept to an energy threshold (GPM / DualGPM). With
   ``classifier_alignment`` (the authors' InfLoRA-CA) clients also send per-class feature means
   and second moments, and the server retrains every seen head row on features sampled from
   those class Gaussians (``align_classifier``).

Since A_t's rows are orthogonal to M, an input of an earlier task (inside M) passes every later
branch untouched: later tasks do not interfere with earlier ones. Inference: all branches on,
argmax over all seen classes (no task id).

Base session: without ``model.checkpoint`` task 0 trains the whole backbone with FedAvg and its
last round (``basis_end``) goes to every client, which keeps the final backbone in its state, as
DualLoRA does; from then on no backbone array crosses the wire.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcl.aggregation.subspace import BASIS_AGGREGATIONS, InputStatistics, merge_covariance, merge_svd, project_out
from fedcl.errors import ConfigError
from fedcl.methods.base import RELEASE, ClientRound, Method, fit, weighted_mean
from fedcl.methods.duallora import head_of_rows, hold_base_session_backbone, pad_into, sent_role
from fedcl.models.lora import check_rank, inject_lora
from fedcl.seeding import derive_seed

SERVER_ONLY = ("class_mean", "class_cov")  # classifier alignment's statistics: never sent down


class InfLoRALinear(nn.Module):
    """A frozen base layer plus one branch ``scaling * B_t A_t`` per task, all always on.

    A (buffer: never trained) is zero until the server designs it; B starts at zero, so a branch
    acts only once its task has trained. ``old_basis`` (zero-padded columns) is the protected
    subspace M; only the server uses it."""

    def __init__(self, base: nn.Linear, num_tasks: int, r: int, alpha: float):
        super().__init__()
        d_in, d_out = check_rank(base, r)
        self.base = base
        self.r, self.scaling = int(r), float(alpha) / int(r)
        self.register_buffer("lora_A", torch.zeros(num_tasks, r, d_in))
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(d_out, r)) for _ in range(num_tasks))
        self.register_buffer("old_basis", torch.zeros(d_in, d_in))
        self.capture: InputStatistics | None = None  # sums the inputs' x^T x for the subspace statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.capture is not None:
            self.capture.append(x.detach().reshape(-1, x.shape[-1]))
        a = self.lora_A.flatten(0, 1)                      # (T * r, d_in)
        b = torch.cat(list(self.lora_B), dim=1)            # (d_out, T * r)
        return self.base(x) + (x @ a.T) @ b.T * self.scaling


class InfLoRA(Method):
    def __init__(self, name: str = "inflora", rank: int = 4, alpha: float = 4.0,
                 targets: list[str] | str = "attn.qkv", threshold: float = 0.999,
                 threshold_end: float | None = None, max_client_basis: int = 32,
                 base_lr: float | None = None, base_epochs: int | None = None,
                 adapter_lr: float | None = 0.005, loss_over: str = "task",
                 classifier_alignment: bool = True, ca_epochs: int = 20, ca_samples: int = 256, ca_lr: float = 0.01):
        super().__init__(name)
        self.classifier_alignment = bool(classifier_alignment)
        self.ca_epochs, self.ca_samples, self.ca_lr = int(ca_epochs), int(ca_samples), float(ca_lr)
        self.loss_over = loss_over
        self.rank, self.alpha, self.targets = int(rank), float(alpha), targets
        self.threshold = float(threshold)
        self.threshold_end = None if threshold_end is None else float(threshold_end)
        self.max_client_basis = int(max_client_basis)
        self.base_lr = base_lr
        self.base_epochs = None if base_epochs is None else int(base_epochs)
        self.adapter_lr = adapter_lr

    # ---- shape of the run ----------------------------------------------------------------
    def bind(self, num_tasks: int, task_starts: list[int], cfg) -> None:
        # checked here, not in __init__: Hydra would wrap a ConfigError raised while instantiating
        for key, value in (("threshold", self.threshold), ("threshold_end", self.threshold_end)):
            if value is not None and not 0.0 < value <= 1.0:
                raise ConfigError(f"method.{key}={value} is an energy fraction: choose a value in (0, 1].")
        if self.loss_over not in ("task", "seen"):
            raise ConfigError(f"method.loss_over={self.loss_over!r}: choose 'task' (the paper's: the current "
                              "task's classes) or 'seen' (every class seen so far, earlier rows frozen).")
        if cfg.model.name not in ("vit", "timm"):
            raise ConfigError(f"method=inflora adapts a ViT's attention; set model=vit, or model=timm with a ViT "
                              f"model.arch (not model={cfg.model.name}).")
        self.num_tasks, self.starts = num_tasks, list(task_starts)
        self.basis_aggregation = str(cfg.strategy.basis_aggregation)
        if self.basis_aggregation not in BASIS_AGGREGATIONS:
            raise ConfigError(f"strategy.basis_aggregation={self.basis_aggregation!r} is unknown. "
                              f"Choose one of {list(BASIS_AGGREGATIONS)}.")
        pretrained = cfg.model.get("checkpoint", None) or cfg.model.get("pretrained", False)
        self.first = 0 if pretrained else 1  # without weights, task 0 is the base session
        self.base_session_tasks = self.first
        self.seed = int(cfg.seed)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        names = inject_lora(model.features, self.targets, r=self.rank, alpha=self.alpha)
        for name in names:  # swap the plain LoRA layer for the per-task one, on the same frozen base
            parent_name, _, child = name.rpartition(".")
            parent = model.features.get_submodule(parent_name)
            setattr(parent, child, InfLoRALinear(getattr(parent, child).base, self.num_tasks, self.rank, self.alpha))
        model.requires_grad_(True)
        return model

    def init_global(self, model: nn.Module) -> dict[str, np.ndarray]:
        """The model's arrays, plus (classifier alignment) per-class feature means and covariances:
        server-side state, not model buffers, so that no client model carries C x d x d floats."""
        g = super().init_global(model)
        if self.classifier_alignment:
            c, d = model.head.out_features, model.head.in_features
            g["class_mean"], g["class_cov"] = np.zeros((c, d), np.float32), np.zeros((c, d, d), np.float32)
        return g

    def load_payload(self, model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
        super().load_payload(model, {k: v for k, v in arrays.items() if k not in SERVER_ONLY})

    def layers(self, model: nn.Module) -> dict[str, InfLoRALinear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, InfLoRALinear)}

    def threshold_at(self, task: int) -> float:
        """Energy kept in M after ``task``: InfLoRA raises it linearly from ``threshold`` towards
        ``threshold_end`` over the tasks (constant when ``threshold_end`` is null)."""
        if self.threshold_end is None:
            return self.threshold
        return self.threshold + (self.threshold_end - self.threshold) * task / self.num_tasks

    @staticmethod
    def is_backbone(key: str) -> bool:
        return (not key.startswith("head.") and not key.endswith((".lora_A", ".old_basis")) and ".lora_B." not in key
                and key not in SERVER_ONLY)

    # ---- client side ---------------------------------------------------------------------
    def client_update(self, model: nn.Module, ctx: ClientRound, state: dict) -> int:
        hold_base_session_backbone(self, model, ctx, state)
        rows = ctx.task_rows(ctx.task)
        if not len(rows) or ctx.phase.startswith("basis"):
            return len(rows)
        if ctx.task < self.first:  # base session: the whole backbone and head, FedAvg
            for name, p in model.named_parameters():
                p.requires_grad_(".lora_B." not in name)
            ctx.lr = float(self.base_lr) if self.base_lr else ctx.lr
            ctx.local_epochs = self.base_epochs or ctx.local_epochs
            fit(model, rows, ctx, lambda x, logits: None, self.starts[ctx.task])
            return len(rows)
        trainable = {f"{name}.lora_B.{ctx.task}" for name in self.layers(model)}  # B_t and task t's head rows
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable or name.startswith("head."))
        rows_mask = torch.zeros_like(model.head.weight[:, :1])
        rows_mask[self.starts[ctx.task]:self.starts[ctx.task + 1]] = 1
        hooks = [model.head.weight.register_hook(lambda g: g * rows_mask),
                 model.head.bias.register_hook(lambda g: g * rows_mask[:, 0])]
        ctx.lr = float(self.adapter_lr) if self.adapter_lr else ctx.lr
        fit(model, rows, ctx, lambda x, logits: None, 0 if self.loss_over == "seen" else self.starts[ctx.task])
        for h in hooks:
            h.remove()
        return len(rows)

    def payload(self, model: nn.Module, ctx: ClientRound | None = None) -> dict[str, torch.Tensor]:
        if ctx.phase.startswith("basis"):
            return self.client_statistics(model, ctx)
        if ctx.task < self.first:  # base session: backbone and head
            return {k: v for k, v in model.state_dict().items() if self.is_backbone(k) or k.startswith("head.")}
        s, e = self.starts[ctx.task], self.starts[ctx.task + 1]
        out = {f"{name}.lora_B.{ctx.task}": layer.lora_B[ctx.task].detach()
               for name, layer in self.layers(model).items()}
        out["head_rows.weight"] = model.head.weight.detach()[s:e]
        out["head_rows.bias"] = model.head.bias.detach()[s:e]
        return out

    @torch.no_grad()
    def client_statistics(self, model: nn.Module, ctx: ClientRound) -> dict[str, torch.Tensor]:
        """This client's task-t inputs to every adapted layer, as a covariance or a scaled basis."""
        rows = ctx.task_rows(ctx.task)
        if not len(rows):  # a client without data of this task has nothing to send
            return {}
        layers = self.layers(model)
        for layer in layers.values():  # each layer sums its inputs' x^T x as batches pass
            layer.capture = InputStatistics()
        model.eval()
        feats = torch.cat([model.features(ctx.images(rows[i:i + 256])) for i in range(0, len(rows), 256)])
        out = self.class_statistics(feats, ctx.labels(rows), ctx.task) if (
            ctx.phase == "basis_end" and self.classifier_alignment) else {}
        for name, layer in layers.items():
            stat, layer.capture = layer.capture, None
            if self.basis_aggregation == "covariance":
                out[f"cov.{name}"] = torch.from_numpy(stat.covariance())
            else:  # float16 on the wire as DualLoRA's bases: the server works in float64
                u, s = stat.basis(self.threshold_at(ctx.task))
                out[f"U.{name}"] = torch.from_numpy(u[:, :self.max_client_basis].astype(np.float16))
                out[f"s.{name}"] = torch.from_numpy(s[:self.max_client_basis].astype(np.float32))
        return out

    def class_statistics(self, feats: torch.Tensor, labels: torch.Tensor, task: int) -> dict[str, torch.Tensor]:
        """Per class of the task: count, feature mean and second moment (means, not sums: the
        server weighs them by the counts)."""
        s, e = self.starts[task], self.starts[task + 1]
        f = feats.double().cpu()
        d = f.shape[1]
        count, mean, second = torch.zeros(e - s), torch.zeros(e - s, d), torch.zeros(e - s, d, d)
        for i, c in enumerate(range(s, e)):
            fc = f[labels.cpu() == c]
            if len(fc):
                count[i], mean[i], second[i] = len(fc), fc.mean(0), fc.T @ fc / len(fc)
        return {"ca.count": count, "ca.mean": mean, "ca.second": second}

    # ---- server side ---------------------------------------------------------------------
    def phases(self, task: int, rounds: int) -> list[str]:
        return (["basis_start"] if task >= self.first else []) + ["train"] * rounds + ["basis_end"]

    def array_role(self, key: str) -> str:
        return RELEASE if key.startswith("ca.") else sent_role(key)  # ca.*: class statistics (alignment)

    def counterpart(self, key: str) -> str:
        return head_of_rows(key)

    def samples_everyone(self, task: int, phase: str) -> bool:
        return task < self.first and phase == "basis_end"  # every client gets the final backbone

    def downlink(self, global_arrays, task, phase, client):
        """Never M (only the server designs A_t from it); after the base session, no backbone."""
        return {k: v for k, v in global_arrays.items()
                if not k.endswith(".old_basis") and k not in SERVER_ONLY
                and (task < self.first or not self.is_backbone(k))}

    def aggregate(self, global_arrays, replies, task, phase, rule=None):
        """New arrays for what changed (global arrays are read-only); ``rule`` (median, trimmed
        mean, ...) replaces FedAvg's mean of the trained arrays where the server gives one."""
        g = dict(global_arrays)
        mean = weighted_mean if rule is None else (lambda r: weighted_mean(r, rule))
        if phase == "train" and task < self.first:
            return {**g, **mean(replies)}
        if phase == "train":  # A_t is shared: averaging B_t is the exact mean update
            rows = mean(replies)
            s, e = self.starts[task], self.starts[task + 1]
            for part in ("weight", "bias"):
                g[f"head.{part}"] = g[f"head.{part}"].copy()
                g[f"head.{part}"][s:e] = rows.pop(f"head_rows.{part}")
            return {**g, **rows}
        for name in sorted({k.split(".", 1)[1] for k in replies[0][0] if k.startswith(("U.", "cov."))}):
            old = g[f"{name}.old_basis"].copy()
            old_used = old[:, np.abs(old).sum(0) > 0]
            if phase == "basis_start":
                a = g[f"{name}.lora_A"].copy()
                a[task] = self.design_A(replies, name, old_used)
                g[f"{name}.lora_A"] = a
            else:  # protect task t: add its new directions to M
                new = self.merge(replies, name, self.threshold_at(task), old_used if old_used.shape[1] else None)
                pad_into(old, np.concatenate([old_used, new], axis=1))
                g[f"{name}.old_basis"] = old
        if phase == "basis_end" and "ca.count" in replies[0][0]:
            self.merge_class_statistics(g, replies, task)
            if task >= 1:
                self.align_classifier(g, task)
        return g

    def merge_class_statistics(self, g, replies, task) -> None:
        """Task t's class means and covariances over all clients, weighted by class counts."""
        s, e = self.starts[task], self.starts[task + 1]
        counts = np.stack([r["ca.count"] for r, _ in replies]).astype(np.float64)        # (K, c)
        w = counts / np.maximum(counts.sum(0, keepdims=True), 1.0)
        mean = np.einsum("kc,kcd->cd", w, np.stack([r["ca.mean"] for r, _ in replies]).astype(np.float64))
        second = np.einsum("kc,kcde->cde", w, np.stack([r["ca.second"] for r, _ in replies]).astype(np.float64))
        cov = second - mean[:, :, None] * mean[:, None, :]
        for key, value in (("class_mean", mean), ("class_cov", cov)):
            g[key] = g[key].copy()
            g[key][s:e] = value

    def align_classifier(self, g, task) -> None:
        """InfLoRA-CA / SLCA's classifier alignment on the server: retrain every seen head row on
        features sampled from each class's Gaussian, so that rows of different tasks, each trained
        only against its own task's classes, become comparable."""
        end = self.starts[task + 1]
        gen = torch.Generator().manual_seed(derive_seed(self.seed, task, 71))
        mean = torch.from_numpy(g["class_mean"][:end]).double()
        cov = torch.from_numpy(g["class_cov"][:end]).double()
        vals, vecs = torch.linalg.eigh((cov + cov.transpose(1, 2)) / 2)
        root = vecs * vals.clamp_min(0.0).add(1e-4).sqrt()[:, None, :]          # root @ root^T = cov + 1e-4 I
        head = nn.Linear(mean.shape[1], end).double()
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(g["head.weight"][:end]))
            head.bias.copy_(torch.from_numpy(g["head.bias"][:end]))
        opt = torch.optim.SGD(head.parameters(), lr=self.ca_lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.ca_epochs)
        n = self.ca_samples
        for _ in range(self.ca_epochs):
            z = torch.randn(end, n, mean.shape[1], generator=gen, dtype=torch.float64)
            x = (mean[:, None, :] + z @ root.transpose(1, 2)).reshape(-1, mean.shape[1])
            y = torch.arange(end).repeat_interleave(n)
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), n):
                batch = order[i:i + n]
                loss = F.cross_entropy(head(x[batch]), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        for part in ("weight", "bias"):
            g[f"head.{part}"] = g[f"head.{part}"].copy()
            g[f"head.{part}"][:end] = getattr(head, part).detach().numpy()

    def merge(self, replies, name, threshold, old):
        if self.basis_aggregation == "covariance":
            return merge_covariance([r[f"cov.{name}"] for r, _ in replies], threshold, old)
        return merge_svd([(r[f"U.{name}"], r[f"s.{name}"]) for r, _ in replies], threshold, old)

    def design_A(self, replies, name, old: np.ndarray) -> np.ndarray:
        """A_t (rank x d_in): the top eigenvectors of task t's input covariance projected off M.
        Directions with (numerically) no energy left stay zero rows: a branch with fewer live
        directions rather than one that would act on M."""
        if self.basis_aggregation == "covariance":
            vals, vecs = np.linalg.eigh(np.sum([np.asarray(r[f"cov.{name}"], np.float64) for r, _ in replies], 0))
            R = vecs * np.sqrt(np.clip(vals, 0.0, None))[None]          # R R^T = the summed covariance
        else:
            R = np.concatenate([np.asarray(r[f"U.{name}"], np.float64) * np.asarray(r[f"s.{name}"], np.float64)
                                for r, _ in replies], axis=1)
        u, s, _ = np.linalg.svd(project_out(R, old), full_matrices=False)
        live = s[:self.rank] ** 2 > 1e-9 * max(float((R ** 2).sum()), 1e-300)
        u = u[:, :self.rank][:, live]
        if old.shape[1]:  # exact protection whatever the SVD's rounding
            u = u - old @ (old.T @ u)
        a = np.zeros((self.rank, R.shape[0]), dtype=np.float32)
        a[:u.shape[1]] = u.T
        return a

    def parameter_counts(self, model: nn.Module) -> dict:
        """Trained per task: B_t; designed and frozen: A_t (both count as added)."""
        added = sum(layer.lora_A.numel() + sum(b.numel() for b in layer.lora_B)
                    for layer in self.layers(model).values())
        backbone = sum(v.numel() for k, v in model.state_dict().items() if self.is_backbone(k))
        return {"backbone": int(backbone), "added": int(added), "added_fraction": added / max(backbone, 1)}
