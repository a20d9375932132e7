"""Checks of the configuration's meaning that its JSON schema cannot express (run right after the schema).

The schema checks types and single-value ranges; this module checks values against each other: split fractions
that sum to zero, a reversed HU window or [min, max] range, pyramid settings of different lengths, test runs
that are not trained, and empty strings (an empty path would silently mean the working directory).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

MIN_MAX_PAIRS = [
    ("synthetic", "pixel_spacing_mm"),
    ("synthetic", "nodules_per_patient"),
    ("synthetic", "initial_volume_mm3"),
]


class ConfigError(ValueError):
    """The configuration passes the schema but cannot be meant as written."""


def _get(config: Mapping[str, Any], *keys: str) -> Any:
    value: Any = config
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(key path, string) for every string in the nested config."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _strings(item, f"{where}[{index}]")


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """Every semantic problem of `config` (a schema-valid configuration), as messages naming the key."""
    problems = []
    fractions = _get(config, "splits", "fractions") or {}
    if fractions and sum(fractions.values()) <= 0:
        problems.append(f"splits.fractions {dict(fractions)} sum to 0: no patient could be assigned a split")
    window = _get(config, "patch", "hu_window")
    if window is not None and not window[0] < window[1]:
        problems.append(f"patch.hu_window {list(window)} is not [low, high] with low < high")
    for keys in MIN_MAX_PAIRS:
        pair = _get(config, *keys)
        if pair is not None and pair[0] > pair[1]:
            problems.append(f"{'.'.join(keys)} {list(pair)} is not [min, max] with min <= max")
    method = _get(config, "registration", "method") or {}
    if "shrink_factors" in method and "smoothing_sigmas_mm" in method \
            and len(method["shrink_factors"]) != len(method["smoothing_sigmas_mm"]):
        problems.append(f"registration.method.shrink_factors {method['shrink_factors']} and smoothing_sigmas_mm "
                        f"{method['smoothing_sigmas_mm']} must have one value per pyramid level")
    runs = _get(config, "models", "runs") or {}
    if unknown := sorted(set(_get(config, "evaluation", "test_runs") or []) - set(runs)):
        problems.append(f"evaluation.test_runs names runs that models.runs lacks: {unknown}")
    for where, value in _strings(config, ""):
        if not value.strip():
            problems.append(f"{where} is an empty string (use null for 'not given')")
    return problems


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ConfigError listing every semantic problem of `config`."""
    problems = config_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
