"""Validation of a composed config before anything starts: each error names the bad value and
what is allowed, so a user can fix it without reading code."""
from __future__ import annotations

import importlib

from omegaconf import DictConfig

from fedcl.data.scenario import PARTITIONS, check_task_split
from fedcl.errors import ConfigError
from fedcl.federation.faults import check_faults
from fedcl.federation.robust import RULES
from fedcl.models.backbones import MODELS

DEVICES = ("auto", "cpu", "cuda")


def validate(cfg: DictConfig) -> None:
    """Checks that need no data: ranges, names, and that the method class exists."""
    for key in ("num_clients", "num_tasks", "rounds_per_task", "local_epochs", "batch_size"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]} must be a positive integer.")
    f = float(cfg.fraction_train)
    if not 0.0 < f <= 1.0:
        raise ConfigError(f"fraction_train={f} must be in (0, 1]: the fraction of the "
                          f"{cfg.num_clients} clients sampled each round.")
    if float(cfg.lr) <= 0:
        raise ConfigError(f"lr={cfg.lr} must be > 0.")
    if str(cfg.optimizer) not in ("sgd", "adam"):
        raise ConfigError(f"optimizer={cfg.optimizer!r} is unknown. Choose 'sgd' or 'adam'.")
    if str(cfg.device) not in DEVICES:
        raise ConfigError(f"device={cfg.device!r} is unknown. Choose one of {list(DEVICES)}.")
    if str(cfg.precision) not in ("auto", "fp32"):
        raise ConfigError(f"precision={cfg.precision!r} is unknown. Choose 'auto' (bf16 on a GPU) or 'fp32'.")
    if cfg.partition.name not in PARTITIONS:
        raise ConfigError(f"partition={cfg.partition.name!r} is unknown. Choose one of {list(PARTITIONS)}.")
    if cfg.model.name not in MODELS:
        raise ConfigError(f"model={cfg.model.name!r} is unknown. Choose one of {list(MODELS)}.")
    if float(cfg.ray.client_cpus) <= 0 or float(cfg.ray.client_gpus) < 0:
        raise ConfigError(f"ray.client_cpus={cfg.ray.client_cpus} must be > 0 and "
                          f"ray.client_gpus={cfg.ray.client_gpus} >= 0.")
    if str(cfg.strategy.robust) not in RULES:
        raise ConfigError(f"strategy.robust={cfg.strategy.robust!r} is unknown. Choose one of {list(RULES)}.")
    if not 0.0 <= float(cfg.strategy.trim_fraction) < 0.5:
        raise ConfigError(f"strategy.trim_fraction={cfg.strategy.trim_fraction} must be in [0, 0.5): "
                          "the fraction dropped at each end.")
    ratio = cfg.strategy.max_norm_ratio
    if ratio is not None and float(ratio) <= 1.0:
        raise ConfigError(f"strategy.max_norm_ratio={ratio} must be > 1 (or null to turn the norm check off).")
    if (problem := check_faults(cfg)) is not None:
        raise ConfigError(problem)
    target = str(cfg.method.get("_target_", ""))
    module, _, cls = target.rpartition(".")
    try:
        getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"method._target_={target!r} (method={cfg.method.get('name')!r}) cannot "
                          "be imported; use one of the files in conf/method/ or a class path "
                          "that exists.") from None


def validate_against_data(cfg: DictConfig, num_classes: int) -> None:
    """Checks that depend on the data set: the task split."""
    base = cfg.scenario.get("base_classes", None)
    if int(cfg.num_tasks) > num_classes:
        raise ConfigError(f"num_tasks={cfg.num_tasks} is more than the {num_classes} classes of "
                          f"dataset={cfg.dataset.name}; each task needs at least one class.")
    check_task_split(num_classes, int(cfg.num_tasks), base)
    from fedcl.privacy.settings import privacy_settings  # privacy (issue 6): groups, budgets, calibration
    privacy_settings(cfg)
