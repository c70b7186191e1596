"""DualLoRA's adapted linear layer: a frozen base, orthogonal adapters, residual adapters.

Per task i (one slot each, allocated up front):
- orthogonal adapter ``B_i A_i``: while task i trains, A_i is used as A_i (I - U_old U_old^T), so
  for any input in the span of earlier tasks' bases ``U_old`` the branch outputs exactly 0,
  whatever B_i is. After the task the server stores A_i already projected; all past orthogonal
  branches stay on (they carry shared knowledge and cannot disturb the tasks before them).
- residual adapter ``B'_i C_i U_i^T``: its input map lives in the span of task i's own basis U_i;
  it is task-specific and weighted per sample by the dynamic memory (``residual_weights``).

Bases are stored at the width they use: ``old_basis`` is d_in x k (k grows task by task) and task
i's basis ``task_bases.<i>`` is d_in x m_i; both start without columns and are replaced, not
written into, when wider ones arrive (``DualLoRA.load_payload``). C_i is allocated r x d_in up front
so that the parameter keeps one shape all run; only its first m_i columns act (the coordinates of x
in U_i's m_i directions), the others get no gradient.

Cost: the residual input map C_i U_i^T (r x d_in) is formed once per change of U_i or C_i at
inference (cached) and per forward while C_i trains (r x m_i x d_in, cheap); all branches of a
forward are concatenated into one rank-(n r) pair, so n tasks cost two skinny products, not 2n.

Layout of each branch follows PEFT: A/C map to rank r, B maps r to the output, scale alpha / r.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from fedcl.models.lora import check_rank


class TaskBases(nn.Module):
    """One basis per task, each at its own width: buffers ``"0"``, ``"1"``, ... (state keys
    ``<owner>.<i>``), d x 0 until the task's basis arrives."""

    def __init__(self, num_tasks: int, dim: int):
        super().__init__()
        for i in range(num_tasks):
            self.register_buffer(str(i), torch.zeros(dim, 0))

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._buffers[str(i)]

    def __len__(self) -> int:
        return len(self._buffers)


class DualLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, num_tasks: int, r: int, alpha: float,
                 out_mask: torch.Tensor | None = None):
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
        self.register_buffer("old_basis", torch.zeros(d_in, 0))
        self.task_bases = TaskBases(num_tasks, d_in)
        # output rows the adapters may change (qkv_parts=qv: not k's); a constant, not state
        self.register_buffer("out_mask", out_mask, persistent=False)
        self.task = 0                                   # the task being trained / last trained
        self.first_adapter_task = 0                     # tasks before it have no adapters
        self.use_orthogonal = True
        self.use_residual = True
        self.project_current = True                     # training: keep the current A off U_old
        # None: residual branches off; "current": only the current task's, weight 1 (training);
        # an (N, num_tasks) tensor: per-sample weights from the dynamic memory (inference)
        self.residual_weights: torch.Tensor | str | None = None
        self.capture = None  # fedcl.subspace.InputStatistics while a basis round sums x^T x
        self.bypass = False                             # the bare base layer (see ``bare``)
        self._residual_cache: dict[int, tuple] = {}

    def projected_A(self, i: int) -> torch.Tensor:
        a = self.orth_A[i]
        # The current task's update must stay outside the old subspace while it trains. At
        # inference every stored A is already projected (the server does it), and U_old may by
        # then hold the current task's own inputs, so projecting again would cut its own branch.
        if i == self.task and self.project_current and self.old_basis.shape[1]:
            a = a - (a @ self.old_basis) @ self.old_basis.T
        return a

    def residual_A(self, i: int) -> torch.Tensor:
        """C_i U_i^T (r x d_in): the residual branch's input map, so the branch is one d_in x r
        product instead of x U_i (d_in x m_i) then C_i."""
        u, c = self.task_bases[i], self.res_C[i]
        if self.training or torch.is_grad_enabled():  # C_i may be training: keep the graph
            return c[:, :u.shape[1]] @ u.T
        cached = self._residual_cache.get(i)  # holds u and c, so `is` cannot see a recycled id
        if cached is None or cached[0] is not u or cached[1] is not c or cached[2] != (u._version, c._version):
            cached = (u, c, (u._version, c._version), c[:, :u.shape[1]] @ u.T)
            self._residual_cache[i] = cached
        return cached[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.base(x)
        if self.capture is not None:
            self.capture.append(x.detach().reshape(-1, x.shape[-1]))
        out = self.base(x)
        tasks = range(self.first_adapter_task, self.task + 1)
        maps, outs, weights = [], [], []
        if self.use_orthogonal:
            for i in tasks:
                maps.append(self.projected_A(i))
                outs.append(self.orth_B[i])
                weights.append(None)
        w = self.residual_weights
        if self.use_residual and w is not None:
            for i in ([self.task] if isinstance(w, str) else tasks):
                if i >= self.first_adapter_task:
                    maps.append(self.residual_A(i))
                    outs.append(self.res_B[i])
                    weights.append(None if isinstance(w, str) else w[:, i])
        if not maps:
            return out
        b = torch.cat(outs, dim=1)
        if self.out_mask is not None:
            b = b * self.out_mask[:, None]
        h = x @ torch.cat(maps).T                       # (..., n r): every branch's rank-r code
        if any(v is not None for v in weights):         # per-sample weights of the residual branches
            ones = torch.ones(len(x), device=x.device, dtype=h.dtype)
            scale = torch.stack([ones if v is None else v.to(h.dtype) for v in weights], 1)
            h = h * scale.repeat_interleave(self.r, dim=1).view(len(x), *([1] * (x.dim() - 2)), -1)
        return out + (h @ b.T) * self.scaling


@contextmanager
def bare(model: nn.Module):
    """Every DualLoRALinear in ``model`` acts as its frozen base layer (no branch, no capture):
    the backbone's own features, which task keys describe when the backbone is pretrained."""
    layers = [m for m in model.modules() if isinstance(m, DualLoRALinear)]
    for layer in layers:
        layer.bypass = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.bypass = False
