"""The input pipeline on real tensors: resize, normalisation statistics, train-only augmentation,
determinism, and the accessors that keep stored images small."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedcl.client.app import client_round
from fedcl.data.datasets import to_float
from fedcl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, input_pipeline
from fedcl.experiment import get_experiment
from fedcl.methods.base import local_batches, predict
from fedcl.models.backbones import model_input_config
from fedcl.server import evaluation


def data(n=64, channels=3, size=8, seed=0):
    x = np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    mean = tuple(float(m) for m in (x / 255).mean(axis=(0, 2, 3)))
    std = tuple(float(s) for s in (x / 255).std(axis=(0, 2, 3)))
    return SimpleNamespace(x_train=x, mean=mean, std=std)


def pipe(d, model_input=None, **cfg):
    return input_pipeline(OmegaConf.create({"image_size": None, "normalize": "auto", "augment": False, **cfg}),
                          d, model_input)


def test_native_size_is_exactly_the_old_normalisation():
    d = data(channels=1)
    p = pipe(d)
    assert p.size == 8 and torch.equal(p(d.x_train), to_float(d.x_train, d.mean, d.std))


def test_resize_per_batch_keeps_content():
    d = data()
    x = np.zeros((4, 3, 8, 8), np.uint8)
    x[:, 0] = 255  # a red image stays red at any size
    out = pipe(d, image_size=32, normalize="imagenet")(x)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.tensor((1 - 0.485) / 0.229), atol=1e-5)
    assert torch.allclose(out[:, 1], torch.tensor(-0.456 / 0.224), atol=1e-5)
    big = np.random.default_rng(1).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    down = pipe(d, image_size=16, normalize="imagenet")(big)  # antialiased: means of 4x4 blocks, roughly
    blocks = torch.from_numpy(big / 255.0).float().unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert (down * std + mean - blocks).abs().mean() < 0.05


def test_normalisation_choices():
    d = data(n=500)
    x = pipe(d, normalize="dataset")(d.x_train)  # the data set's own: zero mean, unit std per channel
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-2)
    assert pipe(d).mean == d.mean  # auto, no pretrained model: the data set's
    assert pipe(d, normalize="imagenet").mean == IMAGENET_MEAN
    vit = model_input_config(OmegaConf.create({"name": "timm", "arch": "vit_tiny_patch16_224", "pretrained": True}))
    auto = pipe(d, vit)  # what the pretrained model was trained with, at its input size
    assert auto.mean == (0.5, 0.5, 0.5) and auto.std == (0.5, 0.5, 0.5) and auto.size == 224
    assert auto.interpolation == "bicubic"
    assert pipe(d, vit, image_size=64, normalize="dataset").size == 64
    assert pipe(d, vit, normalize="dataset").mean == d.mean
    assert model_input_config(OmegaConf.create({"name": "timm", "arch": "vit_tiny_patch16_224"})) is None
    grey = pipe(data(channels=1), normalize="imagenet")  # RGB statistics on grey images: their mean
    assert grey.mean == pytest.approx((np.mean(IMAGENET_MEAN),))


def test_augmentation_is_train_only_per_image_and_seeded():
    d = data(n=1)
    x = np.repeat(np.random.default_rng(2).integers(0, 256, (1, 3, 16, 16), dtype=np.uint8), 8, axis=0)
    p = pipe(d, image_size=24, augment=True)
    torch.manual_seed(0)
    a = p(x, train=True)
    torch.manual_seed(0)
    b = p(x, train=True)
    torch.manual_seed(1)
    c = p(x, train=True)
    assert a.shape == (8, 3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(img.flatten()[:50].tolist()) for img in a}) == 8  # one crop per image, not per batch
    evals = p(x), p(x, train=False)
    assert torch.equal(*evals) and torch.equal(evals[0], pipe(d, image_size=24)(x))  # evaluation: never
    assert torch.allclose(evals[0][0], evals[0][7])
    assert pipe(d, image_size=24)(x, train=True).equal(evals[0])  # augment=false: training = evaluation
    whole = pipe(d, augment=True, crop_scale=1.0)  # crops keep the whole image: only flips remain
    torch.manual_seed(0)
    out, plain = whole(x, train=True), whole(x)
    flipped = [torch.allclose(o, plain[0].flip(-1), atol=1e-5) for o in out]
    assert all(f or torch.allclose(o, plain[0], atol=1e-5) for f, o in zip(flipped, out)) and 0 < sum(flipped) < 8


@pytest.mark.parametrize("augment", [True, False])
def test_experiment_stores_uint8_and_augments_only_training_batches(make_cfg, augment):
    cfg = make_cfg("dataset=digits", "dataset.image_size=16", f"dataset.augment={augment}", "method=finetune",
                   "num_clients=2", "progress=false")
    exp = get_experiment(cfg)
    assert exp.data.x_train.dtype == np.uint8 and exp.data.x_train.shape[1:] == (1, 8, 8)
    assert exp.test_images(np.arange(5)).shape == (5, 1, 16, 16)
    assert exp.new_model()(exp.test_images(np.arange(3))).shape == (3, 10)
    ctx = client_round(cfg, client=0, task=0, rnd=0)
    rows = ctx.task_rows(0)[:4]
    assert torch.equal(ctx.images(rows), exp.train_images(rows, torch.device("cpu")))  # features, bases: plain
    order = torch.randperm(4, generator=client_round(cfg, client=0, task=0, rnd=0).generator).numpy()
    batch, labels = next(local_batches(rows, ctx))
    assert torch.equal(labels, exp.train_labels(rows[order], torch.device("cpu")))
    assert torch.equal(batch, ctx.images(rows[order])) != augment  # training batches: augmented iff asked


def test_evaluation_in_chunks_matches_all_at_once(make_cfg, monkeypatch):
    exp = get_experiment(make_cfg("dataset=digits", "method=finetune", "num_clients=2", "progress=false"))
    model = exp.new_model()
    task = exp.scenario.num_tasks - 1
    rows = np.concatenate(exp.scenario.test_indices)
    everything = to_float(exp.data.x_test, exp.data.mean, exp.data.std)  # the old cached tensor
    correct = predict(model, everything[rows], exp.scenario.seen_classes(task)).numpy() == exp.scenario.y_test[rows]
    per_task, overall = evaluation.evaluate_tasks(exp, model, task)
    assert overall == float(correct.mean())
    monkeypatch.setattr(evaluation, "EVAL_ROWS", 37)
    assert evaluation.evaluate_tasks(exp, model, task) == (per_task, overall)
