"""Config -> settings: the one way a validated config section becomes a typed (dataclass) settings object.

`from_config(Settings, section)` builds any frozen settings dataclass from a config mapping: lists become tuples
(element by element, `tuple[int, int, int]` or `tuple[float, ...]`), nested dataclasses are built from nested
mappings, numbers given as strings ("1e-4", which YAML reads as a string) are accepted, lossy or ambiguous
conversions (1.5 as an int, 1 as a bool) and unknown keys are refused, and a missing key without a default is
named. `config/config.yaml` is the one source of defaults: settings classes have no defaults for keys the schema
requires. Where one config section feeds several settings (`evaluation` holds the forecast and the summary
settings), `section(Settings, mapping)` picks the keys that class reads.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """A config section that does not fit its settings class (unknown, missing or mistyped keys)."""


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls) if field.init}


def _required(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls) if field.init and field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING]


def _convert(name: str, kind: Any, value: Any) -> Any:
    """`value` as type `kind`, refusing lossy or ambiguous conversions; `name` is the key path for errors."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        return _convert(name, options[0], value) if len(options) == 1 else value
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise SettingsError(f"{name} must be a mapping, not {value!r}")
        return from_config(kind, value, _path=f"{name}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{name} must be a list, not {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{name}[{i}]", args[0], v) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise SettingsError(f"{name} must have {len(args)} values, not {len(value)}: {value!r}")
        return tuple(_convert(f"{name}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value, strict=True))) \
            if args else tuple(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{name} must be true or false, not {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, bool):
            raise SettingsError(f"{name} must be a number, not {value!r}")
        if kind is int and isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{name} must be a number, not {value!r}") from None
        if kind is float:
            return number
        if not number.is_integer():
            raise SettingsError(f"{name} must be a whole number, not {value!r}")
        return int(number)
    if kind is str:
        if not isinstance(value, str):
            raise SettingsError(f"{name} must be a string, not {value!r}")
        return value
    return value  # Any, dict and other plain-data fields pass through


def from_config(cls: type[T], values: Mapping[str, Any], _path: str = "", **extra: Any) -> T:
    """Settings of dataclass `cls` from a config mapping (plus `extra` keys, e.g. a seed from elsewhere)."""
    values = {**values, **extra}
    fields = _field_types(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SettingsError(f"unknown {cls.__name__} settings {[_path + k for k in unknown]}; known: {sorted(fields)}")
    missing = [name for name in _required(cls) if name not in values]
    if missing:
        raise SettingsError(f"missing {cls.__name__} settings {[_path + k for k in missing]}")
    return cls(**{name: _convert(_path + name, fields[name], value) for name, value in values.items()})


def section(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a config section that settings class `cls` reads (for a section that feeds several classes)."""
    fields = _field_types(cls)
    return {key: value for key, value in values.items() if key in fields}
