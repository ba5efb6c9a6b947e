"""The ``track`` controller: the paper's dynamic knowledge-acquisition rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from multirun.control.controllers.base import (
    ControllerBase,
    find_record,
    finite_or_none,
    item_scores,
    treated_pool,
)
from multirun.control.controllers.decision import ControllerDecision
from multirun.control.controllers.options import (
    Option,
    at_least_one,
    check_in_range,
    check_metric,
)
from multirun.errors import ConfigError, ResumeError
from multirun.measure.records import EffectRecord, EvaluationRecord
from multirun.types import PreparedExperiment

__all__ = ["TrackController"]


class TrackController(ControllerBase):
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
    OPTIONS: ClassVar[dict[str, Option]] = {
        "metric": Option(str, help="a per-item monitor metric, e.g. target_probability"),
        "target": Option(float, help="target value p* at the end of the run"),
        "start_value": Option(float, 0.0, None, "target at step 0 (linear ramp to target)"),
        "value": Option(str, "item_mean", None, "item_mean or treated_mean"),
        "band": Option(float, 0.05, None, "relative half-width of the no-change band"),
        "max_change": Option(int, 256, at_least_one, "largest |n - n_prev| per decision"),
        "min_n": Option(int, 1, at_least_one, "smallest n"),
        "max_n": Option(int, 8192, at_least_one, "largest n"),
        "initial_n": Option(int, None, None, "n of the first window (default min_n)"),
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
        check_metric(opts["metric"], metrics_available)
        check_in_range("target", opts["target"], opts["metric"])
        check_in_range("start_value", opts["start_value"], opts["metric"])
        if opts["value"] not in cls.VALUES:
            raise ConfigError(f"must be one of {list(cls.VALUES)}, got {opts['value']!r}", key="controller.value")
        if not (0.0 <= opts["band"] < 1.0):
            raise ConfigError(f"must be in [0, 1), got {opts['band']!r}", key="controller.band")
        if opts["min_n"] > opts["max_n"]:
            raise ConfigError(f"min_n {opts['min_n']} exceeds max_n {opts['max_n']}", key="controller.min_n")
        init = opts["initial_n"]
        if init is not None and not (opts["min_n"] <= init <= opts["max_n"]):
            raise ConfigError(
                f"must lie in [min_n, max_n] = [{opts['min_n']}, {opts['max_n']}], got {init}",
                key="controller.initial_n",
            )

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
            return finite_or_none(record.effect.treated_mean)
        scores = item_scores(record)
        vals = [scores[i] for i in self.treated_items if i in scores]
        return float(np.mean(vals)) if vals else None

    def decide(
        self, *, step: int, records: Sequence[EvaluationRecord], experiment: PreparedExperiment, num_steps: int
    ) -> ControllerDecision:
        lo, hi = self._begin(step, experiment, num_steps)
        v = self._value(find_record(records, self.experiment_name, self.metric))
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
        return {
            **self._base_state(),
            "n": self.n,
            "i": self.i,
            "value": self.value,
            "target": self.target_now,
            "pool_size": int(self.pool.size),
        }

    def load_state_dict(self, state: dict) -> None:
        self._load_base(state)
        if int(state.get("pool_size", -1)) != self.pool.size:
            raise ResumeError(
                f"checkpoint's track state of {self.experiment_name!r} has a pool of {state.get('pool_size')} "
                f"sequences, this run {self.pool.size}",
                key="controller",
            )
        self.n, self.i = int(state["n"]), int(state["i"])
        self.value, self.target_now = finite_or_none(state.get("value")), finite_or_none(state.get("target"))
