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

import numpy as np

from multirun.inject.batch import RowMap, flat_token_positions
from multirun.inject.noise import NoisedSpan, noised_spans
from multirun.plan.run_plan import RunPlan
from multirun.types import EmbeddingNoise, SpanTable


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
