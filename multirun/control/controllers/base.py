"""What every controller shares: the :class:`Controller` protocol the framework relies
on, :class:`ControllerBase` (window clipping, step order, state checks), the pool of
treated sequences, and reading an evaluation's records."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from multirun.control.controllers.decision import ControllerDecision
from multirun.control.controllers.options import Option
from multirun.errors import ResumeError
from multirun.measure.records import EffectRecord, EvaluationRecord
from multirun.types import PreparedExperiment

__all__ = [
    "Controller",
    "ControllerBase",
    "find_record",
    "finite_or_none",
    "item_scores",
    "item_sequences",
    "treated_pool",
]


@runtime_checkable
class Controller(Protocol):
    """What the framework needs of a closed-loop controller of one experiment.

    A controller class has a ``name``, an option schema ``OPTIONS`` (parsed by
    :func:`~multirun.control.controllers.options.parse_options`), two validation
    classmethods, and is built as ``cls(experiment, **options, window_steps=...,
    num_steps=...)`` by :func:`~multirun.control.controllers.registry.build_controller`.
    Its state is plain JSON and a pure function of the records it was given, so a
    checkpoint restores it on every rank. Subclassing :class:`ControllerBase` gives
    all but ``OPTIONS``, ``decide``, ``state_dict`` and ``load_state_dict``.
    """

    name: ClassVar[str]
    OPTIONS: ClassVar[dict[str, Option]]

    @classmethod
    def validate(cls, opts: dict[str, Any], metrics_available: Sequence[str]) -> None:
        """Check parsed options against each other and the monitor's metrics
        (:class:`~multirun.errors.ConfigError` with ``key="controller.<option>"``)."""
        ...

    @classmethod
    def validate_experiment(cls, opts: dict[str, Any], experiment: PreparedExperiment) -> None:
        """Check parsed options against the experiment (it has treated sequences)."""
        ...

    @property
    def acquired_at(self) -> Mapping[str, int | None] | None:
        """Treated item -> evaluation step of acquisition (None: not yet), for controllers
        that acquire items; None for the others. The run stops injecting for
        ``interaction.after: acquired`` and writes ``acquisition.json`` from it."""
        ...

    def decide(
        self, *, step: int, records: Sequence[EvaluationRecord], experiment: PreparedExperiment, num_steps: int
    ) -> ControllerDecision:
        """The exposures for ``[step, step + window)`` given this evaluation's records."""
        ...

    def state_dict(self) -> dict:
        """Plain types only, identical on every rank."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


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
    per_item = [seqs for seqs, t in zip(item_sequences(experiment), treated) if t]
    if not per_item:
        return np.empty(0, np.int64)
    seqs = np.concatenate(per_item)
    item = np.concatenate([np.full(s.size, k, np.int64) for k, s in enumerate(per_item)])
    rank = np.concatenate([np.arange(s.size, dtype=np.int64) for s in per_item])
    return seqs[np.lexsort((item, rank))].astype(np.int64)


def item_sequences(experiment: PreparedExperiment) -> list[np.ndarray]:
    """Per item index: its sequence indices, ascending."""
    seq_items = np.asarray(experiment.seq_items, dtype=np.int64)
    order = np.argsort(seq_items, kind="stable")
    bounds = np.searchsorted(seq_items[order], np.arange(len(experiment.item_ids) + 1))
    return [order[bounds[i] : bounds[i + 1]].astype(np.int64) for i in range(len(experiment.item_ids))]


def find_record(records: Sequence[EvaluationRecord], experiment: str, metric: str) -> EffectRecord | None:
    """This evaluation's whole-experiment record of ``metric`` (None if absent or failed)."""
    found = None
    for r in records:
        if isinstance(r, EffectRecord) and r.experiment == experiment and r.metric == metric and r.group is None:
            found = r
    return found


def item_scores(record: EffectRecord | None) -> dict[str, float]:
    """Item id -> finite score from a record's per-item scores."""
    return {} if record is None else record.item_scores()


def finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class ControllerBase:
    """Shared plumbing: experiment identity, window clipping, step order, state checks."""

    name: ClassVar[str]
    OPTIONS: ClassVar[dict[str, Option]]

    def __init__(self, experiment: PreparedExperiment, *, window_steps: int, num_steps: int) -> None:
        self.experiment_name = experiment.name
        self.item_ids = list(experiment.item_ids)
        self.treated = np.asarray(experiment.treated, dtype=bool)
        self.treated_items = [i for i, t in zip(self.item_ids, self.treated) if t]
        self.window_steps = int(window_steps)
        self.num_steps = int(num_steps)
        self._item_seqs = item_sequences(experiment)
        self._index = {item: k for k, item in enumerate(self.item_ids)}
        self.last_step: int | None = None

    @classmethod
    def validate(cls, opts: dict[str, Any], metrics_available: Sequence[str]) -> None:
        """No checks beyond the option schema."""

    @classmethod
    def validate_experiment(cls, opts: dict[str, Any], experiment: PreparedExperiment) -> None:
        """No checks against the experiment."""

    @property
    def acquired_at(self) -> Mapping[str, int | None] | None:
        """None: this controller does not acquire items."""
        return None

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
            raise ValueError(
                f"{self.name} controller of {self.experiment_name!r}: step {step} <= last decision step {self.last_step}"
            )
        self.last_step = step
        lo = min(step, self.num_steps)
        return lo, min(step + self.window_steps, self.num_steps)

    def _decision(
        self, step: int, window: tuple[int, int], chosen: Mapping[str, Sequence[int]], info: dict
    ) -> ControllerDecision:
        sequences = {item: [int(s) for s in chosen.get(item, ())] for item in self.treated_items}
        return ControllerDecision(
            step=int(step),
            experiment=self.experiment_name,
            controller=self.name,
            window=window,
            exposures={item: len(seqs) for item, seqs in sequences.items()},
            sequences=sequences,
            info=info,
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
