"""Dynamic spans: placing controller decisions into the run's schedule.

A :class:`~multirun.control.controllers.ControllerDecision` asks for spans of given
sequences inside a step window. :func:`place_decision` places them with the same
:class:`~multirun.plan.static.Occupancy` that holds the static schedule (one occupancy
index for all spans, docs/architecture.md invariant 5), so
dynamic spans never overlap static ones or each other, never cross a row, and
never push a step over the per-step cap. What cannot be placed is counted and
returned, never dropped silently.

Determinism (invariant 1): the generator of a decision is
``default_rng([seed, stable_id(experiment), 3, decision_index])``, where
``decision_index`` counts that experiment's earlier decisions (stream 3; the
planner uses 0). So the spans are a pure function of the static table and the
ordered decision log, and :meth:`DynamicSchedule.from_decisions` rebuilds them exactly
after a resume.

:class:`DynamicSchedule` is what the callback keeps: it applies decisions as they
come, numbers repetitions on from the static spans of the same sequence, counts
unplaced spans per experiment and serves the dynamic spans of a step.

Example::

    schedule = DynamicSchedule(plan.experiments, plan.spans, plan.geometry,
                               max_modified_fraction=0.05, seed=plan.seed)
    spans, unplaced = schedule.apply(decision)
    step_spans = SpanTable.concat([plan.spans_at(t), schedule.spans_at(t)])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from multirun.control.controllers import ControllerDecision
from multirun.plan.static import Occupancy, UnplacedSpansWarning, occupancy_of, stable_id
from multirun.types import SPAN_COLUMNS, BatchGeometry, PreparedExperiment, SpanTable

__all__ = [
    "DYNAMIC_STREAM",
    "DynamicSchedule",
    "decision_rng",
    "place_decision",
    "sequence_counts",
]

#: Random stream number of dynamic placement (the static planner uses 0).
DYNAMIC_STREAM = 3


def decision_rng(seed: int, experiment: str, decision_index: int) -> np.random.Generator:
    """The generator that places one decision of one experiment.

    Example:
        >>> int(decision_rng(1, "facts", 0).integers(1 << 30)) == int(decision_rng(1, "facts", 0).integers(1 << 30))
        True
    """
    return np.random.default_rng([int(seed), stable_id(experiment), DYNAMIC_STREAM, int(decision_index)])


def sequence_counts(spans: SpanTable, experiment_index: int, num_sequences: int) -> np.ndarray:
    """Spans per sequence of one experiment in ``spans`` (where repetition numbering goes on)."""
    mine = spans.sequence[spans.experiment == experiment_index].astype(np.int64)
    return np.bincount(mine, minlength=num_sequences).astype(np.int64)


def _requested(decision: ControllerDecision, experiment: PreparedExperiment) -> np.ndarray:
    """The decision's sequence indices in a fixed order (item order, then as listed), validated."""
    if decision.experiment != experiment.name:
        raise ValueError(f"decision of {decision.experiment!r} placed for experiment {experiment.name!r}")
    index = {item: k for k, item in enumerate(experiment.item_ids)}
    unknown = sorted(set(decision.exposures) - set(index))
    if unknown:
        raise ValueError(f"decision of {experiment.name!r} names unknown items {unknown[:5]}")
    treated = np.asarray(experiment.treated, bool)
    seq_items = np.asarray(experiment.seq_items, np.int64)
    parts: list[np.ndarray] = []
    for item in sorted(decision.exposures, key=index.__getitem__):
        count = int(decision.exposures[item])
        seqs = np.asarray(decision.sequences.get(item, []), dtype=np.int64)
        if count < 0 or seqs.size != count:
            raise ValueError(
                f"decision of {experiment.name!r}: item {item!r} has {count} exposures but {seqs.size} sequences"
            )
        if count == 0:
            continue
        if not treated[index[item]]:
            # Injecting a control item would silently destroy the experiment's comparison.
            raise ValueError(f"decision of {experiment.name!r} injects control item {item!r}")
        if seqs.min() < 0 or seqs.max() >= seq_items.size or (seq_items[seqs] != index[item]).any():
            raise ValueError(f"decision of {experiment.name!r}: item {item!r} lists sequences that are not its own")
        parts.append(seqs)
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def place_decision(
    decision: ControllerDecision,
    experiment: PreparedExperiment,
    experiment_index: int,
    occupancy: Occupancy,
    *,
    seed: int,
    decision_index: int,
    counts: np.ndarray | None = None,
) -> tuple[SpanTable, int]:
    """Place a decision's spans inside its window; ``(spans, number unplaced)``.

    Spans go through ``occupancy.place`` (which also adds them to ``occupancy``)
    over the steps ``decision.window``, with generator :func:`decision_rng`.
    The table is sorted by ``(step, row, offset)`` with ``experiment =
    experiment_index``. ``counts`` (spans so far per sequence of this experiment,
    static plus earlier dynamic; see :func:`sequence_counts`) makes ``repetition``
    continue each sequence's numbering, and is advanced in place; without it the
    numbering starts at 0.

    Unplaced spans (no cap budget left in the window, still colliding after the
    re-draw rounds, longer than a row, or an empty window) are counted, never
    silently dropped; the caller reports the count.
    """
    seqs = _requested(decision, experiment)
    if seqs.size == 0:
        return SpanTable.empty(), 0
    geometry = occupancy.geometry
    lengths = np.asarray(experiment.seq_lengths, np.int64)[seqs]
    lo, hi = max(int(decision.window[0]), 0), min(int(decision.window[1]), geometry.num_steps)
    fits = (lengths >= 1) & (lengths <= geometry.sequence_length)
    unplaced = int(np.count_nonzero(~fits))
    if hi <= lo:
        return SpanTable.empty(), int(seqs.size)
    seqs, lengths = seqs[fits], lengths[fits]
    if seqs.size == 0:
        return SpanTable.empty(), unplaced
    out = occupancy.place(lengths, decision_rng(seed, experiment.name, decision_index), step_lo=lo, step_hi=hi)
    placed_seqs = seqs[out.index]
    base = np.zeros(int(experiment.seq_lengths.shape[0]), np.int64) if counts is None else counts
    repetition = _continue_numbering(placed_seqs, base)
    if counts is not None:
        np.add.at(counts, placed_seqs, 1)
    spans = SpanTable(
        step=out.step.astype(SPAN_COLUMNS["step"]),
        row=out.row.astype(SPAN_COLUMNS["row"]),
        offset=out.offset.astype(SPAN_COLUMNS["offset"]),
        length=lengths[out.index].astype(SPAN_COLUMNS["length"]),
        experiment=np.full(out.index.size, experiment_index, SPAN_COLUMNS["experiment"]),
        sequence=placed_seqs.astype(SPAN_COLUMNS["sequence"]),
        repetition=repetition.astype(SPAN_COLUMNS["repetition"]),
    )
    return spans, unplaced + out.num_unplaced


def _continue_numbering(seqs: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``base[s] + k`` for the ``k``-th occurrence of sequence ``s`` in ``seqs`` (span order)."""
    if seqs.size == 0:
        return np.empty(0, np.int64)
    order = np.argsort(seqs, kind="stable")  # stable: keeps span order within a sequence
    ss = seqs[order]
    first = np.r_[True, ss[1:] != ss[:-1]]
    starts = np.flatnonzero(first)
    out = np.empty(seqs.size, np.int64)
    out[order] = np.arange(ss.size) - starts[np.cumsum(first) - 1] + base[ss]
    return out


class DynamicSchedule:
    """All dynamic spans of a run, grown decision by decision, on top of the static spans.

    Args:
        experiments: the run's experiments, in plan order (indices as in ``static``).
        static: the static span table (``RunPlan.spans``).
        geometry, max_modified_fraction: as for the static plan (same cap).
        seed: the run's seed.

    Attributes:
        occupancy: static plus dynamic spans (shared collision and cap rules).
        decisions: every decision applied so far, in order (the log to checkpoint).
        placed, unplaced: dynamic span counts per experiment name.
    """

    def __init__(
        self,
        experiments: Sequence[PreparedExperiment],
        static: SpanTable,
        geometry: BatchGeometry,
        *,
        max_modified_fraction: float,
        seed: int,
    ) -> None:
        self.experiments = list(experiments)
        self.geometry = geometry
        self.seed = int(seed)
        self.occupancy = occupancy_of(static, self.experiments, geometry, max_modified_fraction)
        self._index = {e.name: k for k, e in enumerate(self.experiments)}
        self._counts = [sequence_counts(static, k, int(e.seq_lengths.shape[0])) for k, e in enumerate(self.experiments)]
        self._decisions_of = {e.name: 0 for e in self.experiments}
        self.decisions: list[ControllerDecision] = []
        self.placed: dict[str, int] = {e.name: 0 for e in self.experiments}
        self.unplaced: dict[str, int] = {e.name: 0 for e in self.experiments}
        self._spans = SpanTable.empty()

    @property
    def spans(self) -> SpanTable:
        """Every dynamic span so far, sorted by ``(step, row, offset)``."""
        return self._spans

    def spans_at(self, step: int) -> SpanTable:
        """The dynamic spans of one step (merge with ``RunPlan.spans_at(step)``)."""
        return self._spans.take(self._spans.step_slice(step))

    def apply(self, decision: ControllerDecision, *, warn: bool = True) -> tuple[SpanTable, int]:
        """Place one decision; ``(its spans, number unplaced)``.

        Warns with :class:`~multirun.plan.static.UnplacedSpansWarning` when spans could
        not be placed (``warn=False`` when replaying decisions already reported).
        """
        k = self._index.get(decision.experiment)
        if k is None:
            raise ValueError(f"decision for unknown experiment {decision.experiment!r}; known: {list(self._index)}")
        experiment = self.experiments[k]
        spans, unplaced = place_decision(
            decision,
            experiment,
            k,
            self.occupancy,
            seed=self.seed,
            decision_index=self._decisions_of[experiment.name],
            counts=self._counts[k],
        )
        self._decisions_of[experiment.name] += 1
        self.decisions.append(decision)
        self.placed[experiment.name] += len(spans)
        self.unplaced[experiment.name] += unplaced
        if len(spans):
            self._spans = SpanTable.concat([self._spans, spans])
        if unplaced and warn:
            warnings.warn(
                f"multirun: {unplaced} of {decision.num_spans} spans the {decision.controller} controller of "
                f"{decision.experiment!r} asked for at step {decision.step} could not be placed in steps "
                f"[{decision.window[0]}, {decision.window[1]}) (per-step cap or collisions)",
                UnplacedSpansWarning,
                stacklevel=2,
            )
        return spans, unplaced

    def log(self) -> list[dict]:
        """The decision log as plain JSON (what the callback checkpoints)."""
        return [d.to_dict() for d in self.decisions]

    @classmethod
    def from_decisions(
        cls,
        decisions: Sequence[ControllerDecision],
        experiments: Sequence[PreparedExperiment],
        static: SpanTable,
        geometry: BatchGeometry,
        *,
        max_modified_fraction: float,
        seed: int,
    ) -> DynamicSchedule:
        """Rebuild the schedule from a decision log (resume): identical to the live one."""
        schedule = cls(experiments, static, geometry, max_modified_fraction=max_modified_fraction, seed=seed)
        for decision in decisions:
            schedule.apply(decision, warn=False)
        return schedule
