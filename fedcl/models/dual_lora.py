"""DualLoRA's adapted linear layer: a frozen base, orthogonal adapters, residual adapters.

Per task i (one slot each, allocated up front):
- orthogonal adapter ``B_i A_i``: while task i trains, A_i is used as A_i (I - U_old U_old^T), so
  for any input in the span of earlier tasks' bases ``U_old`` the branch outputs exactly 0,
  whatever B_i is. After the task the server stores A_i already projected; all past orthogonal
  branches stay on (they carry shared knowledge and cannot disturb the tasks before them).
- residual adapter ``B'_i C_i U_i^T``: its input map lives in the span of task i's own basis U_i;
  it is task-specific and weighted per sample by the dynamic memory (``residual_weights``).

Layout of each branch follows PEFT: A/C map to rank r, B maps r to the output, scale alpha / r.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fedcl.models.lora import check_rank


class DualLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, num_tasks: int, r: int, alpha: float):
        super().__init__()
        d_in, d_out = check_rank(base, r)
        self.base = base
        self.r, self.scaling = int(r), float(alpha) / int(r)
        self.orth_A = nn.ParameterList(nn.Parameter(torch.empty(r, d_in)) for _ in range(num_tasks))
        self.orth_B = nn.ParameterList(nn.Parameter(torch.zeros(d_out, r)) for _ in range(num_tasks))
        self.res_C = nn.ParameterList(nn.Parameter(torch.empty(r, d_in)) for _ in range(num_tasks))
        self.res_B = nn.ParameterList(nn.Parameter(torch.zeros(d_out, r)) for _ in range(num_tasks))
        for p in [*self.orth_A, *self.res_C]:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        # bases, zero-padded to d_in columns: zero columns add nothing to a projection
        self.register_buffer("old_basis", torch.zeros(d_in, d_in))
        self.register_buffer("task_bases", torch.zeros(num_tasks, d_in, d_in))
        self.task = 0                                   # the task being trained / last trained
        self.first_adapter_task = 0                     # tasks before it have no adapters
        self.use_orthogonal = True
        self.use_residual = True
        self.project_current = True                     # training: keep the current A off U_old
        # None: residual branches off; "current": only the current task's, weight 1 (training);
        # an (N, num_tasks) tensor: per-sample weights from the dynamic memory (inference)
        self.residual_weights: torch.Tensor | str | None = None
        self.capture: list[torch.Tensor] | None = None     # inputs recorded for bases

    def projected_A(self, i: int) -> torch.Tensor:
        a = self.orth_A[i]
        # The current task's update must stay outside the old subspace while it trains. At
        # inference every stored A is already projected (the server does it), and U_old may by
        # then hold the current task's own inputs, so projecting again would cut its own branch.
        if i == self.task and self.project_current:
            a = a - (a @ self.old_basis) @ self.old_basis.T
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.capture is not None:
            self.capture.append(x.detach().reshape(-1, x.shape[-1]))
        out = self.base(x)
        tasks = range(self.first_adapter_task, self.task + 1)
        if self.use_orthogonal:
            for i in tasks:
                out = out + (x @ self.projected_A(i).T) @ self.orth_B[i].T * self.scaling
        w = self.residual_weights
        if self.use_residual and w is not None:
            for i in ([self.task] if isinstance(w, str) else tasks):
                if i < self.first_adapter_task or (not isinstance(w, str) and bool((w[:, i] == 0).all())):
                    continue
                # C_i acts on the coordinates of x in task i's basis: A = C_i U_i^T
                branch = ((x @ self.task_bases[i]) @ self.res_C[i].T) @ self.res_B[i].T * self.scaling
                if not isinstance(w, str):
                    branch = branch * w[:, i].view(-1, *([1] * (x.dim() - 1)))
                out = out + branch
        return out
