"""One module + one yaml: a method, an aggregation rule or a privacy mechanism types and checks its
own settings from its own class; nothing central lists them."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from fedcl import config
from fedcl.errors import ConfigError

TINY = ["dataset=digits", "num_clients=3", "num_tasks=2", "rounds_per_task=1", "local_epochs=1",
        "ray.num_cpus=2", "progress=false", "model.width=8"]

METHOD = '''
"""A method of a user's own: fine-tuning that shrinks each update by a factor (one float)."""
from fedcl.methods.base import Method


class Shrink(Method):
    def __init__(self, name: str = "shrink", strength: float = 0.5):
        super().__init__(name)
        self.strength = strength

    def parameter_counts(self, model):
        return {"strength": self.strength}  # results.json shows the value the method was built with
'''

MECHANISM = '''
"""A privacy mechanism of a user's own: every client scales what it sends; the server counts replies."""
from dataclasses import dataclass

from fedcl.hooks import ClientHook, ServerCallback


@dataclass(frozen=True)
class ScaleSettings:
    factor: float = 1.0


class Scale:
    settings = ScaleSettings

    def __init__(self, cfg):
        self.factor = float(cfg.privacy.factor)

    def server_callback(self):
        return Counter()

    def client_hook(self):
        return Scaler(self.factor)


class Counter(ServerCallback):
    def __init__(self):
        self.replies = 0

    def on_reply(self, plan, client, content):
        self.replies += 1

    def on_round_end(self, report):
        return {"scaled_replies": self.replies}


class Scaler(ClientHook):
    def __init__(self, factor):
        self.factor = factor

    def after_round(self, ctx, state, config, received, payload, num_examples):
        return {k: v * self.factor if v.is_floating_point() else v for k, v in payload.items()}, {}
'''


@pytest.fixture
def user_package(tmp_path):
    """A folder outside fedcl with one module + one yaml per plug-in, as docs/extending.md says."""
    pkg = tmp_path / "mine"
    (pkg / "conf" / "method").mkdir(parents=True)
    (pkg / "conf" / "privacy").mkdir(parents=True)
    (pkg / "shrink.py").write_text(METHOD)
    (pkg / "scale.py").write_text(MECHANISM)
    (pkg / "conf" / "method" / "shrink.yaml").write_text("_target_: shrink.Shrink\nname: shrink\nstrength: 0.5\n")
    (pkg / "conf" / "privacy" / "scale.yaml").write_text("name: scale\nmechanism: scale.Scale\nfactor: 1.0\n")
    return pkg


def fedcl(pkg, run_dir, *overrides):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pkg), os.environ.get("PYTHONPATH")]))}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "fedcl.cli", *TINY, f"hydra.searchpath=[file://{pkg}/conf]",
                           f"hydra.run.dir={run_dir}", *overrides], env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_a_users_method_and_privacy_mechanism_run_through_fedcl_and_bad_values_exit_2(user_package, tmp_path):
    done = fedcl(user_package, tmp_path / "run", "method=shrink", "method.strength=0.25", "privacy=scale",
                 "privacy.factor=0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["parameters"] == {"strength": 0.25}  # the override reached the method's constructor
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert "scaled_replies" in rows[0] and rows[-1].split(",")[rows[0].split(",").index("scaled_replies")] == "6"
    started = time.monotonic()
    failed = fedcl(user_package, tmp_path / "bad", "method=shrink", "method.strength=strong")
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "method.strength=strong: method.strength must be a number" in failed.stderr
    assert "Traceback" not in failed.stderr and time.monotonic() - started < 60


def test_a_users_privacy_mechanism_types_its_own_settings(user_package, make_cfg, monkeypatch):
    monkeypatch.syspath_prepend(str(user_package))
    hydra_path = f"hydra.searchpath=[file://{user_package}/conf]"
    with pytest.raises(ConfigError, match=r"^privacy.factor=half: privacy.factor must be a number"):
        config.validate(make_cfg(hydra_path, "method=shrink", "privacy=scale", "privacy.factor=half"))
    with pytest.raises(ConfigError, match=r"^method.strenght is not a setting of shrink.Shrink"):
        config.validate(make_cfg(hydra_path, "method=shrink", "+method.strenght=0.1"))
    config.validate(make_cfg(hydra_path, "method=shrink", "privacy=scale", "privacy.factor=0.5"))


def test_plugin_settings_are_typed_from_the_class_signature(make_cfg):
    from fedcl.aggregation.rules import Krum
    from fedcl.methods.replay import Replay
    from fedcl.plugins import parameter_kinds

    assert parameter_kinds(Replay) == {"name": None, "memory_total": "int"}
    assert parameter_kinds(Krum) == {"byzantine": "int", "multi": "int"}
    with pytest.raises(ConfigError, match=r"^aggregator.byzantine=1.5: aggregator.byzantine must be an integer"):
        config.validate(make_cfg("aggregator=krum", "aggregator.byzantine=1.5"))
    with pytest.raises(ConfigError, match=r"^method.memory_total=lots: method.memory_total must be an integer,"):
        config.validate(make_cfg("method=replay", "method.memory_total=lots"))


def test_krum_with_too_many_tolerated_attackers_is_a_config_error(make_cfg):
    with pytest.raises(ConfigError) as err:
        config.validate(make_cfg("aggregator=krum", "aggregator.byzantine=10", "num_clients=10"))
    message = str(err.value)
    assert "2f + 2 = 22" in message and "samples 10 clients" in message and "at most 3" in message
    assert "\n" not in message
    config.validate(make_cfg("aggregator=krum", "aggregator.byzantine=3", "num_clients=10"))  # 10 > 8
    with pytest.raises(ConfigError, match="samples 5 clients"):  # of the sampled clients, not of all
        config.validate(make_cfg("aggregator=krum", "aggregator.byzantine=2", "num_clients=10", "fraction_train=0.5"))


def test_fedcl_with_krum_and_too_many_attackers_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedcl.cli", "aggregator=krum", "aggregator.byzantine=10",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "aggregator.byzantine=10" in done.stderr and "Traceback" not in done.stderr


def test_aggregator_median_changes_the_aggregate_of_a_method_that_never_mentions_rules(make_cfg):
    """The server applies the run's rule around a method's aggregation: a weighted mean that names
    no rule uses it, so a method cannot skip robust aggregation by forgetting ``rule=``."""
    from fedcl.experiment import get_experiment
    from fedcl.methods.base import Method, weighted_mean
    from fedcl.server.strategy import combine

    class Plain(Method):
        def aggregate(self, global_arrays, replies, task, phase, **_):
            return {**global_arrays, **weighted_mean(replies)}

    from hydra.utils import instantiate

    cfg = make_cfg("method=finetune", *TINY)
    g = get_experiment(cfg).method.init_global(get_experiment(cfg).new_model())
    replies = [({k: (v + c * c if v.dtype.kind == "f" else v) for k, v in g.items()}, 10) for c in range(3)]
    key = next(k for k, v in g.items() if v.dtype.kind == "f" and v.size > 1)
    out = {agg: combine(Plain("plain"), instantiate(make_cfg(f"aggregator={agg}").aggregator), g, replies, 0, "train")
           for agg in ("mean", "median")}
    assert np.allclose(out["mean"][key], g[key] + 5 / 3, atol=1e-5)  # (0 + 1 + 4) / 3
    assert np.allclose(out["median"][key], g[key] + 1, atol=1e-5)
