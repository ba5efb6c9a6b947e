"""Typed records of one monitor evaluation, and their ``metrics.jsonl`` form.

:meth:`multirun.measure.runner.MonitorRunner.evaluate` returns one record per result:

:class:`EffectRecord`
    one metric of one experiment (all treated items, or one group of them) against
    the controls: the :class:`~multirun.measure.stats.EffectResult`, Holm's p-value
    when the metric is primary, and the per-item scores (whole-experiment records).
:class:`FailureRecord`
    a monitor that raised; training went on.
:class:`RunMetricRecord`
    a measurement of the run as a whole, such as the held-out loss.

Controllers, the control loop, the logger, the summary, the interaction matrix and
the report take these records. Each has ``to_json()``, the line written to
``metrics.jsonl`` (strict JSON: non-finite numbers are ``null``), and ``from_json``,
its inverse; :func:`record_from_json` tells the three kinds apart. On disk a
run-level metric keeps the experiment name ``"_run"``, which nothing outside this
module needs to know.

Example:
    >>> from multirun.measure.stats import compare_rates
    >>> effect = compare_rates(8, 10, 1, 10, metric="exact_match")
    >>> record = EffectRecord(step=10, when="interval", experiment="quiz", monitor="contamination",
    ...                       group=None, primary=True, effect=effect,
    ...                       items=(ItemScore("q0", True, 1.0), ItemScore("c0", False, 0.0)))
    >>> line = record.to_json()
    >>> line["experiment"], line["metric"], line["items"]
    ('quiz', 'exact_match', [['q0', True, 1.0], ['c0', False, 0.0]])
    >>> record_from_json(line).to_json() == line
    True
    >>> record_from_json({"step": 10, "when": "interval", "experiment": "_run",
    ...                   "metric": "heldout_loss", "value": 3.5})
    RunMetricRecord(step=10, when='interval', metric='heldout_loss', value=3.5)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from multirun.errors import InputError
from multirun.measure.stats import EffectResult
from multirun.run_dir import JsonlRecords, RunDir, read_jsonl_lines

__all__ = [
    "EffectRecord",
    "EvaluationRecord",
    "FailureRecord",
    "ItemScore",
    "RunMetricRecord",
    "effect_records",
    "record_from_json",
    "records_from_json",
]

# The experiment name under which run-level metrics are stored in metrics.jsonl.
_RUN = "_run"

# Keys of an effect record that are not EffectResult fields.
_EFFECT_KEYS = ("step", "when", "experiment", "monitor", "group", "primary", "items")


def _finite(value: Any) -> float | None:
    """A float, or None for NaN, infinities and None (``metrics.jsonl`` has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class ItemScore:
    """One item's score of a metric in one evaluation.

    ``score`` is None when the monitor gave the item no finite score.

    Example:
        >>> ItemScore.from_json(["f0", True, None])
        ItemScore(item='f0', treated=True, score=None)
    """

    item: str
    treated: bool
    score: float | None

    def to_json(self) -> list[Any]:
        return [self.item, self.treated, self.score]

    @classmethod
    def from_json(cls, entry: Sequence[Any]) -> ItemScore:
        item, treated, score = entry
        return cls(item, bool(treated), _finite(score))

    @classmethod
    def of(cls, item_ids: Iterable[str], treated: Iterable[Any], scores: Iterable[Any]) -> tuple[ItemScore, ...]:
        """Per-item scores from parallel sequences (numpy scalars become Python values).

        Example:
            >>> import numpy as np
            >>> ItemScore.of(["a", "b"], np.array([True, False]), np.array([0.5, np.nan]))
            (ItemScore(item='a', treated=True, score=0.5), ItemScore(item='b', treated=False, score=None))
        """
        return tuple(cls(item, bool(t), _finite(s)) for item, t, s in zip(item_ids, treated, scores))


@dataclass(frozen=True)
class EffectRecord:
    """One metric of one experiment in one evaluation: treated items against controls.

    Attributes:
        step: completed training steps at the evaluation.
        when: ``fit_start``, ``interval``, ``fit_end`` (or a caller's label).
        experiment, monitor: whose monitor produced the metric.
        group: None for all treated items, else the group label (e.g. ``"x4"``).
        primary: the metric is primary and ``group`` is None: it is in Holm's family.
        effect: the comparison; its ``p_holm`` is set for primary records.
        items: per-item scores (whole-experiment records), None for group records.
    """

    step: int
    when: str
    experiment: str
    monitor: str
    group: str | None
    primary: bool
    effect: EffectResult
    items: tuple[ItemScore, ...] | None = None

    @property
    def metric(self) -> str:
        return self.effect.metric

    @property
    def p_holm(self) -> float | None:
        """Holm-adjusted p-value (primary records; None otherwise)."""
        return self.effect.p_holm

    def with_p_holm(self, p_holm: float | None) -> EffectRecord:
        return replace(self, effect=replace(self.effect, p_holm=p_holm))

    def item_scores(self) -> dict[str, float]:
        """Item id -> score, for the items with a finite score.

        Example:
            >>> from multirun.measure.stats import compare_means
            >>> r = EffectRecord(0, "interval", "e", "m", None, True, compare_means([1.0], [0.0], metric="s"),
            ...                  items=ItemScore.of(["a", "b", "c"], [True, True, False], [0.5, float("nan"), 0.1]))
            >>> r.item_scores()
            {'a': 0.5, 'c': 0.1}
        """
        return {str(s.item): float(s.score) for s in self.items or () if s.score is not None}

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` line (``items`` only when there are per-item scores)."""
        out: dict[str, Any] = {
            "step": self.step,
            "when": self.when,
            "experiment": self.experiment,
            "monitor": self.monitor,
            "group": self.group,
            "primary": self.primary,
            **self.effect.to_dict(),
        }
        if self.items is not None:
            out["items"] = [s.to_json() for s in self.items]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EffectRecord:
        """Inverse of :meth:`to_json`; also reads ``summary.json``'s effects (no ``items``)."""
        items = data.get("items")
        try:
            return cls(
                step=int(data["step"]),
                when=str(data["when"]),
                experiment=str(data["experiment"]),
                monitor=str(data["monitor"]),
                group=None if data.get("group") is None else str(data["group"]),
                primary=bool(data.get("primary", False)),
                effect=EffectResult.from_dict({k: v for k, v in data.items() if k not in _EFFECT_KEYS}),
                items=None if items is None else tuple(ItemScore.from_json(e) for e in items),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an effect record ({exc!r}): {dict(data)!r:.200}") from None


@dataclass(frozen=True)
class FailureRecord:
    """A monitor that raised at an evaluation (``error`` is the exception's repr).

    Example:
        >>> r = FailureRecord(10, "interval", "facts", "knowledge", "RuntimeError('gone')")
        >>> FailureRecord.from_json(r.to_json()) == r
        True
    """

    step: int
    when: str
    experiment: str
    monitor: str
    error: str

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "when": self.when,
            "experiment": self.experiment,
            "monitor": self.monitor,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FailureRecord:
        try:
            return cls(
                int(data["step"]), str(data["when"]), str(data["experiment"]), str(data["monitor"]), str(data["error"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a failure record ({exc!r}): {dict(data)!r:.200}") from None


@dataclass(frozen=True)
class RunMetricRecord:
    """A metric of the whole run at an evaluation (``heldout_loss``: nats per token).

    Example:
        >>> r = RunMetricRecord(10, "interval", "heldout_loss", 3.25)
        >>> r.to_json()
        {'step': 10, 'when': 'interval', 'experiment': '_run', 'metric': 'heldout_loss', 'value': 3.25}
    """

    step: int
    when: str
    metric: str
    value: float

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "when": self.when, "experiment": _RUN, "metric": self.metric, "value": self.value}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunMetricRecord:
        try:
            if data["experiment"] != _RUN:
                raise ValueError(f"experiment is {data['experiment']!r}")
            value = data["value"]
            return cls(
                int(data["step"]), str(data["when"]), str(data["metric"]), math.nan if value is None else float(value)
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a run metric record ({exc!r}): {dict(data)!r:.200}") from None


EvaluationRecord = EffectRecord | FailureRecord | RunMetricRecord
"""Any record of an evaluation."""


def record_from_json(data: Mapping[str, Any]) -> EvaluationRecord:
    """Parse one ``metrics.jsonl`` line (a dict) into its record; ValueError if it is none.

    Example:
        >>> type(record_from_json({"step": 0, "when": "fit_start", "experiment": "facts",
        ...                        "monitor": "knowledge", "error": "ValueError()"})).__name__
        'FailureRecord'
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if "error" in data:
        return FailureRecord.from_json(data)
    if data.get("experiment") == _RUN:
        return RunMetricRecord.from_json(data)
    return EffectRecord.from_json(data)


def records_from_json(lines: Iterable[Mapping[str, Any]]) -> list[EvaluationRecord]:
    """:func:`record_from_json` of every line."""
    return [record_from_json(line) for line in lines]


def effect_records(records: Iterable[EvaluationRecord]) -> list[EffectRecord]:
    """The effect records among ``records`` (no failures, no run-level metrics)."""
    return [r for r in records if isinstance(r, EffectRecord)]


def read_records(run_dir: str | Path) -> list[EvaluationRecord]:
    """A run's ``metrics.jsonl``, typed and verified (:func:`~multirun.run_dir.read_jsonl_lines`:
    a torn last line of a killed run is dropped with a warning; a damaged line is a
    CorruptionError); a JSON line that is not a record is an InputError naming the file and line."""
    return records_from_lines(read_jsonl_lines(RunDir(run_dir).metrics))


def records_from_lines(content: JsonlRecords) -> list[EvaluationRecord]:
    """:func:`record_from_json` of every line read by :func:`~multirun.run_dir.read_jsonl_lines`.

    Raises:
        InputError: a line that is not a monitor record, naming the file and line.
    """
    out = []
    for number, data in content.lines:
        try:
            out.append(record_from_json(data))
        except ValueError as exc:
            raise InputError(f"not a monitor record: {exc}", file=content.path, line=number) from None
    return out
