"""Bad input is a ConfigError naming the override, found before anything slow starts."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedcl import config
from fedcl.cli import resumed_config, run_experiment
from fedcl.config import CONF_DIR, compose_config
from fedcl.errors import ConfigError

DIGITS_TRAIN = 1437  # scikit-learn's 1,797 digits less the 20% test split


def leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def plugin_kinds(cfg) -> dict:
    """Key -> kind of every setting the config's plug-ins type from their own classes."""
    from fedcl.hooks import load_class
    from fedcl.plugins import parameter_kinds, settings_kinds

    kinds = {f"method.{k}": v for k, v in parameter_kinds(config.plugin_class(cfg.method, "method")).items()}
    kinds.update({f"aggregator.{k}": v for k, v in
                  parameter_kinds(config.plugin_class(cfg.aggregator, "aggregator")).items()})
    if cfg.privacy.get("mechanism"):
        settings = load_class(cfg.privacy.mechanism, "privacy.mechanism").settings
        kinds.update({f"privacy.{k}": v for k, v in leaves(settings_kinds(settings))})
    return kinds


def test_every_number_and_boolean_in_conf_has_its_type_in_the_schema_or_its_plugin():
    seen, typed_by = {}, {}
    groups = [g for g in sorted(os.listdir(CONF_DIR)) if (Path(CONF_DIR) / g).is_dir() and g != "experiment"]
    options = [[f"{g}={f[:-5]}"] for g in groups for f in sorted(os.listdir(Path(CONF_DIR) / g)) if f.endswith(".yaml")]
    for overrides in [[]] + options:
        cfg = compose_config(overrides + (["dataset.root=/x"] if overrides == ["dataset=imagefolder"] else []))
        config.check_types(cfg)  # every value has its type
        typed_by.update(plugin_kinds(cfg))
        tree = OmegaConf.to_container(cfg, resolve=False)
        tree.pop("hydra", None)
        for key, value in leaves(tree):
            seen.setdefault(key, []).append(value)
    for key, values in seen.items():
        typed = [v for v in values if isinstance(v, (bool, int, float))]
        kind = config.TYPES.get(key) or typed_by.get(key)
        if typed:
            assert kind is not None, f"{key} (default {typed[0]!r}): not in fedcl.config.TYPES nor typed by its plug-in"
        for value in values:
            if kind is not None:
                assert config.has_type(value, kind), (key, value)
    assert not set(config.TYPES) - set(seen), "TYPES names keys no config has"
    assert not {k for k in config.TYPES if k.startswith(("method.", "aggregator.", "privacy."))}


@pytest.mark.parametrize("overrides, key, allowed", [
    (["seed=abc"], "seed", "an integer"),
    (["num_clients=ten"], "num_clients", "an integer"),
    (["num_tasks=2.5"], "num_tasks", "an integer"),
    (["num_clients=true"], "num_clients", "an integer"),  # YAML's true is not the number 1 here
    (["lr=fast"], "lr", "a number"),
    (["fraction_train=x"], "fraction_train", "a number"),
    (["ray.client_cpus=a"], "ray.client_cpus", "a number"),
    (["ray.num_cpus=many"], "ray.num_cpus", "an integer or null"),
    (["strategy.max_norm_ratio=off"], "strategy.max_norm_ratio", "a number or null"),
    (["faults.crash=some"], "faults.crash", "a number"),
    (["progress=maybe"], "progress", "true or false"),
    (["dataset.image_size=big"], "dataset.image_size", "an integer or null"),
    (["method=replay", "method.memory_total=five"], "method.memory_total", "an integer"),
    (["privacy=client_dp", "privacy.clip_norm=high"], "privacy.clip_norm", "a number"),
])
def test_a_value_of_the_wrong_type_names_the_override_the_value_and_the_type(make_cfg, overrides, key, allowed):
    bad = overrides[-1].split("=", 1)[1]
    with pytest.raises(ConfigError) as err:
        config.validate(make_cfg(*overrides))
    message = str(err.value)
    assert message.startswith(f"{key}={bad}: {key} must be {allowed}, got ")
    assert "\n" not in message


@pytest.mark.parametrize("overrides", [
    ["lr=1"],  # an integer is a number
    ["strategy.max_norm_ratio=null", "scenario.base_classes=null", "ray.num_cpus=null"],
    ["ray.client_cpus=0.5", "faults.deadline_s=2", "seed=7"],
])
def test_values_of_the_right_type_pass(make_cfg, overrides):
    config.validate(make_cfg(*overrides))


def test_more_clients_than_training_samples_fails_before_the_partition(make_cfg, tmp_path):
    cfg = make_cfg("method=finetune", "num_clients=100000000", "progress=false")
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        run_experiment(cfg, str(tmp_path))
    assert time.monotonic() - started < 10  # the partition alone would take minutes
    message = str(err.value)
    assert f"the {DIGITS_TRAIN} training samples of dataset=digits" in message
    assert f"at least {100000000 - DIGITS_TRAIN} clients would never get a sample" in message
    assert not (tmp_path / "results.json").exists()


def test_fewer_samples_per_task_than_clients_is_a_warning_with_the_count(make_cfg):
    cfg = make_cfg("num_clients=300", "num_tasks=5")
    with pytest.warns(UserWarning, match=r"about 287 training samples per task .* at least about 13 clients"):
        config.validate_against_data(cfg, 10, DIGITS_TRAIN)
    config.validate_against_data(make_cfg("num_clients=287", "num_tasks=5"), 10, DIGITS_TRAIN)  # no warning


def test_resume_of_a_folder_that_is_not_a_run_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        resumed_config(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="config.yaml"):
        resumed_config(str(tmp_path))


FEDCL = shutil.which("fedcl") or str(Path(sys.executable).parent / "fedcl")


@pytest.mark.parametrize("override, message", [
    ("seed=abc", "seed=abc: seed must be an integer, got 'abc' (a string)"),
    ("num_clients=100000000", f"at least {100000000 - DIGITS_TRAIN} clients would never get a sample"),
])
def test_the_fedcl_command_exits_2_with_one_paragraph(tmp_path, override, message):
    started = time.monotonic()
    proc = subprocess.run([FEDCL, override, "method=finetune", f"hydra.run.dir={tmp_path}/run"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 90  # 20-30 s at a load of 20 on 2 cores: the start-up, no simulation


def test_flwr_run_apps_validate_the_run_config_overrides():
    from types import SimpleNamespace

    from omegaconf.errors import ReadonlyConfigError

    from fedcl.runtime.flwr_run import config_from_context

    with pytest.raises(ConfigError, match="seed=abc: seed must be an integer"):
        config_from_context(SimpleNamespace(run_config={"overrides": "method=finetune seed=abc"}))
    good = SimpleNamespace(run_config={"overrides": "method=finetune num_clients=3"})
    first = config_from_context(good)
    with pytest.raises(ReadonlyConfigError):  # composed once per process: read-only, so no change can leak
        first.num_clients = 99
    assert config_from_context(good) is first and first.num_clients == 3
