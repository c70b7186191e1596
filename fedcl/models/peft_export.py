"""Export LoRA factors in PEFT's adapter format, so ``peft.PeftModel.from_pretrained`` loads them.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``), plus ``backbone.safetensors``
with the frozen backbone the adapters belong to (trained in fedcl's base session, so a user
cannot get it elsewhere). Several rank-r branches on one module are exported as one adapter of
rank r * n with alpha * n: the scale alpha / r stays the same and B @ A is their exact sum.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def export_peft(folder: str | Path, factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
                r: int, alpha: float, backbone: dict[str, torch.Tensor] | None = None) -> Path:
    """``factors``: module name -> list of (A: r x in, B: out x r) branches, all with scale alpha / r."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = max(len(branches) for branches in factors.values())
    tensors = {}
    for module, branches in factors.items():
        empty = (torch.zeros_like(branches[0][0]), torch.zeros_like(branches[0][1]))
        branches = branches + [empty] * (n - len(branches))
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.cat([a for a, _ in branches], 0).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.cat([b for _, b in branches], 1).contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r * n, "lora_alpha": alpha * n, "lora_dropout": 0.0,
              "target_modules": sorted(factors), "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "modules_to_save": None, "task_type": None,
              "base_model_name_or_path": None, "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if backbone is not None:
        save_file({k: v.detach().contiguous() for k, v in backbone.items()}, str(folder / "backbone.safetensors"))
    return folder
