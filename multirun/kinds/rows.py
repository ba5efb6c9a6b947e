"""Whole-row and whole-batch experiments: sequences fitted to rows, batches assigned to steps.

An experiment placed with ``whole: row`` or ``whole: batch`` (docs/placement.md) injects
sequences of exactly the sequence length: :func:`fit_row` repeats a sequence's tokens end
to end and cuts them at the sequence length (a sequence as long as the row is kept as it
is). :func:`batch_assignment` decides, from the experiment alone, which sequence fills
which row of which step of a ``whole: batch`` experiment; the planner places exactly
these spans and the ``forgetting`` monitor groups items by the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from multirun.types import PreparedExperiment

__all__ = ["BatchAssignment", "batch_assignment", "fit_experiment_to_rows", "fit_row"]


def fit_row(tokens: Sequence[int] | np.ndarray, sequence_length: int) -> np.ndarray:
    """``tokens`` repeated end to end and cut to exactly ``sequence_length`` tokens (int32).

    Example:
        >>> fit_row([1, 2, 3], 7).tolist()
        [1, 2, 3, 1, 2, 3, 1]
    """
    seq = np.asarray(tokens, dtype=np.int32)
    if seq.size == 0:
        raise ValueError("an empty sequence cannot fill a row")
    return np.resize(seq, sequence_length).astype(np.int32)


def fit_experiment_to_rows(experiment: PreparedExperiment, sequence_length: int) -> PreparedExperiment:
    """The experiment with every sequence fitted to one row (:func:`fit_row`)."""
    n = int(experiment.seq_lengths.shape[0])
    pool = np.concatenate(
        [np.zeros(0, np.int32), *(fit_row(experiment.sequence_tokens(s), sequence_length) for s in range(n))]
    )
    return replace(
        experiment,
        token_pool=pool,
        seq_offsets=np.arange(n, dtype=np.int64) * sequence_length,
        seq_lengths=np.full(n, sequence_length, np.int32),
    )


class BatchAssignment:
    """Spans of a ``whole: batch`` experiment: span ``i`` puts ``sequence[i]`` into every
    token of global row ``row[i]`` at ``step[i]``; ``repetition[i]`` counts from 0 per sequence.

    Spans are the sequences in repetition-major order (every sequence's first copy, in
    sequence order, then every second copy, ...), cut into batches of ``rows`` spans; batch
    ``j`` fills step ``steps[j]`` (ascending), row ``k`` of the batch being span ``k``. So the
    payload's order decides which items share a batch, without any draw.
    """

    def __init__(self, step: np.ndarray, row: np.ndarray, sequence: np.ndarray, repetition: np.ndarray) -> None:
        self.step, self.row, self.sequence, self.repetition = step, row, sequence, repetition

    def first_step_of_items(self, seq_items: np.ndarray) -> dict[int, int]:
        """Item index -> the first step at which one of its sequences fills a row."""
        out: dict[int, int] = {}
        for s, seq in zip(self.step.tolist(), self.sequence.tolist()):
            item = int(seq_items[seq])
            out[item] = min(out.get(item, s), s)
        return out


def batch_assignment(seq_repetitions: np.ndarray, steps: Sequence[int], rows: int) -> BatchAssignment:
    """The spans of a ``whole: batch`` experiment (see :class:`BatchAssignment`).

    Raises:
        ValueError: repetitions that are not whole numbers, or a span count other than
            ``len(steps) x rows`` (each listed step must be filled entirely).

    Example:
        >>> a = batch_assignment(np.array([1.0, 1.0, 1.0, 1.0]), [3, 9], rows=2)
        >>> a.step.tolist(), a.row.tolist(), a.sequence.tolist()
        ([3, 3, 9, 9], [0, 1, 0, 1], [0, 1, 2, 3])
    """
    reps = np.asarray(seq_repetitions, dtype=np.float64)
    if not np.isfinite(reps).all() or (reps != np.floor(reps)).any() or (reps < 0).any():
        raise ValueError("whole: batch needs whole-number repetitions (each span fills one row of a listed step)")
    counts = reps.astype(np.int64)
    total, wanted = int(counts.sum()), len(steps) * rows
    if total != wanted:
        raise ValueError(
            f"whole: batch fills every row of each listed step: {len(steps)} step(s) x {rows} rows = {wanted} "
            f"rows, but the experiment has {total} spans ({counts.size} injected sequences x their repetitions)"
        )
    top = int(counts.max(initial=0))
    sequence = np.concatenate([np.zeros(0, np.int64), *(np.flatnonzero(counts > r) for r in range(top))]).astype(
        np.int32
    )
    repetition = np.concatenate([np.zeros(0, np.int64), *(np.full(int((counts > r).sum()), r) for r in range(top))])
    ordered = np.sort(np.asarray(steps, dtype=np.int64))
    index = np.arange(total, dtype=np.int64)
    return BatchAssignment(
        step=ordered[index // rows],
        row=(index % rows).astype(np.int32),
        sequence=sequence,
        repetition=repetition.astype(np.int32),
    )
