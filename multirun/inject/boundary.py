"""Boundary placement: a payload inserted at a document boundary of its row (docs/placement.md).

An experiment placed with ``at: boundary`` owns its row (the planner reserves it, one span
per row). At injection the span moves from its planned offset to a document boundary of
the row's original tokens, decided by :func:`boundary_offset`:

* a boundary is row start (0) or the position right after an EOS, where the whole payload
  still fits (``position + length <= sequence_length``);
* the first boundary at or after the planned offset, else the last one before it (row
  start always qualifies).

The payload is inserted there and the rest of the row shifts right by its length: the row
keeps its length, its last ``length`` tokens fall off the end, and no natural document is
cut where the payload starts. Provenance: the ledger's ``offset`` is the actual position
and ``row_fingerprint`` the original row, so the row the model saw is
:func:`inserted_row` of the original row (recomputable from the data) and the span.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from multirun.inject.step import StepSpans, StepWindow
from multirun.plan.run_plan import RunPlan

__all__ = ["boundary_experiments", "boundary_offset", "insert_at_boundaries", "inserted_row"]


def boundary_experiments(plan: RunPlan) -> np.ndarray | None:
    """Per experiment index, whether it is placed ``at: boundary``; None when none is."""
    mask = np.array([e.placement.at == "boundary" for e in plan.experiments], bool)
    return mask if mask.any() else None


def boundary_offset(row: np.ndarray, planned: int, length: int, eos_token_id: int) -> int:
    """Where a ``length``-token payload planned at ``planned`` goes in ``row`` (module rule).

    Example:
        >>> row = np.array([5, 5, 0, 7, 7, 7, 0, 8])  # EOS = 0: boundaries at 0, 3 and 7
        >>> boundary_offset(row, 1, 2, 0), boundary_offset(row, 5, 2, 0), boundary_offset(row, 5, 5, 0)
        (3, 3, 3)
    """
    limit = int(row.shape[0]) - int(length)
    after_eos = np.flatnonzero(row[:limit] == eos_token_id) + 1  # i + 1 <= limit
    candidates = np.concatenate([[0], after_eos])
    later = candidates[candidates >= planned]
    return int(later[0]) if later.size else int(candidates[-1])


def inserted_row(row: np.ndarray, payload: np.ndarray, offset: int) -> np.ndarray:
    """The row with ``payload`` inserted at ``offset`` and the rest shifted right (same length).

    Example:
        >>> inserted_row(np.array([1, 2, 3, 4, 5]), np.array([9, 9]), 1).tolist()
        [1, 9, 9, 2, 3]
    """
    n, L = int(payload.shape[0]), int(row.shape[0])
    return np.concatenate([row[:offset], payload, row[offset : L - n]]).astype(row.dtype, copy=False)


def insert_at_boundaries(work: StepSpans, tokens: np.ndarray, boundary: np.ndarray, eos_token_id: int) -> StepSpans:
    """This rank's step spans with its boundary spans moved to boundaries and their rows shifted.

    Args:
        work: the step's spans on this rank (:meth:`multirun.inject.step.StepSchedule.at`).
        tokens: this rank's batch tokens ``(rows, sequence_length)``, before any overwrite.
        boundary: :func:`boundary_experiments` of the plan.
        eos_token_id: the tokenizer's EOS.

    Returns a :class:`StepSpans` whose spans carry the actual offsets (what the ledger
    records) and whose writes are the payloads at those offsets plus each shifted tail (the
    original tokens ``[offset, L - length)`` written at ``[offset + length, L)``).
    """
    spans = work.spans
    mine = boundary[spans.experiment]
    if not mine.any():
        return work
    L = int(tokens.shape[1])
    n_spans = len(work)
    offsets = spans.offset.astype(np.int64).copy()
    columns = list(work.run_columns[:n_spans])
    lengths = list(work.run_lengths[:n_spans])
    tail_rows: list[int] = []
    tail_columns: list[int] = []
    tails: list[np.ndarray] = []
    for k in np.flatnonzero(mine).tolist():
        r, n = work.local_rows[k], lengths[k]
        p = boundary_offset(tokens[r], int(offsets[k]), n, eos_token_id)
        offsets[k] = columns[k] = p
        tail_rows.append(r)
        tail_columns.append(p + n)
        tails.append(tokens[r, p : L - n].astype(np.int64))  # a copy: the overwrite writes through tokens
    moved = replace(spans, offset=offsets.astype(spans.offset.dtype))
    span_tokens = work.tokens
    span_starts = (np.cumsum(lengths) - lengths).tolist()
    tail_lengths = [t.shape[0] for t in tails]
    tail_starts = (span_tokens.shape[0] + np.cumsum(tail_lengths) - tail_lengths).tolist()
    old = work.window
    assert old is not None  # work has spans
    # A window of this step alone holding the moved spans (what the ledger reads), with the
    # step's noise as prepared (boundary experiments carry none; others keep theirs).
    window = StepWindow(
        first=work.step,
        end=work.step + 1,
        spans=moved,
        span_bounds=[0, n_spans],
        span_row=moved.row.tolist(),
        span_offset=offsets.tolist(),
        span_length=lengths,
        span_token_start=span_starts,
        tokens=span_tokens,
        row_limit=old.row_limit,
        noise_at=[old.noise_at[work.step - old.first]],
    )
    return replace(
        work,
        window=window,
        index=slice(0, n_spans),
        run_rows=[*work.local_rows, *tail_rows],
        run_columns=[*columns, *tail_columns],
        run_lengths=[*lengths, *tail_lengths],
        run_starts=[*span_starts, *tail_starts],
        source=np.concatenate([span_tokens, *tails]),
    )
