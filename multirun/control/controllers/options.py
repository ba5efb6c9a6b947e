"""Controller options: a typed schema per controller, parsed from the YAML, and the
value ranges of monitor metrics that thresholds and targets must respect."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from multirun.errors import ConfigError

__all__ = [
    "REQUIRED",
    "Option",
    "at_least_one",
    "check_in_range",
    "check_metric",
    "metric_range",
    "non_negative",
    "parse_options",
    "positive",
]


def metric_range(metric: str) -> tuple[float, float]:
    """Closed range of a metric's values, from its name; thresholds must lie inside.

    ``*probability``, ``*exact_match``, ``*accuracy``, ``*_rate``, ``match_fraction``:
    ``[0, 1]``; ``*logprob``: ``(-inf, 0]``; anything else: the real line.

    Example:
        >>> metric_range("target_probability"), metric_range("text_logprob")
        ((0.0, 1.0), (-inf, 0.0))
    """
    if metric.endswith(("probability", "exact_match", "accuracy", "_rate")) or metric == "match_fraction":
        return (0.0, 1.0)
    if metric.endswith("logprob"):
        return (-math.inf, 0.0)
    return (-math.inf, math.inf)


REQUIRED: Any = object()
"""Default of an option that must be given."""


@dataclass(frozen=True)
class Option:
    """One controller option: its type (``int``, ``float`` or ``str``), default
    (:data:`REQUIRED` when it must be given), a check returning an error message or
    None, and a help text for error messages.

    Example:
        >>> parse_options({"rate": Option(int, 1, at_least_one, "spans per window")}, {"rate": 2.0})
        {'rate': 2}
    """

    kind: type  # int, float or str
    default: Any = REQUIRED
    check: Callable[[Any], str | None] | None = None  # returns an error message or None
    help: str = ""


def positive(x: float) -> str | None:
    return None if x > 0 else "must be positive"


def at_least_one(x: float) -> str | None:
    return None if x >= 1 else "must be >= 1"


def non_negative(x: float) -> str | None:
    return None if x >= 0 else "must be >= 0"


def parse_options(schema: Mapping[str, Option], options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked against ``schema``, defaults filled in; a
    :class:`~multirun.errors.ConfigError` with ``key="controller.<option>"`` otherwise.

    Example:
        >>> parse_options({"rate": Option(int, 1)}, {"rat": 2})
        Traceback (most recent call last):
        ...
        multirun.errors.ConfigError: controller.rat: unknown option 'rat'; known: ['rate']
    """
    unknown = sorted(set(options) - set(schema))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; known: {sorted(schema)}", key=f"controller.{unknown[0]}")
    out: dict[str, Any] = {}
    for key, opt in schema.items():
        if key not in options:
            if opt.default is REQUIRED:
                raise ConfigError(f"required option missing ({opt.help})", key=f"controller.{key}")
            out[key] = opt.default
            continue
        value = options[key]
        if opt.kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"must be a string, got {value!r}", key=f"controller.{key}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"must be a number, got {value!r}", key=f"controller.{key}")
        elif opt.kind is int:
            if float(value) != int(value):
                raise ConfigError(f"must be an integer, got {value!r}", key=f"controller.{key}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"must be finite, got {value!r}", key=f"controller.{key}")
        if opt.check is not None:
            problem = opt.check(value)
            if problem:
                raise ConfigError(f"{problem}, got {value!r}", key=f"controller.{key}")
        out[key] = value
    return out


def check_metric(metric: str, metrics_available: Sequence[str]) -> None:
    if metric not in metrics_available:
        known = sorted(metrics_available)
        why = f"the monitor reports {known}" if known else "the experiment has no monitor metrics (enable its monitor)"
        raise ConfigError(f"unknown metric {metric!r}: {why}", key="controller.metric")


def check_in_range(key: str, value: float, metric: str) -> None:
    lo, hi = metric_range(metric)
    if not (lo <= value <= hi):
        raise ConfigError(f"{value!r} is outside the range [{lo}, {hi}] of metric {metric!r}", key=f"controller.{key}")
