"""Learning without Forgetting with FedAvg: distil old-class logits from the previous task's model.

The teacher is the global model as it stood when the current task began. A client sampled in
the first round of a task receives exactly that model; a client first sampled later uses the
last global model it received during an earlier task (the freshest old-task model it has seen).
With ``fraction_train=1`` both are the same.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from fedcl.methods.base import ClientRound, Method


class LwF(Method):
    def __init__(self, name: str = "lwf", kd_weight: float = 1.0, temperature: float = 2.0):
        super().__init__(name)
        self.kd_weight = float(kd_weight)
        self.temperature = float(temperature)
        self._teacher: nn.Module | None = None

    def begin_round(self, model: nn.Module, ctx: ClientRound, state: dict) -> None:
        if ctx.task > 0 and state.get("teacher_task") != ctx.task:
            if ctx.round == 0 or "last_global" not in state:
                state["teacher"] = copy.deepcopy(model.state_dict())
            else:
                state["teacher"] = state["last_global"]
            state["teacher_task"] = ctx.task
        state["last_global"] = copy.deepcopy(model.state_dict())
        self._teacher = None
        if ctx.task > 0:
            self._teacher = copy.deepcopy(model)
            self._teacher.load_state_dict(state["teacher"])
            self._teacher.eval().requires_grad_(False)

    def extra_loss(self, model, x, logits, ctx: ClientRound, state: dict):
        if self._teacher is None:
            return None
        old = ctx.first_class
        with torch.no_grad():
            target = self._teacher(x)[:, :old]
        t = self.temperature
        kd = F.kl_div(F.log_softmax(logits[:, :old] / t, 1), F.softmax(target / t, 1),
                      reduction="batchmean") * t * t
        return self.kd_weight * kd
