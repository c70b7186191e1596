"""A Ray worker builds its model once and copies it per message: results identical to rebuilding."""
import numpy as np
import torch

TINY = ("method=duallora", "model.depth=1", "model.embed_dim=16", "num_clients=3", "num_tasks=2",
        "local_epochs=1", "dataset=digits", "progress=false")


def serve(cfg, run_dir, monkeypatch, rebuild: bool):
    """Several clients' rounds in one process, as one Ray worker serves them."""
    from fedcl.client import app as client_app
    from fedcl.experiment import get_experiment

    if rebuild:
        monkeypatch.setattr(client_app, "fresh_model", lambda cfg: get_experiment(cfg).new_model())
    method = get_experiment(cfg).method
    global_arrays = method.init_global(get_experiment(cfg).new_model())
    out = []
    rounds = [(0, 0, "train", 1), (1, 0, "train", 1), (0, 1, "basis_end", 2), (1, 1, "basis_end", 2),
              (2, 1, "basis_end", 2), (0, 0, "basis_start", 3), (1, 1, "train", 4), (0, 1, "train", 4)]
    for client, rnd, phase, g in rounds:
        task = 0 if g < 3 else 1
        conf = {"task": task, "round": rnd, "phase": phase, "global-round": g}
        down = method.downlink(global_arrays, task, phase, client)
        payload, metrics = client_app.client_step(cfg, str(run_dir), client, conf, dict(down))
        out.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else np.array(v)
                    for k, v in (payload or {}).items()})
    return out


def test_a_cached_model_per_worker_gives_the_same_rounds_as_rebuilding(tmp_path, make_cfg, monkeypatch):
    cfg = make_cfg(*TINY)
    cached = serve(cfg, tmp_path / "cached", monkeypatch, rebuild=False)
    rebuilt = serve(cfg, tmp_path / "rebuilt", monkeypatch, rebuild=True)
    assert len(cached) == len(rebuilt) and any(cached)
    for a, b in zip(cached, rebuilt):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
    # the worker's model is still as built: no client's round leaked into the next one's start
    from fedcl.client.app import pristine_model
    from fedcl.experiment import get_experiment

    kept, built = pristine_model(cfg).state_dict(), get_experiment(cfg).new_model().state_dict()
    assert kept.keys() == built.keys() and all(torch.equal(kept[k], built[k]) for k in kept)
