"""Why Split Fashion-MNIST's first task (coat vs shirt with seed 0's class order) stalled: plain
in-process FedAvg on that one task, with the small CNN's variants and the optimiser's settings.

    python simulations/fashion_task0.py                      # the current small CNN, default schedule
    python simulations/fashion_task0.py --grid 1 --pools 1   # the CNN before: one pool, global average
    python simulations/fashion_task0.py --central            # one client holding every row

The same partition (Dirichlet 0.5 over 10 clients, seed 0), 1,000 training images per class, 5 rounds
of 3 local epochs, SGD with momentum at batch 16, as the default fedcl schedule; accuracy over the
task's two classes on its whole test set after each round, and the fraction predicted as the first
class (a FedAvg that swings between the two classes shows there). No Flower or Ray: the point is
the model and the optimiser, measured fast.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from fedcl.data.datasets import load_dataset, to_float
from fedcl.data.scenario import build_scenario


def cnn(pools: int, grid: int, width: int = 32) -> nn.Sequential:
    """Three conv blocks (GroupNorm), ``pools`` 2x2 max-pools (1: after the second block, as the CNN
    was; 3: after every block), average pooling to ``grid`` x ``grid``, a linear head."""
    w, layers = width, []
    for i, (c_in, c_out) in enumerate([(1, w), (w, 2 * w), (2 * w, 4 * w)]):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU()]
        if pools >= 3 or (pools == 1 and i == 1) or (pools == 2 and i < 2):
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid), nn.Flatten(), nn.Linear(4 * w * grid * grid, 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--pools", type=int, default=3)
    ap.add_argument("--grid", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--central", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(OmegaConf.create({"name": "fashion_mnist", "root": args.root, "train_per_class": 1000}), 0)
    sc = build_scenario(data.y_train, data.y_test, 10, 5, 10, OmegaConf.create({"name": "dirichlet", "alpha": 0.5}), 0)
    x, x_test = to_float(data.x_train, data.mean, data.std), to_float(data.x_test, data.mean, data.std)
    y, y_test = torch.from_numpy(sc.y_train), torch.from_numpy(sc.y_test)
    lo, hi = sc.task_starts[0], sc.task_starts[1]
    clients = [sc.client_indices[0][c] for c in range(10)]
    if args.central:
        clients = [np.concatenate(clients)]
    torch.manual_seed(0)
    model, started = cnn(args.pools, args.grid), time.time()
    print(f"task 0 classes {sc.class_order[lo:hi].tolist()} (Fashion-MNIST ids); rows per client "
          f"{[len(c) for c in clients]}")
    for rnd in range(args.rounds):
        states, sizes = [], []
        for c, rows in enumerate(clients):
            if not len(rows):
                continue
            local = copy.deepcopy(model).train()
            opt = torch.optim.SGD(local.parameters(), lr=args.lr, momentum=args.momentum)
            gen = torch.Generator().manual_seed(rnd * 100 + c)
            for _ in range(args.epochs):
                order = torch.from_numpy(rows)[torch.randperm(len(rows), generator=gen)]
                for i in range(0, len(order), args.batch):
                    b = order[i:i + args.batch]
                    loss = F.cross_entropy(local(x[b])[:, lo:hi], y[b] - lo)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            states.append(local.state_dict())
            sizes.append(len(rows))
        weights = torch.tensor(sizes, dtype=torch.float) / sum(sizes)
        model.load_state_dict({k: sum(w * s[k].float() for w, s in zip(weights, states)) for k in states[0]})
        test = torch.from_numpy(sc.test_indices[0])
        with torch.no_grad():
            pred = model.eval()(x_test[test])[:, lo:hi].argmax(1) + lo
        print(f"round {rnd}: accuracy {(pred == y_test[test]).float().mean():.3f}, predicted as the first class "
              f"{(pred == lo).float().mean():.2f}  ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
