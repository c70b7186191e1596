"""DLC's model: per-task conv-LoRA plugins in a backbone's deep stage, a weighting unit, a head for
the plugin path, and a mixing weight that makes the whole a superset of its base.

``PluginLayer`` wraps one conv (or linear) layer of the deep stage with one LoRA pair per task,
built by ``fedcl.models.lora.lora_factors`` (PEFT's layout with the task index as the adapter
name: ``<layer>.lora_A.<t>.weight``). ``active`` picks the plugin the next forward uses
(``None``: the bare base layer).

``DLCNet`` splits the backbone's top-level children into a shallow part, run once per input, and
a deep part (from the first plugin stage on), run once per plugin: plugin t turns the shallow
activation into task t's representation f_t. The weighting unit scores each f_t with its own
linear scorer, takes a softmax over the plugins in use, and ``dlc_head`` classifies sum_t alpha_t
f_t (the plugin path); with ``residual`` the path's classifier is the base ``head`` plus
``dlc_head`` (a correction that follows the base head as it moves on). The base is the bare
backbone and its own ``head``. The prediction mixes the two: (1 - mix) log p_base + mix log
p_plugin_path (the path's logits over ``temperature``), with ``mix`` (a buffer, 0 at the start)
chosen by the server on held-out rows: at 0 the model predicts what its base does.
"""
from __future__ import annotations

import torch
from torch import nn

from fedcl.errors import ConfigError
from fedcl.models.lora import check_rank, lora_factors

AUTO_STAGES = {"resnet18": ["layer4"]}  # small CNN: the child holding its last conv (see resolve_stages)


class PluginLayer(nn.Module):
    """A frozen base layer with one LoRA plugin per task; ``active`` selects one (or none)."""

    def __init__(self, base: nn.Conv2d | nn.Linear, num_tasks: int, r: int, alpha: float):
        super().__init__()
        check_rank(base, r)
        self.base = base
        self.r, self.alpha, self.scaling = int(r), float(alpha), float(alpha) / int(r)
        pairs = [lora_factors(base, r) for _ in range(num_tasks)]
        self.lora_A = nn.ModuleList(a for a, _ in pairs)
        self.lora_B = nn.ModuleList(b for _, b in pairs)
        self.active: int | None = None

    def delta_weight(self, task: int) -> torch.Tensor:
        a = self.lora_A[task].weight.flatten(1)
        b = self.lora_B[task].weight.flatten(1)
        return (b @ a).view_as(self.base.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.active is None:
            return out
        return out + self.lora_B[self.active](self.lora_A[self.active](x)) * self.scaling


class WeightingUnit(nn.Module):
    """One linear scorer per task on that task's representation; softmax over the plugins in use.

    Each representation is standardised over its features (layer norm without parameters) before
    scoring, so that scores do not depend on the scale of a backbone's features."""

    def __init__(self, num_tasks: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_tasks, dim))
        self.bias = nn.Parameter(torch.zeros(num_tasks))

    def forward(self, reps: torch.Tensor) -> torch.Tensor:
        """reps: (T, N, D) -> scores (N, T)."""
        t = reps.shape[0]
        reps = nn.functional.layer_norm(reps, reps.shape[-1:])
        return torch.einsum("tnd,td->nt", reps, self.weight[:t]) + self.bias[:t]


def resolve_stages(features: nn.Module, model_name: str, stages) -> list[str]:
    """Top-level children of the backbone that get plugins (``auto``: ResNet-18's layer4, the
    small CNN's last conv)."""
    names = [n for n, _ in features.named_children()]
    if stages in (None, "auto"):
        if model_name in AUTO_STAGES:
            return list(AUTO_STAGES[model_name])
        convs = [n for n, m in features.named_children() if any(isinstance(c, nn.Conv2d) for c in m.modules())]
        if not convs:
            raise ConfigError(f"method=dlc needs a conv backbone; model={model_name} has no Conv2d.")
        return [convs[-1]]
    stages = [str(stages)] if isinstance(stages, (str, int)) else [str(s) for s in stages]
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise ConfigError(f"method.stages={stages}: {unknown} are not top-level parts of model={model_name} "
                          f"(its parts: {names}).")
    return stages


class DLCNet(nn.Module):
    """Backbone (``features``) + base ``head`` + per-task plugins + weighting unit + ``dlc_head``."""

    def __init__(self, features: nn.Module, head: nn.Linear, stages: list[str], num_tasks: int,
                 r: int, alpha: float, residual: bool = False):
        super().__init__()
        self.features, self.head = features, head
        children = [n for n, _ in features.named_children()]
        self.deep_from = min(children.index(s) for s in stages)
        self.plugin_layers: list[str] = []
        for stage in stages:
            part = features.get_submodule(stage)
            targets = [n for n, m in part.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            for name in targets:
                full = f"{stage}.{name}" if name else stage
                parent_name, _, child = full.rpartition(".")
                parent = features.get_submodule(parent_name) if parent_name else features
                setattr(parent, child, PluginLayer(getattr(parent, child), num_tasks, r, alpha))
                self.plugin_layers.append(full)
        if not self.plugin_layers:
            raise ConfigError(f"method.stages={stages} hold no Conv2d/Linear layer to put plugins in.")
        self.weighting = WeightingUnit(num_tasks, head.in_features)
        self.residual = residual
        self.dlc_head = nn.Linear(head.in_features, head.out_features)
        self.reset_path_head()                            # the plugin path starts as the base's classifier
        self.register_buffer("mix", torch.zeros(1))       # weight of the plugin path in the prediction
        self.register_buffer("temperature", torch.ones(1))  # of the plugin path's logits in the prediction
        self.num_tasks = num_tasks
        self.tasks_in_use = 1            # plugins 0 .. tasks_in_use-1 are combined
        self.mode = "plain"              # "plain": the base (backbone + head) | "dlc": the plugin path
        self.last_weights: torch.Tensor | None = None   # (N, T) weights of the last plugin-path forward

    # ---- plugins ------------------------------------------------------------------------
    def layers(self) -> list[PluginLayer]:
        return [self.features.get_submodule(n) for n in self.plugin_layers]

    def use_plugin(self, task: int | None) -> None:
        for layer in self.layers():
            layer.active = task

    def plugin_parameters(self, task: int) -> list[nn.Parameter]:
        return [p for layer in self.layers() for p in (*layer.lora_A[task].parameters(),
                                                       *layer.lora_B[task].parameters())]

    @torch.no_grad()
    def reset_path_head(self) -> None:
        """The path's classifier back to the base head's (``dlc_head`` a copy of it, or a zero residual)."""
        if self.residual:
            self.dlc_head.weight.zero_()
            self.dlc_head.bias.zero_()
        else:
            self.dlc_head.load_state_dict(self.head.state_dict())

    def path_head(self, z: torch.Tensor) -> torch.Tensor:
        """The plugin path's classifier: ``dlc_head``, plus the base head when it is a residual."""
        return self.head(z) + self.dlc_head(z) if self.residual else self.dlc_head(z)

    # ---- forward ------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
        for module in list(self.features.children())[start:stop]:
            x = module(x)
        return x

    def shallow(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, 0, self.deep_from)

    def deep(self, h: torch.Tensor, task: int | None) -> torch.Tensor:
        """The deep part from shallow activation ``h``, with plugin ``task`` (None: the bare base)."""
        self.use_plugin(task)
        try:
            return self._run(h, self.deep_from, None).flatten(1)
        finally:
            self.use_plugin(None)

    def representations(self, x: torch.Tensor, tasks: int | None = None, h: torch.Tensor | None = None) -> torch.Tensor:
        """(T, N, D): plugin t's representation of every input, t < tasks (from ``h`` if given)."""
        h = self.shallow(x) if h is None else h
        return torch.stack([self.deep(h, t) for t in range(self.tasks_in_use if tasks is None else tasks)])

    def path_features(self, reps: torch.Tensor) -> torch.Tensor:
        """What the plugin path classifies: the plugins' representations (T, N, D) weighted by the
        weighting unit."""
        weights = torch.softmax(self.weighting(reps), dim=1)        # (N, T)
        self.last_weights = weights
        return torch.einsum("nt,tnd->nd", weights, reps)

    def plugin_path(self, reps: torch.Tensor) -> torch.Tensor:
        """Logits of the plugin path from the plugins' representations (T, N, D)."""
        return self.path_head(self.path_features(reps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the current ``mode``: the base's, or the plugin path's."""
        if self.mode == "plain":
            self.use_plugin(None)
            return self.head(self.features(x))
        return self.plugin_path(self.representations(x))

    def base_log_probs(self, h: torch.Tensor, seen: int) -> torch.Tensor:
        """The base's log-probabilities over the seen classes from shallow activation ``h``."""
        return torch.log_softmax(self.head(self.deep(h, None))[:, :seen], 1)

    def mixed_log_probs(self, x: torch.Tensor, seen: int) -> torch.Tensor:
        """What DLC predicts from (``mix_log_probs`` at the model's ``mix`` and ``temperature``);
        exactly the base's log-probabilities while ``mix`` is 0 (the plugin path is not even run)."""
        h = self.shallow(x)
        base = self.base_log_probs(h, seen)
        lam = float(self.mix)
        if lam == 0.0:
            return base
        path = self.plugin_path(self.representations(x, h=h))[:, :seen]
        return mix_log_probs(base, path, lam, float(self.temperature))


def mix_log_probs(base: torch.Tensor, path_logits: torch.Tensor, mix: float, temperature: float) -> torch.Tensor:
    """(1 - mix) log p_base + mix log softmax(path_logits / temperature) over the seen classes
    (not renormalised: the argmax is DLC's prediction)."""
    return (1 - mix) * base + mix * torch.log_softmax(path_logits / temperature, 1)
