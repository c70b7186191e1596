"""Per-client privacy: accounting equals Opacus', clipping bounds updates, budgets stop
clients, the membership-inference audit sees less as noise grows, and a real Flower run reports it."""
import json

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedcl.errors import ConfigError
from fedcl.privacy.accounting import ClientAccount, epsilon_of
from fedcl.privacy.client_dp import clip_and_noise, noisy_covariance, privatize_payload, refuses
from fedcl.privacy.ledger import PrivacyLedger
from fedcl.privacy.settings import privacy_settings

TINY = ("num_clients=3", "num_tasks=2", "rounds_per_task=2", "local_epochs=1", "dataset=digits",
        "ray.num_cpus=2", "progress=false")
DUAL = ("method=duallora", "model.depth=2", "model.embed_dim=32")


def opacus_epsilon(accountant_cls, segments, delta):
    acc = accountant_cls()
    for sigma, q, steps in segments:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    kw = {"eps_error": 0.01} if accountant_cls is PRVAccountant else {}
    return acc.get_epsilon(delta=delta, **kw)


@pytest.mark.parametrize("name, cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_client_epsilon_equals_opacus_accountant(name, cls):
    acc = ClientAccount(0, None, 1e-5, name)
    for _ in range(7):
        acc.step(1.3, 0.25, "update")
    acc.step(4.0, 1.0, "basis")
    assert acc.history == [[1.3, 0.25, 7], [4.0, 1.0, 1]]
    assert acc.update_steps == 7 and acc.basis_steps == 1
    assert acc.epsilon == pytest.approx(opacus_epsilon(cls, [(1.3, 0.25, 7), (4.0, 1.0, 1)], 1e-5), rel=1e-9)
    assert epsilon_of([(0.0, 1.0, 1)], 1e-5) == float("inf")  # no noise, no guarantee


def test_ledger_reports_each_clients_epsilon_as_opacus_computes_it(make_cfg):
    cfg = make_cfg(*TINY, "method=finetune", "num_clients=4", "privacy=client_dp", "privacy.noise_multiplier=1.0",
                   "privacy.groups=[{clients:[1],noise_multiplier:2.5,sample_rate:0.4},{clients:[2],noise_multiplier:0.7}]")
    ledger = PrivacyLedger(cfg)
    for rnd in range(5):
        for c in ledger.admit([0, 1, 2] if rnd < 3 else [1], 0, rnd, "train"):
            ledger.observe(0, RecordDict({"metrics": MetricRecord({"num-examples": 1, "client": c, "dp-update": 1})}))
        ledger.end_round(0)
    out = ledger.results()
    for c, (sigma, q, steps) in {0: (1.0, 1.0, 3), 1: (2.5, 0.4, 5), 2: (0.7, 1.0, 3)}.items():
        e = out["clients"][str(c)]
        assert (e["noise_multiplier"], e["sample_rate"], e["steps"]) == (sigma, q, steps)
        assert e["epsilon"] == pytest.approx(opacus_epsilon(RDPAccountant, [(sigma, q, steps)], 1e-5), rel=1e-9)
    assert out["clients"]["3"]["epsilon"] == 0.0 and out["clients"]["3"]["steps"] == 0
    assert set(out["clients"]["0"]) >= {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
                                        "exhausted", "mia_auc", "mia_tpr_at_1fpr"}


def test_target_epsilon_calibrates_sigma_to_the_planned_messages(make_cfg):
    cfg = make_cfg(*TINY, "method=finetune", "privacy=client_dp", "privacy.noise_multiplier=null",
                   "privacy.target_epsilon=3.0", "privacy.groups=[{clients:[2],target_epsilon:8.0,sample_rate:0.5}]")
    s = privacy_settings(cfg)
    # finetune: every client is asked in every train round: 2 tasks x 2 rounds
    for c, eps, q in ((0, 3.0, 1.0), (2, 8.0, 0.5)):
        me = s.client(c)
        assert me.calibrated and me.sample_rate == q
        spent = opacus_epsilon(RDPAccountant, [(me.noise_multiplier, q, 4)], 1e-5)
        assert eps - 0.02 <= spent <= eps
        assert me.noise_multiplier == pytest.approx(get_noise_multiplier(
            target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=4, accountant="rdp"), rel=0.02)
    assert s.client(2).noise_multiplier < s.client(0).noise_multiplier  # the larger budget needs less noise


@pytest.mark.parametrize("overrides, message", [
    (("privacy.bases=noisy_covariance",), "strategy.basis_aggregation=covariance"),
    (("privacy.groups=[{clients:[7],noise_multiplier:1.0}]",), "num_clients=3"),
    (("privacy.groups=[{clients:[0],noise:1.0}]",), "unknown keys"),
    (("privacy.noise_multiplier=null",), "neither a noise_multiplier nor a target_epsilon"),
    (("privacy.sample_rate=0",), "sample_rate=0"),
])
def test_bad_privacy_config_is_rejected_clearly(make_cfg, overrides, message):
    cfg = make_cfg(*TINY, *DUAL, "privacy=client_dp", *overrides)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        privacy_settings(cfg)


def test_clipping_bounds_the_update_norm():
    rng = np.random.default_rng(0)
    deltas = {"a": rng.normal(size=(30, 4)) * 5, "b": rng.normal(size=7)}
    norm = np.sqrt(sum((d ** 2).sum() for d in deltas.values()))
    clipped, before = clip_and_noise(deltas, 1.5, 0.0, rng)
    after = np.sqrt(sum((d ** 2).sum() for d in clipped.values()))
    assert before == pytest.approx(norm) and after == pytest.approx(1.5)
    assert np.allclose(clipped["a"] / deltas["a"], 1.5 / norm)  # same direction, scaled
    small = {"a": deltas["a"] * 0.01 / norm}
    assert np.allclose(clip_and_noise(small, 1.5, 0.0, rng)[0]["a"], small["a"])  # within bound: unchanged
    noise_only, _ = clip_and_noise(deltas, 1.5, 2.0, rng, keep=False)  # coin on tails: pure noise
    assert abs(np.concatenate([v.ravel() for v in noise_only.values()]).std() - 2.0) < 0.4


def test_a_real_client_update_leaves_the_client_clipped_and_noised(make_cfg):
    from fedcl.client.app import client_round
    from fedcl.experiment import get_experiment

    clip = 0.5
    cfg = make_cfg(*TINY, *DUAL, "privacy=client_dp", f"privacy.clip_norm={clip}", "privacy.noise_multiplier=0.0")
    exp = get_experiment(cfg)
    model = exp.new_model()
    received = exp.method.init_global(model)
    ctx = client_round(cfg, 1, 0, 0)
    state = {}
    n = exp.method.client_update(model, ctx, state)  # base session: backbone + head, trained for real
    payload = exp.method.payload(model, ctx)
    out, metrics = privatize_payload(cfg, ctx, received, payload, state, n, exp.method)
    assert metrics == {"dp-update": 1, "dp-basis": 0, "dp-raw": 0, "num-examples": 1}
    floats = [k for k in out if np.issubdtype(out[k].dtype, np.floating)]
    raw = np.sqrt(sum(((payload[k].numpy().astype(np.float64) - received[k]) ** 2).sum() for k in floats))
    sent = np.sqrt(sum(((out[k].astype(np.float64) - received[k]) ** 2).sum() for k in floats))
    assert raw > clip and sent == pytest.approx(clip, rel=1e-4)
    assert state["privacy_history"] == [[0.0, 1.0, 1]]
    # with noise the message differs from the clipped update by noise of the configured scale
    cfg2 = make_cfg(*TINY, *DUAL, "privacy=client_dp", f"privacy.clip_norm={clip}", "privacy.noise_multiplier=0.1")
    noisy, _ = privatize_payload(cfg2, ctx, received, payload, {}, n, exp.method)
    diff = np.concatenate([(noisy[k].astype(np.float64) - out[k]).ravel() for k in floats])
    assert diff.std() == pytest.approx(0.1 * clip, rel=0.05)


def test_noisy_covariance_is_symmetric_and_trace_normalised():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6))
    cov = x.T @ x
    quiet = noisy_covariance(cov, 1e-9, rng)
    assert np.allclose(quiet, cov / np.trace(cov), atol=1e-6) and np.linalg.norm(quiet) <= 1 + 1e-6
    loud = noisy_covariance(cov, 0.5, rng)
    assert np.allclose(loud, loud.T)


def test_client_refuses_to_train_once_its_own_budget_is_spent(make_cfg):
    budget = epsilon_of([(1.0, 1.0, 2)], 1e-5) + 1e-3
    cfg = make_cfg(*TINY, "method=finetune", "privacy=client_dp",
                   f"privacy.groups=[{{clients:[0],target_epsilon:{budget}}}]")
    assert not refuses(cfg, 0, 0, {"privacy_history": [[1.0, 1.0, 1]]})
    assert refuses(cfg, 0, 0, {"privacy_history": [[1.0, 1.0, 2]]})
    assert not refuses(cfg, 1, 0, {"privacy_history": [[1.0, 1.0, 50]]})  # no budget: never refuses


def test_audit_auc_drops_toward_half_as_noise_grows(make_cfg):
    """A small real run: one client over-fits its few digits; the server sees its update after
    clipping and noise. The loss-threshold attack's AUC falls to ~0.5 as the noise grows."""
    from fedcl.client.app import client_round
    from fedcl.experiment import get_experiment
    from fedcl.privacy.audit import audit_client

    base = ("method=finetune", "num_clients=20", "num_tasks=1", "local_epochs=25", "partition=iid",
            "lr=0.05", "privacy=client_dp", "privacy.clip_norm=5.0")
    cfg = make_cfg(*base)
    exp = get_experiment(cfg)
    model = exp.new_model()
    received = exp.method.init_global(model)
    ctx = client_round(cfg, 0, 0, 0)
    n = exp.method.client_update(model, ctx, {})
    payload = exp.method.payload(model, ctx)
    aucs = {}
    for sigma in (0.0, 0.02, 0.1):
        runs = []
        for seed in range(3 if sigma else 1):
            c = make_cfg(*base, f"privacy.noise_multiplier={sigma}", f"seed={seed}")
            out, _ = privatize_payload(c, client_round(c, 0, 0, 0), received, payload, {}, n, exp.method)
            runs.append(audit_client(exp, received, out, 0, 0, 0)["mia_auc"])
        aucs[sigma] = float(np.mean(runs))
    assert aucs[0.0] > 0.62, aucs                 # the noiseless update leaks membership
    assert aucs[0.0] > aucs[0.02] + 0.05, aucs    # some noise: less
    assert aucs[0.02] > aucs[0.1] - 0.02, aucs
    assert abs(aucs[0.1] - 0.5) < 0.06, aucs      # heavy noise: chance


def test_shared_bases_reveal_membership_unless_the_covariance_is_noised():
    """Basis-residual attack: a basis kept to high energy spans a small client's own samples."""
    from fedcl.aggregation.subspace import client_basis
    from fedcl.methods.base import COVARIANCE
    from fedcl.privacy.audit import basis_release, basis_residual_scores, roc_summary

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(20, 64))                       # data live near a 20-dim subspace
    members = rng.normal(size=(8, 20)) @ mix + 0.3 * rng.normal(size=(8, 64))
    others = rng.normal(size=(200, 20)) @ mix + 0.3 * rng.normal(size=(200, 64))
    u, _ = client_basis(members, 0.97)
    raw_auc, raw_tpr = roc_summary(basis_residual_scores(u, members), basis_residual_scores(u, others))
    assert raw_auc > 0.95 and raw_tpr > 0.5
    aucs = []
    for seed in range(5):
        noisy = noisy_covariance(members.T @ members, 0.5, np.random.default_rng(seed))
        basis = basis_release({"cov.task_key": noisy}, lambda key: COVARIANCE, 0.97)
        aucs.append(roc_summary(basis_residual_scores(basis, members), basis_residual_scores(basis, others))[0])
    assert abs(np.mean(aucs) - 0.5) < 0.1, aucs


def test_simulation_reports_privacy_and_stops_an_exhausted_client(tmp_path, make_cfg, monkeypatch):
    """A real Flower run of DualLoRA with noisy covariance bases: client 0's budget covers two
    updates and one basis release, so it is not asked again from task 1 on."""
    from fedcl.cli import run_experiment

    monkeypatch.setenv("RAY_ADDRESS", "local")  # our own Ray, even if another cluster runs here

    budget = epsilon_of([(1.0, 1.0, 2), (5.0, 1.0, 1)], 1e-5) + 0.01
    # update screening stays on: under client-level DP it skips the norm check of small rounds
    cfg = make_cfg(*TINY, *DUAL, "strategy.basis_aggregation=covariance",
                   "privacy=client_dp", "privacy.noise_multiplier=1.0", "privacy.bases=noisy_covariance",
                   "privacy.basis_noise_multiplier=5.0", "privacy.clip_norm=0.5",
                   f"privacy.groups=[{{clients:[0],target_epsilon:{budget}}}]")
    results = run_experiment(cfg, str(tmp_path))
    p = results["privacy"]
    c0, c1 = p["clients"]["0"], p["clients"]["1"]
    assert p["exhausted_clients"] == [0] and c0["exhausted"] and not c1["exhausted"]
    assert c0["exhausted_at"] == {"task": 1, "round": 0}
    assert (c0["steps"], c0["basis_steps"]) == (2, 1)
    assert (c1["steps"], c1["basis_steps"], c1["raw_releases"]) == (4, 3, 0)
    assert c0["epsilon"] <= budget
    for e in (c0, c1):
        assert e["epsilon"] == pytest.approx(opacus_epsilon(RDPAccountant, e["history"], 1e-5), rel=1e-9)
        assert 0.0 <= e["mia_auc"] <= 1.0 and 0.0 <= e["mia_tpr_at_1fpr"] <= 1.0
        assert 0.0 <= e["basis_mia_auc"] <= 1.0 and e["basis_rank"] >= 1  # the noisy task-key basis, audited
    assert c1["history"] == [[1.0, 1.0, 2], [5.0, 1.0, 2], [1.0, 1.0, 2], [5.0, 1.0, 1]]
    assert len(c1["epsilon_per_round"]) == 7 and c1["epsilon_per_round"][-1] == c1["epsilon"]
    assert c1["epsilon_per_round"] == sorted(c1["epsilon_per_round"])  # spending only grows
    assert c1["epsilon_per_task"]["0"] == c1["epsilon_per_round"][2]
    rows = results["communication"]["per_round"]
    assert [r["clients_ok"] for r in rows if r["task"] == 1] == [2, 2, 2, 2]  # client 0 no longer asked
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["privacy"]["clients"]["1"]["epsilon"] == pytest.approx(c1["epsilon"])
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "eps_max" in header and "clients_exhausted" in header


def test_local_dp_sgd_trains_every_trainable_parameter_and_accounts_like_opacus(make_cfg):
    """Record-level DP-SGD in a client (Opacus): after the round every trainable parameter moved,
    no frozen one did (the LoRA corruption of opacus #820 would show here), and the client's
    epsilon is Opacus' for (noise multiplier, sample rate, steps); a spent budget stops training."""
    import math

    import torch

    from fedcl.client.app import client_round
    from fedcl.experiment import get_experiment
    from fedcl.privacy.client_dp import begin_round

    cfg = make_cfg(*TINY, "method=finetune", "privacy=dp_sgd", "privacy.dp_sgd.noise_multiplier=1.1",
                   "privacy.dp_sgd.max_grad_norm=1.0", "batch_size=16", "local_epochs=2")
    exp = get_experiment(cfg)
    model = exp.new_model()
    received = exp.method.init_global(model)
    frozen = [n for n, _ in model.named_parameters()][:2]  # first conv: frozen for this check
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    ctx, state = client_round(cfg, 0, 0, 0), {}
    assert begin_round(cfg, ctx, state) and ctx.dp_sgd.noise_multiplier == 1.1
    rows = ctx.task_rows(0)
    exp.method.client_update(model, ctx, state)
    for n, p in model.named_parameters():
        moved = not np.allclose(p.detach().numpy(), received[n])
        assert moved == (n not in frozen), n
    out, metrics = privatize_payload(cfg, ctx, received, exp.method.payload(model, ctx), state, len(rows), exp.method)
    q, steps = min(1.0, 16 / len(rows)), 2 * math.ceil(len(rows) / 16)
    assert ctx.dp_sgd_taken == (q, steps, False) and metrics["dpsgd-steps"] == steps
    assert metrics["dpsgd-epsilon"] == pytest.approx(opacus_epsilon(RDPAccountant, [(1.1, q, steps)], 1e-5), rel=1e-9)
    assert metrics["dp-update"] == 0  # record-level only: no client-level noise on the update
    assert all(np.array_equal(out[k], model.state_dict()[k].numpy()) for k in out)

    budget = metrics["dpsgd-epsilon"] * 1.05  # one round fits, a second does not
    cfg2 = make_cfg(*TINY, "method=finetune", "privacy=dp_sgd", "privacy.dp_sgd.noise_multiplier=1.1",
                    "batch_size=16", "local_epochs=2", f"privacy.dp_sgd.target_epsilon={budget}")
    model2 = exp.new_model()
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    ctx2 = client_round(cfg2, 0, 0, 1)
    assert begin_round(cfg2, ctx2, state)
    exp.method.client_update(model2, ctx2, state)
    assert ctx2.dp_sgd_taken[1:] == (0, True)
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())  # did not train


def test_local_dp_sgd_rejects_dlc_clearly(make_cfg):
    with pytest.raises(ConfigError, match="method=dlc"):
        privacy_settings(make_cfg(*TINY, "method=dlc", "privacy=dp_sgd"))


def test_functorch_per_sample_gradients_of_duallora_equal_one_backward_per_sample(make_cfg):
    import torch
    import torch.nn.functional as F

    from fedcl.client.app import client_round
    from fedcl.experiment import get_experiment
    from fedcl.privacy.dp_sgd import functorch_grad_samples, hooks_cover

    cfg = make_cfg(*TINY, *DUAL)
    exp = get_experiment(cfg)
    model = exp.new_model()
    assert not hooks_cover(model)  # DualLoRA's adapters: ParameterLists Opacus' hooks never see
    ctx = client_round(cfg, 0, 1, 0)
    exp.method.set_mode(model, 1, "current")
    named = {n: p for n, p in model.named_parameters()
             if n.endswith((".orth_A.1", ".orth_B.1", ".res_C.1", ".res_B.1"))}
    torch.manual_seed(0)
    for p in named.values():
        p.data.normal_(0, 0.1)  # B starts at zero: make every factor's gradient non-trivial
    rows = ctx.task_rows(1)[:3]
    x, y = ctx.images(rows), ctx.labels(rows)
    lo, hi = ctx.first_class, ctx.seen_classes
    functorch_grad_samples(model, named, x, y, lo, hi)
    for i in range(3):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1])[:, lo:hi], y[i:i + 1] - lo), list(named.values()))
        for (n, p), g in zip(named.items(), grads):
            assert torch.allclose(p.grad_sample[i], g, atol=1e-6), n


def test_local_dp_sgd_on_duallora_trains_only_the_current_lora_parameters(make_cfg):
    import math

    from fedcl.client.app import client_round
    from fedcl.experiment import get_experiment
    from fedcl.privacy.client_dp import begin_round

    cfg = make_cfg(*TINY, *DUAL, "privacy=dp_sgd", "privacy.dp_sgd.noise_multiplier=1.1", "batch_size=16",
                   "local_epochs=1")
    exp = get_experiment(cfg)
    model = exp.new_model()
    received = exp.method.init_global(model)
    ctx, state = client_round(cfg, 0, 1, 0), {}  # task 1: the adapters' session
    assert begin_round(cfg, ctx, state)
    rows = ctx.task_rows(1)
    exp.method.client_update(model, ctx, state)
    moved = {n for n, p in model.named_parameters() if not np.allclose(p.detach().numpy(), received[n])}
    adapters = {n for n in moved if n.endswith((".orth_A.1", ".orth_B.1", ".res_C.1", ".res_B.1"))}
    assert adapters and moved - adapters <= {"head.weight", "head.bias"}
    q, steps = min(1.0, 16 / len(rows)), math.ceil(len(rows) / 16)
    assert ctx.dp_sgd_taken == (q, steps, False)
    out, metrics = privatize_payload(cfg, ctx, received, exp.method.payload(model, ctx), state, len(rows), exp.method)
    assert metrics["dpsgd-epsilon"] == pytest.approx(opacus_epsilon(RDPAccountant, [(1.1, q, steps)], 1e-5), rel=1e-9)


def test_cli_rejects_a_bad_privacy_config_without_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fedcl.cli", "privacy=client_dp", "privacy.bases=noisy_covariance",
                           f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "strategy.basis_aggregation=covariance" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("method", ["dlc", "duallora"])
def test_every_trained_array_a_lora_method_sends_is_clipped_and_noised(make_cfg, method):
    """In an adapter round nothing trained leaves the client raw: adapters, weighting unit and
    head rows are all deltas of what the server sent."""
    from fedcl.client.app import client_round
    from fedcl.experiment import get_experiment

    extra = DUAL if method == "duallora" else ("method=dlc",)
    cfg = make_cfg(*TINY, *extra, "privacy=client_dp", "privacy.noise_multiplier=0.0", "privacy.clip_norm=1e-3")
    exp = get_experiment(cfg)
    m = exp.method
    task = 1
    model = exp.new_model()
    phases = m.phases(task, 2)
    phase = "train" if "train" in phases else phases[0]
    received = m.downlink(m.init_global(model), task, phase, 0)
    m.load_payload(model, received)
    ctx = client_round(cfg, 0, task, phases.index(phase), phase)
    state = {}
    if method == "dlc":  # the base every client keeps from the base session's last round
        from fedcl.methods.dlc import is_base
        state["base"] = {k: v.clone() for k, v in model.state_dict().items() if is_base(k)}
    n = m.client_update(model, ctx, state)
    payload = m.payload(model, ctx)
    out, metrics = privatize_payload(cfg, ctx, received, payload, state, n, m)
    # DLC's path statistics (path_head=lda) are data statistics, sent raw and booked as a release
    assert metrics["dp-update"] == 1 and metrics["dp-raw"] == (method == "dlc"), metrics
    from fedcl.privacy.client_dp import references
    refs = references(m, payload, received, ctx)
    sent = np.sqrt(sum(((out[k].astype(np.float64) - refs[k]) ** 2).sum() for k in refs
                       if np.issubdtype(out[k].dtype, np.floating)))
    assert sent == pytest.approx(1e-3, rel=1e-3)  # the whole trained update, clipped to the bound


def test_privacy_plans_every_round_that_trains_as_an_update(make_cfg):
    """The method says which phases carry updates: DLC's shared rounds train the base and its parts,
    its calibration of its own only releases counts; DualLoRA's basis rounds release bases."""
    from fedcl.privacy.settings import planned_messages

    shared = planned_messages(make_cfg(*TINY, "method=dlc", "privacy=client_dp"), 0)
    assert all(u == 4 and b == 0 for u, b in shared), shared           # 2 tasks x 2 rounds, all updates
    extra = planned_messages(make_cfg(*TINY, "method=dlc", "method.rounds=extra", "privacy=client_dp"), 0)
    assert all(u == 8 and b == 2 for u, b in extra), extra             # train x2, plugin, weighting | calibrate
    dual = planned_messages(make_cfg(*TINY, *DUAL, "privacy=client_dp"), 0)
    assert all(b > 0 for _, b in dual), dual
