"""Each plug-in types its own parameters: a method, an aggregation rule or a privacy mechanism is
one module + one yaml, and nothing central lists its keys.

The types come from the plug-in's class: a method's or a rule's annotated ``__init__`` signature
(a rule is a dataclass: its fields), a privacy mechanism's ``settings`` dataclass (the keys of its
yaml). ``int``, ``float``, ``bool`` and their ``X | None`` forms are checked; other annotations
(strings, lists, mappings) are left to the plug-in. A yaml key the class does not take is an
error too (Hydra would fail later with a traceback).
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing

from omegaconf import DictConfig, OmegaConf

from fedcl.errors import ConfigError

KINDS = {int: "int", float: "float", bool: "bool"}
TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false"}


def kind_of(annotation) -> str | None:
    """"int", "float?", ... for an annotation fedcl checks; None for the rest."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        kind = kind_of(inner[0]) if len(inner) == 1 else None
        return None if kind is None else kind.rstrip("?") + "?"
    return KINDS.get(annotation)


def parameter_kinds(cls) -> dict[str, str | None] | None:
    """Parameter -> kind of ``cls``'s constructor (None: not checked); None when it takes **kwargs."""
    init = cls.__init__
    params = [p for p in inspect.signature(init).parameters.values() if p.name != "self"]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve is not checked
        hints = {}
    return {p.name: kind_of(hints.get(p.name)) for p in params}


def settings_kinds(settings) -> dict[str, object]:
    """Key -> kind of a settings dataclass; a nested dataclass gives a nested dict."""
    hints = typing.get_type_hints(settings)
    out: dict[str, object] = {}
    for field in dataclasses.fields(settings):
        hint = hints.get(field.name)
        nested = [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]  # X or X | None
        out[field.name] = settings_kinds(nested[0]) if nested else kind_of(hint)
    return out


def has_type(value, kind: str) -> bool:
    """``value`` fits ``kind``; a bool is not a number here, an int is a float."""
    if value is None:
        return kind.endswith("?")
    kind = kind.rstrip("?")
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    return isinstance(value, int) or (kind == "float" and isinstance(value, float))


def type_error(key: str, value, kind: str) -> ConfigError:
    allowed = TYPE_NAMES[kind.rstrip("?")] + (" or null" if kind.endswith("?") else "")
    got = {str: "a string", bool: "a boolean", float: "a decimal number", int: "an integer"}
    written = str(value).lower() if isinstance(value, bool) else str(value)  # as typed: true, not True
    return ConfigError(f"{key}={written}: {key} must be {allowed}, got {written!r} "
                       f"({got.get(type(value), type(value).__name__)}). Fix the override {key}=... "
                       "on the command line (or the config file that sets it).")


def check_values(prefix: str, node: DictConfig, kinds: dict, owner: str, ignore: tuple[str, ...] = ()) -> None:
    """Every key of ``node`` is one ``kinds`` knows, with a value of its kind; else a ConfigError."""
    for key, value in node.items():
        if key in ignore or str(key).startswith("_"):
            continue
        name = f"{prefix}.{key}"
        if key not in kinds:
            known = ", ".join(f"{prefix}.{k}" for k in kinds) or "none"
            raise ConfigError(f"{name} is not a setting of {owner} (its settings: {known}). Remove it, or fix its "
                              "name, on the command line or in the yaml that sets it.")
        kind = kinds[key]
        if isinstance(kind, dict):
            if value is not None:
                check_values(name, OmegaConf.create(value) if not isinstance(value, DictConfig) else value, kind,
                             owner)
        elif kind is not None and not has_type(value, kind):
            raise type_error(name, value, kind)


def check_plugin(prefix: str, node: DictConfig, cls) -> None:
    """The yaml ``node`` of a plug-in built as ``cls(**node)`` (Hydra's ``_target_``)."""
    kinds = parameter_kinds(cls)
    if kinds is not None:
        check_values(prefix, node, kinds, f"{cls.__module__}.{cls.__qualname__}")
