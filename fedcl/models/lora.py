"""LoRA for ``nn.Linear`` and ``nn.Conv2d``, laid out as PEFT's LoRA layer.

``lora_A`` maps the input to rank r and ``lora_B`` maps r to the output; ``scaling = alpha / r``;
B starts at zero so an injected adapter leaves the model unchanged. For a convolution, A is a
conv with the base kernel (in -> r) and B a 1x1 conv (r -> out), so the weight update
``B @ A`` reshaped to the kernel is a rank-r convolution. Names follow PEFT
(``<module>.lora_A.weight``) so the adapters can be exported in its format.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from fedcl.errors import ConfigError


class LoRALayer(nn.Module):
    """A frozen base layer plus a trainable low-rank update ``scaling * B @ A``."""

    def __init__(self, base: nn.Linear | nn.Conv2d, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        check_rank(base, r)
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = int(r), float(alpha), float(alpha) / int(r)
        self.lora_A, self.lora_B = lora_factors(base, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update to the base weight, in the base weight's shape."""
        a = self.lora_A.weight.flatten(1)          # (r, in * kh * kw)
        b = self.lora_B.weight.flatten(1)          # (out, r)
        return (b @ a).view_as(self.base.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


def lora_factors(base: nn.Linear | nn.Conv2d, r: int) -> tuple[nn.Module, nn.Module]:
    """The (A, B) pair of a rank-r update of ``base``, PEFT-initialised (A Kaiming, B zero).
    LoRALayer holds one pair; layers with several adapters (DLC's per-task plugins) hold one each."""
    if isinstance(base, nn.Conv2d):
        lora_A = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                           base.dilation, bias=False)
        lora_B = nn.Conv2d(r, base.out_channels, 1, bias=False)
    else:
        lora_A = nn.Linear(base.in_features, r, bias=False)
        lora_B = nn.Linear(r, base.out_features, bias=False)
    nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))  # PEFT's default init
    nn.init.zeros_(lora_B.weight)
    return lora_A, lora_B


def lora_dims(layer: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of the weight matrix a LoRA update factorises."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ConfigError("LoRA on grouped/depthwise convolutions is not supported; "
                              "leave them out of the target modules.")
        kh, kw = layer.kernel_size
        return layer.in_channels * kh * kw, layer.out_channels
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    raise ConfigError(f"LoRA targets nn.Linear or nn.Conv2d, not {type(layer).__name__}.")


def check_rank(layer: nn.Module, r: int) -> tuple[int, int]:
    """A LoRA rank must fit the layer: 1 <= r <= min(inputs, outputs). Returns (inputs, outputs)."""
    fan_in, fan_out = lora_dims(layer)
    if not 1 <= r <= min(fan_in, fan_out):
        raise ConfigError(f"LoRA rank r={r} does not fit a layer with {fan_in} inputs and "
                          f"{fan_out} outputs: choose 1 <= r <= {min(fan_in, fan_out)}.")
    return fan_in, fan_out


def match_targets(model: nn.Module, targets: str | list[str], kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d),
                  option: str = "LoRA target modules") -> list[str]:
    """Names of the ``kinds`` layers whose dotted name matches a target regex (full match, or a
    suffix after a dot, so ``attn.qkv`` finds ``blocks.3.attn.qkv``). Every pattern must match."""
    patterns = [targets] if isinstance(targets, str) else list(targets)
    for p in patterns:
        try:
            re.compile(p)
        except re.error as err:
            raise ConfigError(f"{option}: {p!r} is not a regular expression ({err}).") from None
    layers = [name for name, m in model.named_modules() if isinstance(m, kinds)]
    hit = lambda p, name: re.fullmatch(p, name) or re.fullmatch(rf".*\.{p}", name)
    unmatched = [p for p in patterns if not any(hit(p, name) for name in layers)]
    if unmatched or not patterns:
        kind = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{option}={patterns}: {unmatched or 'an empty list'} matches no {kind} layer of "
                          f"{type(model).__name__}; give regexes on its layer names, which look like "
                          f"{layers[:6]}.")
    return [name for name in layers if any(hit(p, name) for p in patterns)]


def inject_lora(model: nn.Module, targets: str | list[str], r: int, alpha: float,
                dropout: float = 0.0) -> list[str]:
    """Replace every Linear/Conv2d whose dotted name matches a target regex (see ``match_targets``)
    with a LoRALayer; freeze everything else. Returns the adapted names."""
    matches = match_targets(model, targets)
    model.requires_grad_(False)
    for name in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALayer(getattr(parent, child), r, alpha, dropout))
    return matches


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter matrices: what a LoRA client sends."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
