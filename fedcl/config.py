"""Validation of a composed config before anything starts: each error names the bad value and
what is allowed, so a user can fix it without reading code."""
from __future__ import annotations

import importlib
import warnings

from omegaconf import DictConfig, OmegaConf

from fedcl.data.scenario import PARTITIONS, check_task_split
from fedcl.data.transforms import check_input
from fedcl.errors import ConfigError
from fedcl.federation.faults import check_faults
from fedcl.models.backbones import check_model

DEVICES = ("auto", "cpu", "cuda")

# The type of every numeric and boolean setting, checked before any other check converts a value
# (`seed=abc` would otherwise end in a traceback). "?" allows null. Keys a config lacks are skipped:
# method.*, model.*, privacy.* exist only for the chosen group. tests/test_config.py checks that
# every number and boolean in conf/ is listed here.
TYPES = {
    **dict.fromkeys(["seed", "num_clients", "num_tasks", "rounds_per_task", "local_epochs", "batch_size",
                     "dataset.channels", "dataset.num_classes",
                     "model.width", "model.depth", "model.embed_dim", "model.num_heads", "model.patch_size",
                     "model.stem_channels", "model.grid", "method.rank", "method.plugin_rounds",
                     "method.weighting_rounds", "method.holdout_total", "method.memory_total",
                     "method.max_client_basis", "method.max_key_dims", "partition.shards_per_client",
                     "privacy.start_task",
                     "privacy.audit_max_clients", "aggregator.byzantine", "aggregator.multi", "method.ca_epochs",
                     "method.ca_samples"], "int"),
    **dict.fromkeys(["dataset.image_size", "dataset.max_size", "dataset.train_per_class", "dataset.test_per_class",
                     "ray.num_cpus", "scenario.base_classes", "method.base_epochs"], "int?"),
    **dict.fromkeys(["lr", "momentum", "weight_decay", "fraction_train", "ray.client_cpus", "ray.client_gpus",
                     "round_timeout_s", "method.ca_lr",
                     "aggregator.trim_fraction", "faults.crash", "faults.dropout", "faults.straggle",
                     "faults.corrupt", "faults.late_by_s", "dataset.test_fraction", "dataset.crop_scale",
                     "model.mlp_ratio",
                     "partition.alpha", "method.alpha", "method.kd_weight", "method.temperature",
                     "method.threshold", "method.feature_threshold", "method.holdout_fraction", "method.head_lr",
                     "privacy.clip_norm",
                     "privacy.sample_rate", "privacy.delta", "privacy.basis_noise_multiplier",
                     "privacy.dp_sgd.noise_multiplier", "privacy.dp_sgd.max_grad_norm"], "float"),
    **dict.fromkeys(["strategy.max_norm_ratio", "strategy.reply_memory_mb", "faults.deadline_s", "method.base_lr",
                     "method.adapter_lr", "method.plugin_lr",
                     "method.threshold_end", "privacy.noise_multiplier", "privacy.target_epsilon",
                     "privacy.dp_sgd.target_epsilon"], "float?"),
    **dict.fromkeys(["progress", "dataset.download", "dataset.augment", "model.pretrained", "method.orthogonal",
                     "method.residual",
                     "method.classifier_alignment",
                     "privacy.audit",
                     "privacy.uniform_weights", "privacy.client_level", "privacy.local_dp_sgd"], "bool"),
}
TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false"}
_ABSENT = object()


def has_type(value, kind: str) -> bool:
    """``value`` fits ``kind`` (an entry of TYPES); a bool is not a number here, an int is a float."""
    if value is None:
        return kind.endswith("?")
    kind = kind.rstrip("?")
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    return isinstance(value, int) or (kind == "float" and isinstance(value, float))


def check_types(cfg: DictConfig) -> None:
    """Every key of TYPES the config has holds a value of its type; else a ConfigError naming both."""
    for key, kind in TYPES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not has_type(value, kind):
            allowed = TYPE_NAMES[kind.rstrip("?")] + (" or null" if kind.endswith("?") else "")
            got = {str: "a string", bool: "a boolean", float: "a decimal number", int: "an integer"}
            written = str(value).lower() if isinstance(value, bool) else str(value)  # as typed: true, not True
            raise ConfigError(f"{key}={written}: {key} must be {allowed}, got {written!r} "
                              f"({got.get(type(value), type(value).__name__)}). Fix the override {key}=... "
                              "on the command line (or the config file that sets it).")


def validate(cfg: DictConfig) -> None:
    """Checks that need no data: types, ranges, names, and that the method class exists."""
    check_types(cfg)
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
    check_input(cfg.dataset)  # dataset.image_size / normalize / augment / crop_scale
    check_model(cfg.model, cfg.dataset.get("image_size", None))  # name, stem, timm arch, patch size
    if float(cfg.ray.client_cpus) <= 0 or float(cfg.ray.client_gpus) < 0:
        raise ConfigError(f"ray.client_cpus={cfg.ray.client_cpus} must be > 0 and "
                          f"ray.client_gpus={cfg.ray.client_gpus} >= 0.")
    check_aggregator(cfg)
    ratio = cfg.strategy.max_norm_ratio
    if ratio is not None and float(ratio) <= 1.0:
        raise ConfigError(f"strategy.max_norm_ratio={ratio} must be > 1 (or null to turn the norm check off).")
    budget = cfg.strategy.get("reply_memory_mb", None)
    if budget is not None and float(budget) < 0:
        raise ConfigError(f"strategy.reply_memory_mb={budget} must be >= 0 (0: every update waits on disk; "
                          "null: all in memory).")
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


def validate_against_data(cfg: DictConfig, num_classes: int, num_train: int | None = None) -> None:
    """Checks that depend on the data set: the task split, and (given ``num_train``, before the
    partition, which costs time per client) that every client can get data."""
    if num_train is not None:
        check_clients_have_data(cfg, num_train)
    base = cfg.scenario.get("base_classes", None)
    if int(cfg.num_tasks) > num_classes:
        raise ConfigError(f"num_tasks={cfg.num_tasks} is more than the {num_classes} classes of "
                          f"dataset={cfg.dataset.name}; each task needs at least one class.")
    check_task_split(num_classes, int(cfg.num_tasks), base)
    from fedcl.privacy.settings import privacy_settings  # privacy: groups, budgets, calibration
    privacy_settings(cfg)


def check_clients_have_data(cfg: DictConfig, num_train: int) -> None:
    """Every training sample goes to one client: with more clients than samples, some never train.
    Fewer samples per task than clients is only warned about (those clients skip the task)."""
    n, name = int(cfg.num_clients), cfg.dataset.name
    if n > num_train:
        raise ConfigError(f"num_clients={n} is more than the {num_train} training samples of dataset={name}: at "
                          f"least {n - num_train} clients would never get a sample. Use num_clients<={num_train}, "
                          "or a larger data set (e.g. dataset=synthetic with dataset.train_per_class large enough).")
    per_task = num_train // int(cfg.num_tasks)
    if n > per_task:
        warnings.warn(f"num_clients={n} with about {per_task} training samples per task (dataset={name}, "
                      f"num_tasks={cfg.num_tasks}): at least about {n - per_task} clients get no data in a task "
                      "and skip its rounds.", stacklevel=2)


def check_aggregator(cfg: DictConfig) -> None:
    """``aggregator=``: a class that can be built from its yaml, with valid settings."""
    from hydra.utils import instantiate

    agg = cfg.get("aggregator", None)
    if agg is None or not agg.get("_target_", None):
        raise ConfigError("aggregator is not set: choose one of conf/aggregator/ (mean, median, trimmed_mean, krum).")
    try:
        instantiate(agg)
    except Exception as err:  # noqa: BLE001 - Hydra wraps import and argument errors alike
        cause = err.__cause__ or err
        raise ConfigError(f"aggregator={agg.get('_target_')!r} cannot be built: {cause}. Choose one of "
                          "conf/aggregator/ (mean, median, trimmed_mean, krum) and its keys.") from None
