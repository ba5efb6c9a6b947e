"""Closed-loop controllers: decide, at each evaluation, what to inject in the next window.

A controller turns the monitor records of one evaluation (see
:mod:`multirun.monitor_runner`) into a :class:`ControllerDecision` for its
experiment: how many spans of which treated item (and which of the item's
sequences) go into the half-open step window ``[step, step + window_steps)``.
:func:`multirun.plan.dynamic.place_decision` then places those spans into the shared
occupancy, so they never collide with the static schedule or with each other.

Three controllers are registered in :data:`CONTROLLERS`:

``acquire``
    keeps injecting every treated item that is not yet *acquired* (its per-item
    score of ``metric`` has been ``>= threshold`` for ``patience`` consecutive
    evaluations), raising the item's rate by ``escalation`` after every window in
    which it made no progress (capped at ``max_rate``); an acquired item gets 0
    exposures for the rest of the run and its acquisition step is recorded.
``track``
    the paper's dynamic knowledge-acquisition rule (REFERENCES §2.1): experiment
    value ``v`` against the linear target ``p = start + (target - start) * s / S``,
    halve ``n`` above the band, double it below, ``|Δn| <= max_change``, clamp to
    ``[min_n, max_n]``; then ``n`` sequences are taken from the pool of treated
    sequences at index ``i`` with a *true* modular wrap, ``i <- (i + n) mod N``
    (the reference code returns fewer than ``n`` texts at the pool's end).
``budget``
    ``rate`` spans per treated item per window until the next span would take the
    experiment's dynamically injected tokens over ``max_tokens``; then 0 for good.

Every controller's state is plain JSON (``state_dict``) and a pure function of the
(all-gathered, hence rank-identical) records it was given, so Composer's rank-0
checkpoint restores it exactly on every rank.

Metrics are assumed to grow as the model learns the payload (every registered
monitor reports ``alternative="greater"``).

Example::

    ctl = build_controller("track", {"metric": "target_probability", "target": 0.08},
                           experiment=exp, metrics_available=["target_probability"],
                           window_steps=100, num_steps=1000)
    decision = ctl.decide(step=100, records=records, experiment=exp, num_steps=1000)
    decision.window, sum(decision.exposures.values())   # ((100, 200), 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from multirun.errors import ConfigError, ResumeError
from multirun.measure.records import EffectRecord, EvaluationRecord
from multirun.types import PreparedExperiment

__all__ = [
    "CONTROLLERS",
    "AcquireController",
    "BudgetController",
    "Controller",
    "ControllerDecision",
    "TrackController",
    "acquisition_record",
    "build_controller",
    "exposures_to_acquisition",
    "metric_range",
    "treated_pool",
]


# ------------------------------------------------------------------ decision


@dataclass
class ControllerDecision:
    """What one controller decided at one evaluation.

    Attributes:
        step: evaluation step (completed steps) at which it was taken.
        experiment: the experiment's name.
        controller: the controller's name.
        window: half-open step range ``[step, step + window_steps)`` clipped to the
            run; the exposures go there. Empty (``lo == hi``) at the run's end.
        exposures: treated item id -> number of spans to place in the window
            (0 = do not inject it in this window; listed for every treated item).
        sequences: item id -> the experiment-wide sequence indices (indices into
            ``seq_lengths``) to inject, ``len == exposures[item]``.
        info: plain JSON (metric values, targets, acquired items, rates, ...) for
            ``controller.jsonl`` and the logger.

    Example:
        >>> d = ControllerDecision(3, "facts", "budget", (3, 5), {"a": 1}, {"a": [0]}, {"tokens": 8})
        >>> ControllerDecision.from_dict(d.to_dict()) == d
        True
    """

    step: int
    experiment: str
    controller: str
    window: tuple[int, int]
    exposures: dict[str, int]
    sequences: dict[str, list[int]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_spans(self) -> int:
        """Total spans requested."""
        return int(sum(self.exposures.values()))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the decision log in the checkpoint and ``controller.jsonl``)."""
        return {
            "step": int(self.step),
            "experiment": self.experiment,
            "controller": self.controller,
            "window": [int(self.window[0]), int(self.window[1])],
            "exposures": {str(k): int(v) for k, v in self.exposures.items()},
            "sequences": {str(k): [int(s) for s in v] for k, v in self.sequences.items()},
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ControllerDecision":
        """Inverse of :meth:`to_dict`; raises :class:`ResumeError` on a malformed entry."""
        try:
            lo, hi = (int(x) for x in d["window"])
            return cls(
                step=int(d["step"]),
                experiment=str(d["experiment"]),
                controller=str(d["controller"]),
                window=(lo, hi),
                exposures={str(k): int(v) for k, v in d["exposures"].items()},
                sequences={str(k): [int(s) for s in v] for k, v in d["sequences"].items()},
                info=dict(d.get("info", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ResumeError(f"malformed controller decision {dict(d)!r:.200}: {exc!r}", key="controller_decisions") from None

    def scalars(self) -> dict[str, float | int | bool]:
        """The top-level numeric and boolean entries of ``info`` (for the logger and plots)."""
        return {k: v for k, v in self.info.items() if isinstance(v, (bool, int, float))}

    def log_record(self, *, placed: int, unplaced: int, tokens: int) -> dict[str, Any]:
        """One line of ``controller.jsonl``.

        ``decision`` and ``state`` hold only scalars, so the report plots a handful
        of series per experiment; ``info``, ``exposures`` and ``window`` keep the detail.
        """
        return {
            "step": int(self.step),
            "experiment": self.experiment,
            "controller": self.controller,
            "window": [int(self.window[0]), int(self.window[1])],
            "decision": {"spans": self.num_spans, "tokens": int(tokens), "placed": int(placed), "unplaced": int(unplaced)},
            "state": self.scalars(),
            "exposures": {str(k): int(v) for k, v in self.exposures.items()},
            "info": self.info,
        }


# ------------------------------------------------------------------ protocol


@runtime_checkable
class Controller(Protocol):
    """A closed-loop controller of one experiment (see the module docstring)."""

    name: str

    def decide(
        self, *, step: int, records: Sequence[EvaluationRecord], experiment: PreparedExperiment, num_steps: int
    ) -> ControllerDecision:
        """The exposures for ``[step, step + window)`` given this evaluation's records."""
        ...

    def state_dict(self) -> dict:
        """Plain types only, identical on every rank."""
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


# ------------------------------------------------------------------ helpers


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


def treated_pool(experiment: PreparedExperiment) -> np.ndarray:
    """Sequence indices of all treated items' sequences, interleaved across items.

    Order: the first sequence of every treated item (in item order), then every
    item's second one, and so on. Consecutive pool entries therefore cycle over the
    items: a window of ``n`` sequences covers the items evenly instead of spending
    thousands of steps on the first item's paraphrases (a payload lists them by item).

    Example (items a: sequences 0, 1, 2; b: sequences 3, 4)::

        treated_pool(exp).tolist()   # [0, 3, 1, 4, 2]
    """
    treated = np.asarray(experiment.treated, dtype=bool)
    per_item = [seqs for seqs, t in zip(_item_sequences(experiment), treated) if t]
    if not per_item:
        return np.empty(0, np.int64)
    seqs = np.concatenate(per_item)
    item = np.concatenate([np.full(s.size, k, np.int64) for k, s in enumerate(per_item)])
    rank = np.concatenate([np.arange(s.size, dtype=np.int64) for s in per_item])
    return seqs[np.lexsort((item, rank))].astype(np.int64)


def _item_sequences(experiment: PreparedExperiment) -> list[np.ndarray]:
    """Per item index: its sequence indices, ascending."""
    seq_items = np.asarray(experiment.seq_items, dtype=np.int64)
    order = np.argsort(seq_items, kind="stable")
    bounds = np.searchsorted(seq_items[order], np.arange(len(experiment.item_ids) + 1))
    return [order[bounds[i] : bounds[i + 1]].astype(np.int64) for i in range(len(experiment.item_ids))]


def _find_record(records: Sequence[EvaluationRecord], experiment: str, metric: str) -> EffectRecord | None:
    """This evaluation's whole-experiment record of ``metric`` (None if absent or failed)."""
    found = None
    for r in records:
        if isinstance(r, EffectRecord) and r.experiment == experiment and r.metric == metric and r.group is None:
            found = r
    return found


def _item_scores(record: EffectRecord | None) -> dict[str, float]:
    """Item id -> finite score from a record's per-item scores."""
    return {} if record is None else record.item_scores()


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------ options

_REQUIRED = object()


@dataclass(frozen=True)
class _Option:
    kind: type  # int, float or str
    default: Any = _REQUIRED
    check: Callable[[Any], str | None] | None = None  # returns an error message or None
    help: str = ""


def _positive(x: float) -> str | None:
    return None if x > 0 else "must be positive"


def _at_least_one(x: float) -> str | None:
    return None if x >= 1 else "must be >= 1"


def _non_negative(x: float) -> str | None:
    return None if x >= 0 else "must be >= 0"


def _parse_options(schema: Mapping[str, _Option], options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(schema))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; known: {sorted(schema)}", key=f"controller.{unknown[0]}")
    out: dict[str, Any] = {}
    for key, opt in schema.items():
        if key not in options:
            if opt.default is _REQUIRED:
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


def _check_metric(metric: str, metrics_available: Sequence[str]) -> None:
    if metric not in metrics_available:
        known = sorted(metrics_available)
        why = f"the monitor reports {known}" if known else "the experiment has no monitor metrics (enable its monitor)"
        raise ConfigError(f"unknown metric {metric!r}: {why}", key="controller.metric")


def _check_in_range(key: str, value: float, metric: str) -> None:
    lo, hi = metric_range(metric)
    if not (lo <= value <= hi):
        raise ConfigError(f"{value!r} is outside the range [{lo}, {hi}] of metric {metric!r}", key=f"controller.{key}")


# ------------------------------------------------------------------ base


class _ControllerBase:
    """Shared plumbing: experiment identity, window clipping, step order, state checks."""

    name: ClassVar[str]
    OPTIONS: ClassVar[dict[str, _Option]]

    def __init__(self, experiment: PreparedExperiment, *, window_steps: int, num_steps: int) -> None:
        self.experiment_name = experiment.name
        self.item_ids = list(experiment.item_ids)
        self.treated = np.asarray(experiment.treated, dtype=bool)
        self.treated_items = [i for i, t in zip(self.item_ids, self.treated) if t]
        self.window_steps = int(window_steps)
        self.num_steps = int(num_steps)
        self._item_seqs = _item_sequences(experiment)
        self._index = {item: k for k, item in enumerate(self.item_ids)}
        self.last_step: int | None = None

    def seqs_of(self, item: str) -> np.ndarray:
        return self._item_seqs[self._index[item]]

    def _begin(self, step: int, experiment: PreparedExperiment, num_steps: int) -> tuple[int, int]:
        """Validate a decide call; return its clipped window."""
        if experiment.name != self.experiment_name:
            raise ValueError(f"controller of {self.experiment_name!r} asked to decide for {experiment.name!r}")
        if int(num_steps) != self.num_steps:
            raise ValueError(f"controller built for {self.num_steps} steps, called with num_steps={num_steps}")
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        # Deciding twice for one evaluation would count its hits twice (wiring bug).
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"{self.name} controller of {self.experiment_name!r}: step {step} <= last decision step {self.last_step}")
        self.last_step = step
        lo = min(step, self.num_steps)
        return lo, min(step + self.window_steps, self.num_steps)

    def _decision(self, step: int, window: tuple[int, int], chosen: Mapping[str, Sequence[int]], info: dict) -> ControllerDecision:
        sequences = {item: [int(s) for s in chosen.get(item, ())] for item in self.treated_items}
        return ControllerDecision(
            step=int(step), experiment=self.experiment_name, controller=self.name, window=window,
            exposures={item: len(seqs) for item, seqs in sequences.items()}, sequences=sequences, info=info,
        )

    def _base_state(self) -> dict[str, Any]:
        return {"controller": self.name, "experiment": self.experiment_name, "last_step": self.last_step}

    def _load_base(self, state: Mapping[str, Any]) -> None:
        if state.get("controller") != self.name or state.get("experiment") != self.experiment_name:
            raise ResumeError(
                f"checkpoint holds {state.get('controller')!r} state of {state.get('experiment')!r}, "
                f"expected {self.name!r} of {self.experiment_name!r}",
                key="controller",
            )
        last = state.get("last_step")
        self.last_step = None if last is None else int(last)

    def _check_items(self, items: Mapping[str, Any]) -> None:
        if sorted(items) != sorted(self.treated_items):
            raise ResumeError(
                f"checkpoint's controller state of {self.experiment_name!r} covers other treated items "
                f"({len(items)} vs {len(self.treated_items)}); resume with the original payload",
                key="controller",
            )


# ------------------------------------------------------------------ acquire


class AcquireController(_ControllerBase):
    """Inject every treated item until it is acquired, escalating stalled items.

    Per treated item the state holds ``hits`` (consecutive evaluations with score
    ``>= threshold``), ``acquired_at`` (evaluation step, or None), ``rate`` (spans
    per window), ``best`` (best score so far) and ``next`` (round-robin pointer into
    the item's sequences, e.g. paraphrases).

    At each evaluation, for each item not yet acquired: a score ``>= threshold``
    adds a hit, anything else (a lower or missing score) resets the hits; ``patience``
    hits in a row mark it acquired at this step (0 exposures from now on). An item
    that was scored before and now neither reaches the threshold nor beats its best
    score by more than ``min_progress`` made no progress over the last window:
    ``rate <- min(max_rate, ceil(rate * escalation))``.
    """

    name: ClassVar[str] = "acquire"
    OPTIONS: ClassVar[dict[str, _Option]] = {
        "metric": _Option(str, help="a per-item monitor metric, e.g. target_probability"),
        "threshold": _Option(float, help="score at which an item counts as acquired"),
        "patience": _Option(int, 1, _at_least_one, "consecutive evaluations at/above threshold"),
        "initial_rate": _Option(int, 1, _at_least_one, "spans per item per window at first"),
        "max_rate": _Option(int, 8, _at_least_one, "largest spans per item per window"),
        "escalation": _Option(float, 2.0, _at_least_one, "rate factor after a window without progress"),
        "min_progress": _Option(float, 0.0, _non_negative, "score gain that counts as progress"),
    }

    def __init__(
        self,
        experiment: PreparedExperiment,
        *,
        metric: str,
        threshold: float,
        patience: int = 1,
        initial_rate: int = 1,
        max_rate: int = 8,
        escalation: float = 2.0,
        min_progress: float = 0.0,
        window_steps: int,
        num_steps: int,
    ) -> None:
        super().__init__(experiment, window_steps=window_steps, num_steps=num_steps)
        self.metric, self.threshold, self.patience = metric, float(threshold), int(patience)
        self.initial_rate, self.max_rate = int(initial_rate), int(max_rate)
        self.escalation, self.min_progress = float(escalation), float(min_progress)
        self.items: dict[str, dict[str, Any]] = {
            item: {"hits": 0, "acquired_at": None, "rate": self.initial_rate, "best": None, "next": 0}
            for item in self.treated_items
        }

    @classmethod
    def validate(cls, opts: dict[str, Any], metrics_available: Sequence[str]) -> None:
        _check_metric(opts["metric"], metrics_available)
        _check_in_range("threshold", opts["threshold"], opts["metric"])
        if opts["initial_rate"] > opts["max_rate"]:
            raise ConfigError(f"initial_rate {opts['initial_rate']} exceeds max_rate {opts['max_rate']}", key="controller.initial_rate")

    @property
    def acquired_at(self) -> dict[str, int | None]:
        """Treated item id -> evaluation step at which it was acquired (None: not yet)."""
        return {item: st["acquired_at"] for item, st in self.items.items()}

    def decide(self, *, step: int, records: Sequence[EvaluationRecord], experiment: PreparedExperiment, num_steps: int) -> ControllerDecision:
        lo, hi = self._begin(step, experiment, num_steps)
        record = _find_record(records, self.experiment_name, self.metric)
        scores = _item_scores(record)
        chosen: dict[str, list[int]] = {}
        newly: list[str] = []
        escalated: list[str] = []
        for item, st in self.items.items():
            if st["acquired_at"] is not None:
                continue
            score = scores.get(item)
            if score is None:
                st["hits"] = 0  # acquisition must be seen in consecutive evaluations
            else:
                hit = score >= self.threshold
                st["hits"] = st["hits"] + 1 if hit else 0
                stalled = st["best"] is not None and not hit and not (score > st["best"] + self.min_progress)
                st["best"] = score if st["best"] is None else max(st["best"], score)
                if st["hits"] >= self.patience:
                    st["acquired_at"] = int(step)
                    newly.append(item)
                    continue
                if stalled:
                    rate = min(self.max_rate, math.ceil(st["rate"] * self.escalation))
                    if rate != st["rate"]:
                        st["rate"] = rate
                        escalated.append(item)
            seqs = self.seqs_of(item)
            if hi > lo and seqs.size:
                take = (st["next"] + np.arange(st["rate"])) % seqs.size
                chosen[item] = seqs[take].tolist()
                st["next"] = int((st["next"] + st["rate"]) % seqs.size)
        acquired = {item: st["acquired_at"] for item, st in self.items.items() if st["acquired_at"] is not None}
        treated_scores = [scores[i] for i in self.treated_items if i in scores]
        info = {
            "metric": self.metric,
            "threshold": self.threshold,
            "evaluated": record is not None,
            "mean_score": float(np.mean(treated_scores)) if treated_scores else None,
            "acquired": len(acquired),
            "remaining": len(self.items) - len(acquired),
            "done": len(acquired) == len(self.items),
            "spans": int(sum(len(v) for v in chosen.values())),
            "newly_acquired": newly,
            "escalated": escalated,
            "acquired_at": acquired,
            "rates": {item: st["rate"] for item, st in self.items.items() if st["acquired_at"] is None},
        }
        return self._decision(step, (lo, hi), chosen, info)

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "items": {item: dict(st) for item, st in self.items.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._load_base(state)
        items = state.get("items", {})
        self._check_items(items)
        self.items = {
            item: {
                "hits": int(items[item]["hits"]),
                "acquired_at": None if items[item]["acquired_at"] is None else int(items[item]["acquired_at"]),
                "rate": int(items[item]["rate"]),
                "best": _finite_or_none(items[item]["best"]),
                "next": int(items[item]["next"]),
            }
            for item in self.treated_items
        }


# ------------------------------------------------------------------ track


class TrackController(_ControllerBase):
    """The paper's dynamic control of how many sequences to inject per window.

    Value ``v``: mean over treated items of the per-item ``metric`` score (option
    ``value: item_mean``), or the record's ``treated_mean`` (``value: treated_mean``).
    Target ``p = start_value + (target - start_value) * s / S`` (``start_value`` 0:
    the paper's ``p* s / S``). Only when ``s > 0`` and ``v`` is known, with ``n_prev = n``:
    ``v > p + band|p|`` halves ``n`` (``n // 2``), ``v < p - band|p|`` doubles it, the
    band keeps it; then ``|n - n_prev| <= max_change`` and ``n`` is clamped to
    ``[min_n, max_n]``. (``band|p|`` equals the paper's 1.05p / 0.95p for ``p >= 0``
    and keeps the band's meaning for negative metrics such as log-probabilities.)

    Selection: ``n`` entries of :func:`treated_pool` from index ``i`` with a true
    modular wrap (an ``n`` larger than the pool wraps more than once), then
    ``i <- (i + n) mod N``. State ``(n, i)`` plus the last ``v`` and ``p``.
    """

    name: ClassVar[str] = "track"
    OPTIONS: ClassVar[dict[str, _Option]] = {
        "metric": _Option(str, help="a per-item monitor metric, e.g. target_probability"),
        "target": _Option(float, help="target value p* at the end of the run"),
        "start_value": _Option(float, 0.0, None, "target at step 0 (linear ramp to target)"),
        "value": _Option(str, "item_mean", None, "item_mean or treated_mean"),
        "band": _Option(float, 0.05, None, "relative half-width of the no-change band"),
        "max_change": _Option(int, 256, _at_least_one, "largest |n - n_prev| per decision"),
        "min_n": _Option(int, 1, _at_least_one, "smallest n"),
        "max_n": _Option(int, 8192, _at_least_one, "largest n"),
        "initial_n": _Option(int, None, None, "n of the first window (default min_n)"),
    }
    VALUES: ClassVar[tuple[str, ...]] = ("item_mean", "treated_mean")

    def __init__(
        self,
        experiment: PreparedExperiment,
        *,
        metric: str,
        target: float,
        start_value: float = 0.0,
        value: str = "item_mean",
        band: float = 0.05,
        max_change: int = 256,
        min_n: int = 1,
        max_n: int = 8192,
        initial_n: int | None = None,
        window_steps: int,
        num_steps: int,
    ) -> None:
        super().__init__(experiment, window_steps=window_steps, num_steps=num_steps)
        self.metric, self.target, self.start_value, self.value_kind = metric, float(target), float(start_value), value
        self.band, self.max_change, self.min_n, self.max_n = float(band), int(max_change), int(min_n), int(max_n)
        self.pool = treated_pool(experiment)
        self.n = int(min_n if initial_n is None else initial_n)
        self.i = 0
        self.value: float | None = None
        self.target_now: float | None = None

    @classmethod
    def validate(cls, opts: dict[str, Any], metrics_available: Sequence[str]) -> None:
        _check_metric(opts["metric"], metrics_available)
        _check_in_range("target", opts["target"], opts["metric"])
        _check_in_range("start_value", opts["start_value"], opts["metric"])
        if opts["value"] not in cls.VALUES:
            raise ConfigError(f"must be one of {list(cls.VALUES)}, got {opts['value']!r}", key="controller.value")
        if not (0.0 <= opts["band"] < 1.0):
            raise ConfigError(f"must be in [0, 1), got {opts['band']!r}", key="controller.band")
        if opts["min_n"] > opts["max_n"]:
            raise ConfigError(f"min_n {opts['min_n']} exceeds max_n {opts['max_n']}", key="controller.min_n")
        init = opts["initial_n"]
        if init is not None and not (opts["min_n"] <= init <= opts["max_n"]):
            raise ConfigError(f"must lie in [min_n, max_n] = [{opts['min_n']}, {opts['max_n']}], got {init}", key="controller.initial_n")

    def target_at(self, step: int) -> float:
        """The linear target ``start + (target - start) * s / S`` (held at ``target`` after ``S``)."""
        frac = min(int(step), self.num_steps) / self.num_steps
        return self.start_value + (self.target - self.start_value) * frac

    def update(self, n: int, v: float, p: float) -> tuple[int, str]:
        """The paper's rule for one evaluation: ``(new n, action)``."""
        tol = self.band * abs(p)
        if v > p + tol:
            new, action = n // 2, "halve"
        elif v < p - tol:
            new, action = 2 * n, "double"
        else:
            new, action = n, "hold"
        new = min(max(new, n - self.max_change), n + self.max_change)
        return min(max(new, self.min_n), self.max_n), action

    def _value(self, record: EffectRecord | None) -> float | None:
        if record is None:
            return None
        if self.value_kind == "treated_mean":
            return _finite_or_none(record.effect.treated_mean)
        scores = _item_scores(record)
        vals = [scores[i] for i in self.treated_items if i in scores]
        return float(np.mean(vals)) if vals else None

    def decide(self, *, step: int, records: Sequence[EvaluationRecord], experiment: PreparedExperiment, num_steps: int) -> ControllerDecision:
        lo, hi = self._begin(step, experiment, num_steps)
        v = self._value(_find_record(records, self.experiment_name, self.metric))
        p = self.target_at(step)
        n_prev = self.n
        if step == 0:
            action = "initial"
        elif v is None:
            action = "no_value"  # a failed or missing evaluation keeps n
        else:
            self.n, action = self.update(self.n, v, p)
        take = self.n if hi > lo else 0
        i_before = self.i
        picked = self.pool[(i_before + np.arange(take)) % self.pool.size] if take else np.empty(0, np.int64)
        self.i = int((i_before + take) % self.pool.size)
        self.value, self.target_now = v, p
        item_of = {int(s): self.item_ids[int(experiment.seq_items[s])] for s in np.unique(picked)}
        chosen: dict[str, list[int]] = {}
        for s in picked.tolist():
            chosen.setdefault(item_of[s], []).append(s)
        info = {
            "metric": self.metric,
            "value": v,
            "target": p,
            "n": self.n,
            "n_prev": n_prev,
            "action": action,
            "spans": int(take),
            "pool_index": i_before,
            "next_pool_index": self.i,
            "pool_size": int(self.pool.size),
        }
        return self._decision(step, (lo, hi), chosen, info)

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "n": self.n, "i": self.i, "value": self.value, "target": self.target_now,
                "pool_size": int(self.pool.size)}

    def load_state_dict(self, state: dict) -> None:
        self._load_base(state)
        if int(state.get("pool_size", -1)) != self.pool.size:
            raise ResumeError(
                f"checkpoint's track state of {self.experiment_name!r} has a pool of {state.get('pool_size')} "
                f"sequences, this run {self.pool.size}", key="controller",
            )
        self.n, self.i = int(state["n"]), int(state["i"])
        self.value, self.target_now = _finite_or_none(state.get("value")), _finite_or_none(state.get("target"))


# ------------------------------------------------------------------ budget


class BudgetController(_ControllerBase):
    """``rate`` spans per treated item per window until ``max_tokens`` would be exceeded.

    Spans are requested round-robin (every item's first span, then every item's
    second, ...), each item cycling through its sequences. The tokens of every
    requested span are added to the state; the first span that would take the
    total over ``max_tokens`` is not requested, and the controller stops for good.
    Requested spans that could not be placed still count, so the budget is never
    exceeded by what was trained on.
    """

    name: ClassVar[str] = "budget"
    OPTIONS: ClassVar[dict[str, _Option]] = {
        "max_tokens": _Option(int, help="most tokens this experiment may inject dynamically", check=_positive),
        "rate": _Option(int, 1, _at_least_one, "spans per item per window"),
    }

    def __init__(self, experiment: PreparedExperiment, *, max_tokens: int, rate: int = 1, window_steps: int, num_steps: int) -> None:
        super().__init__(experiment, window_steps=window_steps, num_steps=num_steps)
        self.max_tokens, self.rate = int(max_tokens), int(rate)
        self.lengths = np.asarray(experiment.seq_lengths, dtype=np.int64)
        self.tokens = 0
        self.exhausted = False
        self.next: dict[str, int] = {item: 0 for item in self.treated_items}

    @classmethod
    def validate(cls, opts: dict[str, Any], metrics_available: Sequence[str]) -> None:
        pass

    def decide(self, *, step: int, records: Sequence[EvaluationRecord], experiment: PreparedExperiment, num_steps: int) -> ControllerDecision:
        lo, hi = self._begin(step, experiment, num_steps)
        chosen: dict[str, list[int]] = {}
        window_tokens = 0
        if hi > lo and not self.exhausted:
            for r in range(self.rate):
                for item in self.treated_items:
                    seqs = self.seqs_of(item)
                    if not seqs.size:
                        continue
                    s = int(seqs[(self.next[item] + r) % seqs.size])
                    if self.tokens + window_tokens + int(self.lengths[s]) > self.max_tokens:
                        self.exhausted = True
                        break
                    chosen.setdefault(item, []).append(s)
                    window_tokens += int(self.lengths[s])
                if self.exhausted:
                    break
            for item, seqs in chosen.items():
                self.next[item] = (self.next[item] + len(seqs)) % self.seqs_of(item).size
        self.tokens += window_tokens
        info = {
            "tokens": self.tokens,
            "window_tokens": window_tokens,
            "remaining_tokens": self.max_tokens - self.tokens,
            "max_tokens": self.max_tokens,
            "exhausted": self.exhausted,
            "spans": int(sum(len(v) for v in chosen.values())),
        }
        return self._decision(step, (lo, hi), chosen, info)

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "tokens": self.tokens, "exhausted": self.exhausted, "next": dict(self.next)}

    def load_state_dict(self, state: dict) -> None:
        self._load_base(state)
        self._check_items(state.get("next", {}))
        self.tokens, self.exhausted = int(state["tokens"]), bool(state["exhausted"])
        self.next = {item: int(state["next"][item]) for item in self.treated_items}


# ------------------------------------------------------------------ registry

#: Controller classes by name (what ``controller.name`` selects in the YAML).
CONTROLLERS: dict[str, type[_ControllerBase]] = {
    AcquireController.name: AcquireController,
    TrackController.name: TrackController,
    BudgetController.name: BudgetController,
}


def build_controller(
    name: str,
    options: Mapping[str, Any],
    *,
    experiment: PreparedExperiment,
    metrics_available: Sequence[str],
    window_steps: int,
    num_steps: int,
) -> Controller:
    """Validate ``options`` and build the named controller for ``experiment``.

    Raises :class:`~multirun.errors.ConfigError` with ``key="controller.<option>"``
    (``controller.name`` for an unknown controller, ``controller.window`` for a bad
    window, ``controller`` when the experiment has nothing to inject); the caller
    prefixes the experiment's key (``experiments[i].``) and the file.

    Example::

        ctl = build_controller("budget", {"max_tokens": 1000}, experiment=exp,
                               metrics_available=[], window_steps=10, num_steps=100)
    """
    cls = CONTROLLERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown controller {name!r}; known: {sorted(CONTROLLERS)}", key="controller.name")
    if isinstance(window_steps, bool) or not isinstance(window_steps, (int, np.integer)) or window_steps < 1:
        raise ConfigError(f"the decision window must be a positive number of steps, got {window_steps!r}", key="controller.window")
    if window_steps > num_steps:
        raise ConfigError(f"the decision window of {window_steps} steps is longer than the run ({num_steps} steps)", key="controller.window")
    if not isinstance(options, Mapping):
        raise ConfigError(f"options must be a mapping, got {type(options).__name__}", key="controller")
    opts = _parse_options(cls.OPTIONS, options)
    cls.validate(opts, list(metrics_available))
    treated = np.asarray(experiment.treated, dtype=bool)
    seq_items = np.asarray(experiment.seq_items, dtype=np.int64)
    treated_seqs = np.flatnonzero(treated[seq_items]) if seq_items.size else np.empty(0, np.int64)
    if treated_seqs.size == 0:
        raise ConfigError(f"experiment {experiment.name!r} has no treated sequences to inject", key="controller")
    if cls is BudgetController:
        shortest = int(np.asarray(experiment.seq_lengths)[treated_seqs].min())
        if opts["max_tokens"] < shortest:
            raise ConfigError(
                f"max_tokens {opts['max_tokens']} is below the shortest treated sequence ({shortest} tokens): "
                "nothing could ever be injected", key="controller.max_tokens",
            )
    return cls(experiment, **opts, window_steps=int(window_steps), num_steps=int(num_steps))  # type: ignore[arg-type]


# ------------------------------------------------------------------ acquisition from the ledger


def _as_strings(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Dictionary-encoded ledger columns decoded to plain strings."""
    if pa.types.is_dictionary(column.type):
        return column.cast(pa.string())
    return column


def exposures_to_acquisition(
    ledger_table: pa.Table, experiment: str, acquired_at: Mapping[str, int | None]
) -> dict[str, int | None]:
    """Per item: spans of ``experiment``'s item in the ledger with ``step < acquired_at``.

    ``acquired_at`` is an item -> evaluation step map (``AcquireController.acquired_at``);
    an evaluation after ``s`` completed steps has seen exactly the spans of steps
    ``< s``. Items never acquired (None) map to None. ``ledger_table`` is a ledger
    table (``Ledger.open(run_dir).table``) with ``experiment``, ``item`` and ``step``
    columns, dictionary-encoded or plain.

    Example::

        exposures_to_acquisition(Ledger.open(run).table, "facts", {"f0": 200, "f1": None})
        # {'f0': 3, 'f1': None}
    """
    items = [k for k, v in acquired_at.items() if v is not None]
    out: dict[str, int | None] = {k: (0 if v is not None else None) for k, v in acquired_at.items()}
    if not items or ledger_table.num_rows == 0:
        return out
    mask = pc.equal(_as_strings(ledger_table.column("experiment")), pa.scalar(experiment, pa.string()))
    table = ledger_table.filter(mask)
    if table.num_rows == 0:
        return out
    # Position of each row's item among the acquired items (-1: not acquired / not asked for).
    key = pc.fill_null(pc.index_in(_as_strings(table.column("item")), value_set=pa.array(items, pa.string())), -1)
    idx = np.asarray(key.to_numpy(), dtype=np.int64)
    valid = idx >= 0
    steps = table.column("step").to_numpy().astype(np.int64)
    limits = np.array([int(acquired_at[i]) for i in items], dtype=np.int64)  # type: ignore[arg-type]
    before = valid & (steps < limits[np.maximum(idx, 0)])
    counts = np.bincount(idx[before], minlength=len(items))
    for k, item in enumerate(items):
        out[item] = int(counts[k])
    return out


def acquisition_record(
    ledger_table: pa.Table, experiment: str, acquired_at: Mapping[str, int | None]
) -> dict[str, dict[str, int | None]]:
    """The ``acquisition.json`` entry of one experiment, as the report reads it:
    item -> ``{"acquired_at_step", "exposures_to_acquisition"}``."""
    exposures = exposures_to_acquisition(ledger_table, experiment, acquired_at)
    return {
        item: {"acquired_at_step": None if step is None else int(step), "exposures_to_acquisition": exposures[item]}
        for item, step in acquired_at.items()
    }
