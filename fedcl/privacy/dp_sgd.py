"""Record-level DP-SGD inside a client with Opacus (``privacy.local_dp_sgd=true``).

The client's local training becomes DP-SGD on its trainable parameters: Poisson-sampled batches
(each of the round's n rows joins a step with rate q = batch_size / n), per-sample gradients from
Opacus' ``GradSampleModule``, clipped to ``dp_sgd.max_grad_norm`` and noised by Opacus'
``DPOptimizer``. Steps per round: local_epochs * ceil(n / batch_size). The client's record-level
accountant (Opacus, the run's ``privacy.accountant``) composes every step over rounds and tasks
in its state (conservatively: records of different tasks are disjoint, parallel composition
would allow less); with ``dp_sgd.target_epsilon`` a client that cannot afford a round's steps
does not train.

Supported: methods that train through ``fedcl.methods.base.fit``. Per-sample gradients come from
Opacus' hooks where they reach every trainable parameter (Linear, Conv2d, GroupNorm, LayerNorm,
... and the Linear/Conv2d-based ``LoRALayer``), else from torch.func (vmap over grad of the
per-sample loss): DualLoRA's adapters live in ParameterLists that Opacus' hooks never see. Either
way Opacus' ``DPOptimizer`` clips, sums and noises them, and Opacus' accountant counts the steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedcl.errors import ConfigError
from fedcl.privacy.accounting import epsilon_of


@dataclass(frozen=True)
class DPSGD:
    noise_multiplier: float
    max_grad_norm: float
    target_epsilon: float | None
    delta: float
    accountant: str


def round_plan(num_rows: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sample rate, steps) of one round of DP-SGD on ``num_rows`` rows."""
    if num_rows <= 0:
        return 0.0, 0
    return min(1.0, batch_size / num_rows), local_epochs * max(1, math.ceil(num_rows / batch_size))


def affordable(dp: DPSGD, history: list, num_rows: int, batch_size: int, local_epochs: int) -> bool:
    if dp.target_epsilon is None:
        return True
    q, steps = round_plan(num_rows, batch_size, local_epochs)
    return epsilon_of([*history, (dp.noise_multiplier, q, steps)], dp.delta, dp.accountant) <= dp.target_epsilon


def check_supported(method) -> None:
    """DP-SGD needs the method to train through ``fit`` (``Method.supports_dp_sgd``)."""
    if not method.supports_dp_sgd:
        raise ConfigError(f"privacy.local_dp_sgd=true does not support method={method.name}: it does not "
                          "train through one per-sample loss that Opacus' DP-SGD can clip. Use client-level "
                          "DP (privacy=client_dp) for it.")


def hooks_cover(model: torch.nn.Module) -> bool:
    """True when Opacus' hooks can give every trainable parameter its per-sample gradient. DualLoRA
    keeps its adapters in ParameterLists (no forward of their own), and its ViT keeps raw
    parameters (class token, positions) in the model itself: torch.func does those models."""
    return not any(isinstance(m, torch.nn.ParameterList) for m in model.modules())


def functorch_grad_samples(model, params: dict[str, torch.nn.Parameter], x, y, first_class: int,
                           seen_classes: int) -> None:
    """Per-sample gradients of the cross-entropy with torch.func (vmap over grad), stored as
    ``p.grad_sample`` for Opacus' ``DPOptimizer`` to clip, sum and noise as it does its own."""
    from torch.func import functional_call, grad, vmap

    buffers = dict(model.named_buffers())

    def loss_one(p, xi, yi):
        logits = functional_call(model, {**p, **buffers}, (xi.unsqueeze(0),))[:, first_class:seen_classes]
        return F.cross_entropy(logits, yi.unsqueeze(0) - first_class)

    detached = {n: q.detach() for n, q in params.items()}
    grads = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")(detached, x, y)
    for n, q in params.items():
        q.grad_sample = grads[n]


def dp_fit(model: torch.nn.Module, rows: np.ndarray, ctx, extra_loss, first_class: int = 0) -> tuple[float, int]:
    """``fit`` as DP-SGD (see the module docstring); returns (sample rate, steps) taken."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from fedcl.methods.base import local_optimizer

    dp: DPSGD = ctx.dp_sgd
    q, steps = round_plan(len(rows), ctx.batch_size, ctx.local_epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    if not affordable(dp, getattr(ctx, "dp_sgd_history", []), len(rows), ctx.batch_size, ctx.local_epochs):
        ctx.dp_sgd_taken = (q, 0, True)  # record-level budget spent: no training
        return q, 0
    if not steps or not params:
        ctx.dp_sgd_taken = (q, 0, False)
        return q, 0
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    hooks = hooks_cover(model)
    gsm = GradSampleModule(model) if hooks else model
    base = local_optimizer(params, ctx)
    opt = DPOptimizer(base, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                      expected_batch_size=max(1, int(round(q * len(rows)))))
    model.train()
    try:
        for _ in range(steps):
            picked = (torch.rand(len(rows), generator=ctx.generator) < q).numpy()  # Poisson sampling
            batch = rows[picked]
            opt.zero_grad(set_to_none=True)
            if len(batch) and not hooks:  # per-sample gradients with torch.func (DualLoRA)
                x, y = (ctx.train_images or ctx.images)(batch), ctx.labels(batch)
                with torch.no_grad():
                    if extra_loss(x, model(x)[:, first_class:ctx.seen_classes]) is not None:
                        raise ConfigError("privacy.local_dp_sgd: this method adds a loss term that the "
                                          "per-sample (torch.func) DP-SGD path does not cover.")
                functorch_grad_samples(model, named, x, y, first_class, ctx.seen_classes)
            elif len(batch):
                x, y = (ctx.train_images or ctx.images)(batch), ctx.labels(batch)
                logits = gsm(x)[:, first_class:ctx.seen_classes]
                loss = F.cross_entropy(logits, y - first_class)
                extra = extra_loss(x, logits)
                if extra is not None:
                    loss = loss + extra
                loss.backward()
            else:  # an empty Poisson batch is still a step: noise only, as Opacus' own loader does
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            opt.step()
    finally:
        if hooks:
            gsm._close()
    ctx.dp_sgd_taken = (q, steps, False)
    return q, steps
