"""Everything a run derives from its config: data, scenario, model factory, method, device.

Built once per process and cached by the config's content, so a Ray worker that serves many
clients loads the data set and builds the scenario once, not once per message.
"""
from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedcl.data.datasets import DataSplit, load_dataset
from fedcl.data.scenario import Scenario, build_scenario
from fedcl.data.transforms import InputPipeline, input_pipeline
from fedcl.methods.base import Method
from fedcl.models.backbones import ClassIncrementalNet, build_model, check_model, model_input_config
from fedcl.seeding import derive_seed  # noqa: F401 - re-exported: callers import it from here


@dataclass
class Experiment:
    cfg: DictConfig
    data: DataSplit
    scenario: Scenario
    method: Method
    pipeline: InputPipeline  # uint8 rows -> model inputs: resize, augmentation, normalisation

    def new_model(self, prepared: bool = True) -> ClassIncrementalNet:
        """A model with the run's deterministic initialisation (same on server and clients);
        ``prepared=False`` gives the plain backbone + head, before the method adds its parts."""
        torch.manual_seed(int(self.cfg.seed))
        model = build_model(self.cfg.model, self.data.x_train.shape[1], self.data.num_classes, self.pipeline.size)
        return self.method.prepare_model(model) if prepared else model

    def train_images(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """Training rows as the model sees them at evaluation (features, bases, audits): never augmented."""
        return self.pipeline(self.data.x_train[rows], device)

    def augmented_images(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """Training rows as a training batch: augmented under ``dataset.augment=true``."""
        return self.pipeline(self.data.x_train[rows], device, train=True)

    def train_labels(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.scenario.y_train[rows]).to(device)

    def test_images(self, rows: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """Test rows as model inputs; a few rows at a time, since all of them at 224 px would not fit."""
        return self.pipeline(self.data.x_test[rows], device)


def config_key(cfg: DictConfig) -> str:
    """The parts of the config that decide data, scenario, model and method. Remembered for a
    read-only config (a Ray worker's, see ``fedcl.client.app.worker_config``): a client's
    round asks for it several times, and it costs a few milliseconds."""
    if not OmegaConf.is_readonly(cfg):
        return _content_key(cfg)
    ref, key = _KEYS.get(id(cfg), (None, None))
    if ref is None or ref() is not cfg:
        key, ident = _content_key(cfg), id(cfg)
        _KEYS[ident] = (weakref.ref(cfg, lambda _: _KEYS.pop(ident, None)), key)
    return key


_KEYS: dict[int, tuple[weakref.ref, str]] = {}  # id of a read-only config -> its key


def _content_key(cfg: DictConfig) -> str:
    keep = {k: cfg[k] for k in ("dataset", "model", "method", "partition", "scenario", "strategy",
                                "num_clients", "num_tasks", "seed")}
    return json.dumps(OmegaConf.to_container(OmegaConf.create(keep), resolve=True), sort_keys=True)


@functools.lru_cache(maxsize=4)
def _build(key: str) -> Experiment:
    cfg = OmegaConf.create(json.loads(key))
    data = load_dataset(cfg.dataset, int(cfg.seed))
    scenario = build_scenario(data.y_train, data.y_test, data.num_classes, int(cfg.num_tasks),
                              int(cfg.num_clients), cfg.partition, int(cfg.seed),
                              cfg.scenario.get("base_classes", None))
    pipeline = input_pipeline(cfg.dataset, data, model_input_config(cfg.model))
    check_model(cfg.model, pipeline.size)  # the input size is known only now (null: the data's native size)
    if cfg.model.get("pretrained", False) or cfg.model.get("checkpoint", None):
        # weights that are missing or do not fit fail here, before Ray starts (and the file is read once)
        build_model(cfg.model, data.x_train.shape[1], data.num_classes, pipeline.size)
    method = instantiate(cfg.method, _convert_="all")
    shape = OmegaConf.merge(cfg, {"input_dim": int(data.x_train.shape[1] * pipeline.size ** 2)})
    method.bind(int(cfg.num_tasks), scenario.task_starts, shape)
    return Experiment(cfg, data, scenario, method, pipeline)


def get_experiment(cfg: DictConfig) -> Experiment:
    return _build(config_key(cfg))


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU Ray assigned to this client if there is one, else the CPU (outside a Ray
    worker: any visible GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and _ray_gave_a_gpu() else "cpu")
    return torch.device(name)


def _ray_gave_a_gpu() -> bool:
    """False in a Ray worker that was given no GPU (``ray.client_gpus=0``): it must not take one
    that another client holds. True outside Ray workers."""
    try:
        import ray
    except ImportError:
        return True
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return True
    return bool(ray.get_gpu_ids())
