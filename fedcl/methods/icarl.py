"""A distillation base: experience replay plus iCaRL's logit distillation, as PyCIL trains iCaRL.

Every local step is an ER step (``Replay``: a batch of the current task paired with an equally
sized memory batch) whose loss adds, on the old classes' logits of every row in it, the
distillation term of PyCIL's iCaRL: soft-target cross-entropy at temperature T (x T^2) against the
model as it stood when the current task began (``LwF``'s teacher). Differences from the paper's
iCaRL, all stated: exemplars are a reservoir sample, not herding, and prediction is the network's
classifier over all seen classes (PyCIL's "CNN" accuracy), not nearest-mean-of-exemplars.
"""
from __future__ import annotations

import torch
from torch import nn

from fedcl.methods.base import ClientRound
from fedcl.methods.lwf import LwF
from fedcl.methods.replay import Replay


class ICaRL(Replay):
    def __init__(self, name: str = "icarl", memory_total: int = 2000, kd_weight: float = 1.0,
                 temperature: float = 2.0):
        super().__init__(name, memory_total)
        self.distill = LwF(kd_weight=kd_weight, temperature=temperature)

    def begin_round(self, model: nn.Module, ctx: ClientRound, state: dict) -> None:
        self.distill.begin_round(model, ctx, state)

    def extra_loss(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor,
                   ctx: ClientRound, state: dict) -> torch.Tensor | None:
        return self.distill.extra_loss(model, x, logits, ctx, state)
