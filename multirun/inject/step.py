"""One step's injection on one rank, as a pure function of the plan and the batch's rows.

:func:`plan_step` decides everything the callback does at ``AFTER_DATALOADER``: which
of the step's spans (static and dynamic) land on this rank, at which flat positions
of the ``(rows, sequence_length)`` batch, with which tokens, items and token hashes,
and which spans carry embedding noise. The callback only writes the tokens into the
batch (:func:`multirun.inject.batch.apply_spans`) and appends
:meth:`StepInjection.ledger_columns` to the ledger, so every invariant of provenance
(docs/architecture.md, invariants 2, 3 and 5) is testable without Composer.

Example:
    >>> import numpy as np
    >>> from multirun.inject.batch import LocalRows, RowMap
    >>> from multirun.types import SpanTable
    >>> spans = SpanTable(step=np.array([0]), row=np.array([1]), offset=np.array([2]), length=np.array([3]),
    ...                   experiment=np.array([0]), sequence=np.array([0]), repetition=np.array([0]))
    >>> local = LocalRows(sample_id=np.array([-1, -1]), fingerprint=np.array([11, 7], dtype=np.uint64))
    >>> rows = RowMap(global_row=np.array([1, 0]), total_rows=2, local=local)  # this rank holds rows 1 and 0
    >>> located = locate_spans(spans, rows)
    >>> located.local_rows.tolist(), located.positions(sequence_length=8).tolist()
    ([0], [2, 3, 4])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from multirun.inject.batch import (
    FEW_RUNS,
    DerivedKeys,
    RowMap,
    flat_token_positions,
    row_fingerprints,
    run_positions,
    write_runs,
)
from multirun.inject.noise import NoisedSpan, noised_spans
from multirun.plan.run_plan import RunPlan
from multirun.types import SPAN_COLUMNS, EmbeddingNoise, SpanTable


@dataclass(frozen=True)
class LocatedSpans:
    """A step's spans that land on this rank, with the local row of each.

    Attributes:
        spans: the spans held by this rank's rows (sorted by step, global row, offset).
        local_rows: the local batch row of each span.
        total_rows: rows of the step across all ranks.
        missed: spans per experiment index that target rows beyond ``total_rows``
            (a short final batch); the same on every rank.
    """

    spans: SpanTable
    local_rows: np.ndarray
    total_rows: int
    missed: dict[int, int] = field(default_factory=dict)

    def positions(self, *, sequence_length: int) -> np.ndarray:
        """Flat indices into the ``(rows, sequence_length)`` batch covering every span, in span order."""
        return flat_token_positions(self.local_rows, self.spans.offset, self.spans.length, sequence_length)


def locate_spans(spans: SpanTable, rows: RowMap) -> LocatedSpans:
    """Keep the spans whose global row this rank holds, and find their local rows."""
    total_rows = rows.total_rows
    missed: dict[int, int] = {}
    beyond = spans.row >= total_rows
    if beyond.any():
        experiments, counts = np.unique(spans.experiment[beyond], return_counts=True)
        missed = {int(e): int(c) for e, c in zip(experiments, counts)}
    local = rows.local_rows_of(spans.row.astype(np.int64))
    mine = local >= 0
    return LocatedSpans(spans.take(mine), local[mine], total_rows, missed)


@dataclass(frozen=True)
class StepInjection:
    """What one rank writes into one step's batch, and what its ledger records.

    Attributes:
        step: the training step (batches completed before this one).
        located: this rank's spans and their local rows.
        positions: flat indices into the ``(rows, sequence_length)`` batch, span after span.
        tokens: the token at each position.
        items: item index (into the experiment's ``item_ids``) of each span.
        token_hashes: xxh64 of each span's tokens.
        sample_ids: dataset sample id of each span's row (-1 when the batch has none).
        row_fingerprints: content fingerprint of each span's original row (before any overwrite).
        noise: spans whose experiment adds embedding noise.
    """

    step: int
    located: LocatedSpans
    positions: np.ndarray
    tokens: np.ndarray
    items: np.ndarray
    token_hashes: np.ndarray
    sample_ids: np.ndarray
    row_fingerprints: np.ndarray
    noise: list[NoisedSpan]

    @property
    def spans(self) -> SpanTable:
        return self.located.spans

    def __len__(self) -> int:
        return len(self.located.spans)

    def ledger_columns(self) -> dict[str, np.ndarray]:
        """Keyword arguments of :meth:`multirun.ledger.LedgerWriter.append` for these spans."""
        spans = self.located.spans
        return {
            "step": np.full(len(spans), self.step, dtype=np.int64),
            "global_row": spans.row,
            "local_row": self.located.local_rows.astype(np.int32),
            "sample_id": self.sample_ids,
            "offset": spans.offset,
            "length": spans.length,
            "experiment": spans.experiment,
            "item_index": self.items,
            "sequence": spans.sequence,
            "repetition": spans.repetition,
            "token_hash": self.token_hashes,
            "row_fingerprint": self.row_fingerprints,
        }


def plan_step(
    plan: RunPlan,
    *,
    step: int,
    rows: RowMap,
    sequence_length: int,
    dynamic: SpanTable | None = None,
    noise_specs: Sequence[EmbeddingNoise | None] = (),
) -> StepInjection:
    """This rank's injection at ``step``: the plan's spans plus the controllers' ``dynamic`` ones.

    Args:
        plan: the run plan (static spans, token sequences, hashes).
        step: the training step.
        rows: which global rows this rank's batch holds, and what identifies each
            (:func:`multirun.inject.batch.global_rows`).
        sequence_length: tokens per batch row.
        dynamic: the controllers' spans of this step, if any.
        noise_specs: each experiment's embedding noise, in plan order (empty: none).
    """
    spans = plan.spans_at(step)
    if dynamic is not None and len(dynamic):
        spans = SpanTable.concat([spans, dynamic])
    located = locate_spans(spans, rows)
    mine = located.spans
    items = plan.items_of(mine.experiment, mine.sequence)
    noise = []
    if any(spec is not None for spec in noise_specs):
        noise = noised_spans(located.local_rows, mine.offset, mine.length, list(noise_specs), items, mine.experiment)
    return StepInjection(
        step=step,
        located=located,
        positions=located.positions(sequence_length=sequence_length),
        tokens=plan.tokens_of(mine.experiment, mine.sequence),
        items=items,
        token_hashes=plan.hashes_of(mine.experiment, mine.sequence),
        sample_ids=rows.local.sample_id[located.local_rows],
        row_fingerprints=rows.local.fingerprint[located.local_rows],
        noise=noise,
    )


# --------------------------------------------------------------------------- hot path
#
# plan_step above is the reference: a pure function, one step at a time. The callback runs
# the same computation as a handful of vectorised operations per step on arrays prepared a
# window of steps ahead (StepSchedule), and keeps per step only what the plan cannot give
# back (InjectionLog); tests/inject/test_hot_path.py checks that both agree exactly.

#: Tokens prepared per window of steps (about 24 bytes each): bounds the memory of a window
#: at paper scale while keeping the preparation amortised over many steps.
WINDOW_TOKENS = 1 << 20
#: At most this many steps per window (a dynamic decision re-prepares from the next step).
WINDOW_STEPS = 1024
#: Spans prepared per window at most: the window keeps per-span Python lists (tens of bytes a span).
WINDOW_SPANS = 1 << 16
#: Bytes of overwritten rows an :class:`InjectionLog` keeps before hashing them in one pass.
PENDING_ROW_BYTES = 32 << 20


@dataclass(frozen=True)
class StepWindow:
    """Steps ``[first, end)`` of the merged static and dynamic spans, in a compact layout.

    The per-span columns the hot path reads every step are Python lists: a step's work is
    a few list slices and comprehensions, with no numpy call (each distinct numpy operation
    costs tens of microseconds right after a training step has evicted the caches).

    Attributes:
        first: the window's first step.
        end: one past its last step.
        spans: the steps' spans, sorted by ``(step, row, offset)`` as ``plan_step`` merges them.
        span_bounds: the spans of step ``first + i`` are ``spans[span_bounds[i]:span_bounds[i + 1]]``.
        span_row: each span's global row.
        span_offset: its offset in the row.
        span_length: its length.
        span_token_start: where its tokens start in ``tokens``.
        tokens: every span's tokens, span after span (int64, the dtype of ``input_ids``).
        row_limit: one past the largest global row of the window's spans.
        noise_at: per step, its noised spans as ``(index in the step, offset, length, spec, item)``.
    """

    first: int
    end: int
    spans: SpanTable
    span_bounds: list[int]
    span_row: list[int]
    span_offset: list[int]
    span_length: list[int]
    span_token_start: list[int]
    tokens: np.ndarray
    row_limit: int
    noise_at: list[list[tuple[int, int, int, EmbeddingNoise, int]]]


@dataclass(slots=True)  # not frozen: built every step, and a frozen __init__ costs more
class StepSpans:
    """What one rank injects at one step (the hot path's :class:`StepInjection`).

    The writes are contiguous runs of tokens: run ``k`` puts ``source[run_starts[k]:][:run_lengths[k]]``
    at columns ``run_columns[k]`` onwards of local row ``run_rows[k]``. The first ``len(self)``
    runs are the spans, in order; a boundary insert adds the runs that shift a row's tail.

    Attributes:
        step: the training step.
        window: the prepared window holding the step's spans.
        index: this rank's spans in ``window.spans`` (a slice when it holds them all).
        local_rows: the local batch row of each of those spans.
        run_rows: the local row of each run of tokens written.
        run_columns: the column of its first token.
        run_lengths: its tokens.
        run_starts: where its tokens start in ``source``.
        source: the tokens the runs read (int64).
        missed: spans per experiment index beyond a short final batch (the same on every rank).
        step_local_rows: the local row of every span of the step (-1: another rank's).
    """

    step: int
    window: StepWindow | None
    index: slice | list[int]
    local_rows: list[int]
    run_rows: list[int]
    run_columns: list[int]
    run_lengths: list[int]
    run_starts: list[int]
    source: np.ndarray
    missed: dict[int, int]
    step_local_rows: list[int]

    def __len__(self) -> int:
        return len(self.local_rows)

    @property
    def spans(self) -> SpanTable:
        """This rank's spans of the step (sorted by global row, offset)."""
        if self.window is None:
            return SpanTable.empty()
        index = self.index if isinstance(self.index, slice) else np.asarray(self.index, dtype=np.int64)
        return self.window.spans.take(index)

    @property
    def token_rows(self) -> np.ndarray:
        """The local row of each token written, run after run."""
        return np.repeat(np.asarray(self.run_rows, dtype=np.int64), self.run_lengths)

    @property
    def token_columns(self) -> np.ndarray:
        """The column of each token written, run after run."""
        return run_positions(self.run_columns, self.run_lengths)

    @property
    def tokens(self) -> np.ndarray:
        """The token written at each ``(token_rows, token_columns)``."""
        return self.source[run_positions(self.run_starts, self.run_lengths)]

    def positions(self, *, sequence_length: int) -> np.ndarray:
        """Flat indices into the ``(rows, sequence_length)`` batch, token after token."""
        return self.token_rows * sequence_length + self.token_columns

    def write(self, batch: Any, *, derived: DerivedKeys, few_runs: int = FEW_RUNS) -> Any:
        """Write these runs into this rank's ``batch`` in place (:func:`multirun.inject.batch.write_runs`);
        returns the batch."""
        return write_runs(
            batch,
            rows=self.run_rows,
            columns=self.run_columns,
            lengths=self.run_lengths,
            source=self.source,
            starts=self.run_starts,
            derived=derived,
            few_runs=few_runs,
        )

    def noise(self) -> list[NoisedSpan]:
        """The step's spans on this rank whose experiment adds embedding noise, in span order."""
        if self.window is None:
            return []
        noised = self.window.noise_at[self.step - self.window.first]
        if not noised:
            return []
        local = self.step_local_rows
        return [NoisedSpan(local[k], o, n, spec, item) for k, o, n, spec, item in noised if local[k] >= 0]


_NO_TOKENS = np.empty(0, dtype=np.int64)


def _no_spans(step: int, missed: dict[int, int] | None = None) -> StepSpans:
    return StepSpans(step, None, slice(0, 0), [], [], [], [], [], _NO_TOKENS, missed or {}, [])


class StepSchedule:
    """A run plan's spans (static and the controllers' dynamic ones) prepared per step.

    The static plan and the dynamic schedule are merged into a window of steps once
    (:class:`StepWindow`); :meth:`at` then finds this rank's spans, where their tokens go
    and which tokens with a few vectorised operations. :meth:`set_dynamic` takes the
    dynamic schedule's spans (all steps): when the table changes (a decision), the window
    is prepared again from the next step asked for.

    Args:
        plan: the run plan.
        noise_specs: each experiment's embedding noise, in plan order (default: the plan's).
        window_tokens: tokens prepared per window (a memory bound); at least one step.
    """

    def __init__(
        self,
        plan: RunPlan,
        *,
        noise_specs: Sequence[EmbeddingNoise | None] | None = None,
        window_tokens: int = WINDOW_TOKENS,
    ) -> None:
        self.plan = plan
        experiments = plan.experiments
        specs = [e.embedding_noise for e in experiments] if noise_specs is None else list(noise_specs)
        self._noise_specs = specs + [None] * (len(experiments) - len(specs))
        self._noised = np.array([spec is not None for spec in self._noise_specs], dtype=bool)
        # One pool of every experiment's tokens, and each sequence's start in it (global
        # sequence index = first sequence of its experiment + its index).
        pools = [np.zeros(0, np.int64), *(np.asarray(e.token_pool, dtype=np.int64) for e in experiments)]
        pool_base = np.cumsum([0, *(e.token_pool.shape[0] for e in experiments)])[:-1].astype(np.int64)
        self._pool = np.concatenate(pools)
        self._sequence_first = np.cumsum([0, *(e.seq_offsets.shape[0] for e in experiments)])[:-1].astype(np.int64)
        starts = [np.zeros(0, np.int64)]
        starts += [base + np.asarray(e.seq_offsets, dtype=np.int64) for base, e in zip(pool_base, experiments)]
        self._sequence_start = np.concatenate(starts)
        static = plan.spans
        self._static = static
        steps = max(1, plan.static_horizon)
        per_step = float(static.length.sum()) / steps if len(static) else 0.0
        spans_per_step = len(static) / steps
        by_tokens = window_tokens // max(per_step, 1.0)
        by_spans = WINDOW_SPANS // max(spans_per_step, 1.0)
        self._window_steps = int(max(1, min(WINDOW_STEPS, by_tokens, by_spans)))
        self._dynamic: SpanTable | None = None
        self._window: StepWindow | None = None

    def set_dynamic(self, spans: SpanTable | None) -> None:
        """The controllers' spans of every step (``DynamicSchedule.spans``); a new table
        drops the prepared window (cheap when unchanged: an identity check)."""
        if spans is not self._dynamic:
            self._dynamic = spans
            self._window = None

    def window(self, step: int) -> StepWindow:
        """The prepared window holding ``step`` (prepared from ``step`` when none does)."""
        window = self._window
        if window is None or not window.first <= step < window.end:
            window = self._window = self._prepare(step, step + self._window_steps)
        return window

    def has_spans(self, step: int) -> bool:
        """Whether ``step`` has any span, on any rank (the same answer on every rank)."""
        window = self.window(step)
        i = step - window.first
        return window.span_bounds[i + 1] > window.span_bounds[i]

    def _prepare(self, first: int, end: int) -> StepWindow:
        tables = [_steps_of(self._static, first, end)]
        if self._dynamic is not None and len(self._dynamic):
            tables.append(_steps_of(self._dynamic, first, end))
        spans = tables[0] if len(tables) == 1 or not len(tables[1]) else SpanTable.concat(tables)
        lengths = spans.length.astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        source = self._sequence_start[self._sequence_first[spans.experiment] + spans.sequence]
        span_bounds = np.searchsorted(spans.step, np.arange(first, end + 1), side="left")
        noise_at: list[list[tuple[int, int, int, EmbeddingNoise, int]]] = [[] for _ in range(end - first)]
        noised = np.flatnonzero(self._noised[spans.experiment]) if self._noised.any() else np.zeros(0, np.int64)
        if noised.shape[0]:
            items = self.plan.items_of(spans.experiment[noised], spans.sequence[noised]).tolist()
            columns = zip(
                noised.tolist(),
                (spans.step[noised] - first).tolist(),
                spans.offset[noised].tolist(),
                spans.length[noised].tolist(),
                spans.experiment[noised].tolist(),
                items,
            )
            for k, i, offset, length, e, item in columns:
                spec = self._noise_specs[e]
                assert spec is not None
                noise_at[i].append((k - int(span_bounds[i]), offset, length, spec, item))
        return StepWindow(
            first=first,
            end=end,
            spans=spans,
            span_bounds=span_bounds.tolist(),
            span_row=spans.row.tolist(),
            span_offset=spans.offset.tolist(),
            span_length=lengths.tolist(),
            span_token_start=starts.tolist(),
            tokens=self._pool[run_positions(source, lengths)],
            row_limit=int(spans.row.max()) + 1 if len(spans) else 0,
            noise_at=noise_at,
        )

    def at(self, step: int, lookup: Sequence[int], *, every_row_here: bool) -> StepSpans:
        """This rank's spans of ``step``, where their tokens go and which tokens.

        Plain Python on the window's lists: a step holds few spans per rank, and list
        operations stay cheap after a training step where every numpy call is slow.

        Args:
            step: the training step.
            lookup: the local row of each of the step's global rows, -1 where another rank
                holds it (:func:`multirun.inject.batch.row_lookup`); its length is the
                step's rows across all ranks.
            every_row_here: this rank holds every row (one process): no filtering needed.
        """
        window = self.window(step)
        i = step - window.first
        lo, hi = window.span_bounds[i], window.span_bounds[i + 1]
        if lo == hi:
            return _no_spans(step)
        rows = window.span_row[lo:hi]
        if isinstance(lookup, np.ndarray):
            lookup = lookup.tolist()
        missed: dict[int, int] = {}
        total = len(lookup)
        if total < window.row_limit:  # a short final batch: spans beyond it are counted, not placed
            beyond = np.asarray(rows) >= total
            if beyond.any():
                experiments, counts = np.unique(window.spans.experiment[lo:hi][beyond], return_counts=True)
                missed = {int(e): int(c) for e, c in zip(experiments, counts)}
            lookup = [*lookup, *[-1] * (window.row_limit - total)]
            every_row_here = False
        local = [lookup[r] for r in rows]
        if every_row_here:
            offsets, lengths = window.span_offset[lo:hi], window.span_length[lo:hi]
            starts = window.span_token_start[lo:hi]
            return StepSpans(
                step, window, slice(lo, hi), local, local, offsets, lengths, starts, window.tokens, missed, local
            )
        index = [lo + k for k, row in enumerate(local) if row >= 0]
        if not index:
            return _no_spans(step, missed)
        mine = [local[k - lo] for k in index]
        return StepSpans(
            step,
            window,
            index,
            mine,
            mine,
            [window.span_offset[k] for k in index],
            [window.span_length[k] for k in index],
            [window.span_token_start[k] for k in index],
            window.tokens,
            missed,
            local,
        )


def _steps_of(spans: SpanTable, first: int, end: int) -> SpanTable:
    """The spans of steps ``[first, end)`` of a table sorted by step (views, no copy)."""
    lo = int(np.searchsorted(spans.step, first, side="left"))
    hi = int(np.searchsorted(spans.step, end, side="left"))
    return spans.take(slice(lo, hi))


@dataclass(slots=True)
class _Recorded:
    """One step's spans in an :class:`InjectionLog`: the overwritten rows' fingerprints, or
    (until they are hashed in bulk) a copy of each span's row as the data gave it."""

    spans: StepSpans
    sample_ids: Sequence[int]
    row_fingerprints: np.ndarray | None
    original_rows: Sequence[np.ndarray] | None


class InjectionLog:
    """This rank's injected spans, kept per step as what the plan cannot give back
    (the step's spans in a prepared window, their local rows, and the overwritten rows'
    sample ids and fingerprints); :meth:`drain` expands them into ledger rows in bulk.

    The rows are those that concatenating :meth:`StepInjection.ledger_columns` step by
    step gives, in the same order.

    Args:
        plan: the run plan.
        pending_bytes: original rows kept unhashed at most (a memory bound): past it, the
            kept rows are hashed at once, else at :meth:`drain`.
    """

    def __init__(self, plan: RunPlan, *, pending_bytes: int = PENDING_ROW_BYTES) -> None:
        self.plan = plan
        self.pending_bytes = pending_bytes
        self._records: list[_Recorded] = []
        self._rows = 0
        self._unhashed_bytes = 0

    def __len__(self) -> int:
        """Span rows recorded since the last :meth:`drain`."""
        return self._rows

    def record(
        self,
        spans: StepSpans,
        *,
        sample_ids: Sequence[int],
        row_fingerprints: np.ndarray | None = None,
        original_rows: Sequence[np.ndarray] | None = None,
    ) -> None:
        """Keep one step's spans, with each span's row's sample id and either that row's
        original fingerprint or a copy of its original row, hashed later in bulk: hashing
        row by row on the training loop's critical path costs more than the copy.

        ``original_rows`` holds one 1-D array per span; consecutive spans of one row may
        share one copy (the same object), which is then hashed once."""
        if not len(spans):
            return
        if (row_fingerprints is None) == (original_rows is None):
            raise ValueError("record takes the rows' fingerprints or the original rows, one of the two")
        self._records.append(_Recorded(spans, sample_ids, row_fingerprints, original_rows))
        self._rows += len(spans)
        if original_rows is not None:
            if len(original_rows) != len(spans):
                raise ValueError(f"{len(original_rows)} original rows for {len(spans)} spans")
            last = None
            for row in original_rows:
                if row is not last:
                    self._unhashed_bytes += row.nbytes
                    last = row
            if self._unhashed_bytes > self.pending_bytes:
                self._hash_kept_rows()

    def _hash_kept_rows(self) -> None:
        """Fingerprint every kept original row in one pass; a copy that consecutive spans
        share is hashed once."""
        pending = [r for r in self._records if r.original_rows is not None]
        self._unhashed_bytes = 0
        if not pending:
            return
        distinct: list[np.ndarray] = []
        copy_of_span: list[int] = []
        for r in pending:
            assert r.original_rows is not None
            last = None
            for row in r.original_rows:
                if row is not last:
                    distinct.append(row)
                    last = row
                copy_of_span.append(len(distinct) - 1)
        fingerprints = row_fingerprints(np.stack(distinct))[copy_of_span]
        counts = [len(r.spans) for r in pending]
        for r, hashes in zip(pending, np.split(fingerprints, np.cumsum(counts[:-1]))):
            r.row_fingerprints, r.original_rows = hashes, None

    def drain(self) -> dict[str, np.ndarray] | None:
        """Keyword arguments of :meth:`multirun.ledger.LedgerWriter.append` for every
        recorded span (None when there are none); the log is then empty."""
        if not self._records:
            return None
        self._hash_kept_rows()
        records, self._records, self._rows = self._records, [], 0
        tables = [r.spans.spans for r in records]
        column = {name: np.concatenate([getattr(t, name) for t in tables]) for name in SPAN_COLUMNS}
        experiment, sequence = column["experiment"], column["sequence"]
        fingerprints = [r.row_fingerprints for r in records if r.row_fingerprints is not None]
        return {
            "step": np.repeat(
                np.array([r.spans.step for r in records], dtype=np.int64), [len(r.spans) for r in records]
            ),
            "global_row": column["row"],
            "local_row": np.fromiter(chain.from_iterable(r.spans.local_rows for r in records), np.int32),
            "sample_id": np.fromiter(chain.from_iterable(r.sample_ids for r in records), np.int64),
            "offset": column["offset"],
            "length": column["length"],
            "experiment": experiment,
            "item_index": self.plan.items_of(experiment, sequence),
            "sequence": sequence,
            "repetition": column["repetition"],
            "token_hash": self.plan.hashes_of(experiment, sequence),
            "row_fingerprint": np.concatenate(fingerprints),
        }
