"""Composing a config from Hydra overrides, and validating it before anything starts: each error
names the bad value and what is allowed, so a user can fix it without reading code."""
from __future__ import annotations

import dataclasses
import importlib
import warnings
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from fedcl.data.scenario import PARTITIONS, check_task_split
from fedcl.data.transforms import check_input
from fedcl.errors import ConfigError
from fedcl.faults import check_faults
from fedcl.models.backbones import check_model
from fedcl.plugins import check_plugin, check_values, has_type, settings_kinds, type_error
from fedcl.server.schedule import num_sampled

DEVICES = ("auto", "cpu", "cuda")
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``fedcl <overrides>`` runs (the packaged ``conf/``), composed but not validated."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)

# The type of every numeric and boolean setting of the core config, checked before any other check
# converts a value (`seed=abc` would otherwise end in a traceback). "?" allows null. Keys a config
# lacks are skipped (model.* exists only for the chosen model). A plug-in's settings (method.*,
# aggregator.*, privacy.*) are typed by the plug-in's own class (fedcl.plugins), not here.
# tests/test_config.py checks that every number and boolean in conf/ is typed one way or the other.
TYPES = {
    **dict.fromkeys(["seed", "num_clients", "num_tasks", "rounds_per_task", "local_epochs", "batch_size",
                     "dataset.channels", "dataset.num_classes",
                     "model.width", "model.depth", "model.embed_dim", "model.num_heads",
                     "model.stem_channels", "model.grid", "partition.shards_per_client"], "int"),
    **dict.fromkeys(["dataset.image_size", "dataset.max_size", "dataset.train_per_class", "dataset.test_per_class",
                     "model.patch_size", "ray.num_cpus",
                     "scenario.base_classes"], "int?"),
    **dict.fromkeys(["lr", "momentum", "weight_decay", "fraction_train", "ray.client_cpus", "ray.client_gpus",
                     "round_timeout_s", "faults.crash", "faults.dropout", "faults.straggle",
                     "faults.corrupt", "faults.late_by_s", "dataset.test_fraction", "dataset.crop_scale",
                     "model.mlp_ratio", "partition.alpha"], "float"),
    **dict.fromkeys(["strategy.max_norm_ratio", "strategy.reply_memory_mb", "faults.deadline_s"], "float?"),
    **dict.fromkeys(["progress", "dataset.download", "dataset.augment", "model.pretrained"], "bool"),
}
_ABSENT = object()


def check_types(cfg: DictConfig) -> None:
    """Every key of TYPES the config has holds a value of its type, and every plug-in's settings
    the types its class gives them; else a ConfigError naming the key, the value and the type."""
    for key, kind in TYPES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not has_type(value, kind):
            raise type_error(key, value, kind)
    check_plugin("method", cfg.method, plugin_class(cfg.method, "method"))
    aggregator = cfg.get("aggregator", None)
    if aggregator is not None and aggregator.get("_target_", None):
        check_plugin("aggregator", aggregator, plugin_class(aggregator, "aggregator"))
    privacy = cfg.get("privacy", None)
    if privacy is not None and privacy.get("mechanism", None):
        from fedcl.hooks import load_class

        mechanism = load_class(privacy.mechanism, "privacy.mechanism")
        settings = getattr(mechanism, "settings", None)
        if settings is not None and dataclasses.is_dataclass(settings):
            check_values("privacy", privacy, {"name": None, "mechanism": None, **settings_kinds(settings)},
                         f"privacy.mechanism={privacy.mechanism}")


def plugin_class(node: DictConfig, group: str):
    """The class a config group's ``_target_`` names; a ConfigError if it does not import."""
    target = str(node.get("_target_", ""))
    module, _, cls = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{group}._target_={target!r} ({group}={node.get('name')!r}) cannot be imported; use "
                          f"one of the files in conf/{group}/ or a class path that exists.") from None


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
        rule = instantiate(agg)
    except Exception as err:  # noqa: BLE001 - Hydra wraps import and argument errors alike
        cause = err.__cause__ or err
        raise ConfigError(f"aggregator={agg.get('_target_')!r} cannot be built: {cause}. Choose one of "
                          "conf/aggregator/ (mean, median, trimmed_mean, krum) and its keys.") from None
    check = getattr(rule, "problem", None)  # each rule judges its own settings against the round size
    if check is not None and (problem := check(num_sampled(cfg))) is not None:
        raise ConfigError(problem)
