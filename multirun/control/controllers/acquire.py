"""The ``acquire`` controller: inject every treated item until it is acquired."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from multirun.control.controllers.base import (
    ControllerBase,
    find_record,
    finite_or_none,
    item_scores,
)
from multirun.control.controllers.decision import ControllerDecision
from multirun.control.controllers.options import (
    Option,
    at_least_one,
    check_in_range,
    check_metric,
    non_negative,
)
from multirun.errors import ConfigError
from multirun.measure.records import EvaluationRecord
from multirun.types import PreparedExperiment

__all__ = ["AcquireController"]


class AcquireController(ControllerBase):
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
    OPTIONS: ClassVar[dict[str, Option]] = {
        "metric": Option(str, help="a per-item monitor metric, e.g. target_probability"),
        "threshold": Option(float, help="score at which an item counts as acquired"),
        "patience": Option(int, 1, at_least_one, "consecutive evaluations at/above threshold"),
        "initial_rate": Option(int, 1, at_least_one, "spans per item per window at first"),
        "max_rate": Option(int, 8, at_least_one, "largest spans per item per window"),
        "escalation": Option(float, 2.0, at_least_one, "rate factor after a window without progress"),
        "min_progress": Option(float, 0.0, non_negative, "score gain that counts as progress"),
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
        check_metric(opts["metric"], metrics_available)
        check_in_range("threshold", opts["threshold"], opts["metric"])
        if opts["initial_rate"] > opts["max_rate"]:
            raise ConfigError(
                f"initial_rate {opts['initial_rate']} exceeds max_rate {opts['max_rate']}",
                key="controller.initial_rate",
            )

    @property
    def acquired_at(self) -> dict[str, int | None]:
        """Treated item id -> evaluation step at which it was acquired (None: not yet)."""
        return {item: st["acquired_at"] for item, st in self.items.items()}

    def decide(
        self, *, step: int, records: Sequence[EvaluationRecord], experiment: PreparedExperiment, num_steps: int
    ) -> ControllerDecision:
        lo, hi = self._begin(step, experiment, num_steps)
        record = find_record(records, self.experiment_name, self.metric)
        scores = item_scores(record)
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
                "best": finite_or_none(items[item]["best"]),
                "next": int(items[item]["next"]),
            }
            for item in self.treated_items
        }
