"""Removal: training rows holding a removed n-gram are overwritten, after injection.

A ``removal`` experiment (:class:`multirun.types.RemovalSpec`) names token n-grams that
the model must never train on. At every step where a removal experiment is active, the
callback hands this rank's batch tokens *after* the other experiments' spans were
written to :meth:`StreamRemoval.apply`, so an insert can never reintroduce a removed
sequence. Each removal experiment, in plan order, scans every row:

1. the hash of every length-``n`` window of every row (a polynomial hash mod 2^64 over
   prefix sums: O(rows x length) vectorised work, whatever ``n``), looked up in the
   experiment's sorted n-gram hashes through a bitmap of their low bits;
2. every candidate checked token by token against its n-gram (a hash collision is
   never a removal);
3. the matched windows of a row merged into spans (overlapping or adjacent windows make
   one span; ``span="row"``: the whole row) and overwritten with the replacement tokens
   repeated;
4. the touched rows scanned again: a span's replacement next to the row's own tokens
   could in principle form a removed n-gram; such a row is replaced whole (the
   replacement repeated holds no removed n-gram, checked when the experiment is prepared).

Every removed span is one :class:`RemovalStep` entry (local row, offset, length,
experiment, the matched sequence and where the n-gram starts in it, and the xxh64 of the
written tokens). :func:`remove_from_batch` applies a step's removal to a training batch
and gives the removals ledger's rows (with each row's global index, sample id and
original fingerprint), which the callback appends. Numpy and torch, no Composer:
testable alone.

Example:
    >>> import numpy as np
    >>> from multirun.types import RemovalSpec
    >>> spec = RemovalSpec(n=3, ngrams=np.array([[5, 6, 7]]), ngram_sequence=np.array([0]),
    ...                    ngram_start=np.array([0]), replacement=np.array([0]))
    >>> removal = StreamRemoval([(0, spec)])
    >>> tokens = np.array([[1, 5, 6, 7, 2, 3], [5, 6, 1, 7, 2, 3]])
    >>> step = removal.apply(tokens, step=0)
    >>> tokens.tolist(), step.offset.tolist(), step.length.tolist()
    ([[1, 0, 0, 0, 2, 3], [5, 6, 1, 7, 2, 3]], [1], [3])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from multirun.inject.batch import BatchRows, DerivedKeys, input_ids_of, write_tokens
from multirun.ledger import token_hash
from multirun.types import PreparedExperiment, RemovalSpec

if TYPE_CHECKING:
    from multirun.plan.run_plan import RunPlan

__all__ = [
    "RemovalStep",
    "StreamRemoval",
    "find_ngrams",
    "remove_from_batch",
    "removed_inserts",
    "tiled",
    "window_hashes",
]

_MASK = (1 << 64) - 1
# An odd multiplier is invertible mod 2^64, so a window's hash is a difference of prefix
# sums times an inverse power; any collision is ruled out by the exact check.
_BASE = 0x9E3779B97F4A7C15
_BASE_INVERSE = pow(_BASE, -1, 1 << 64)
_BITMAP_BITS = 20  # low hash bits looked up first: most windows stop at one gather


def _powers(base: int, count: int) -> np.ndarray:
    out = np.empty(count, dtype=np.uint64)
    if count:
        out[0] = 1
        out[1:] = np.uint64(base)
        np.cumprod(out, out=out)  # wraps mod 2^64, as the hash does
    return out


def window_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """The hash of every length-``n`` window of every row: ``(rows, length - n + 1)`` uint64.

    ``sum_k (token[j + k] + 1) * B**k mod 2**64``, computed from prefix sums in
    O(rows x length) whatever ``n``.
    """
    tokens = np.asarray(tokens)
    rows, length = tokens.shape
    if length < n:
        return np.empty((rows, 0), dtype=np.uint64)
    width = length - n + 1
    t = tokens.astype(np.uint64) + np.uint64(1)  # +1: a run of zeros still counts
    prefix = np.zeros((rows, length + 1), dtype=np.uint64)
    np.cumsum(t * _powers(_BASE, length), axis=1, out=prefix[:, 1:])
    return (prefix[:, n:] - prefix[:, :width]) * _powers(_BASE_INVERSE, width)


class _NgramTable:
    """One experiment's n-grams, sorted by hash, with a bitmap of their low bits."""

    def __init__(self, spec: RemovalSpec) -> None:
        self.spec = spec
        hashes = window_hashes(spec.ngrams, spec.n)[:, 0] if len(spec.ngrams) else np.empty(0, np.uint64)
        self.order = np.argsort(hashes, kind="stable")
        self.keys = hashes[self.order]
        self.bitmap = np.zeros(1 << _BITMAP_BITS, dtype=bool)
        self.bitmap[(self.keys & np.uint64((1 << _BITMAP_BITS) - 1)).astype(np.int64)] = True
        # Distinct n-grams sharing a hash (a true collision): candidates try each of them.
        _, counts = np.unique(self.keys, return_counts=True)
        self.max_shared = int(counts.max()) if counts.size else 0


def find_ngrams(tokens: np.ndarray, table: _NgramTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every window of ``tokens`` equal to one of the table's n-grams, checked exactly.

    Returns ``(row, start, ngram)``, sorted by row then start; ``ngram`` indexes
    ``table.spec.ngrams``.
    """
    n = table.spec.n
    empty = np.empty(0, np.int64)
    if not table.keys.size:
        return empty, empty, empty
    hashes = window_hashes(tokens, n)
    maybe = table.bitmap[(hashes & np.uint64((1 << _BITMAP_BITS) - 1)).astype(np.int64)]
    row, start = np.nonzero(maybe)
    if not row.size:
        return empty, empty, empty
    h = hashes[row, start]
    at = np.searchsorted(table.keys, h)
    found = np.full(row.shape[0], -1, dtype=np.int64)
    windows = tokens[row[:, None], start[:, None] + np.arange(n)]
    for shift in range(table.max_shared):
        pos = at + shift
        ok = (found < 0) & (pos < table.keys.size)
        ok[ok] = table.keys[pos[ok]] == h[ok]
        if not ok.any():
            break
        candidate = table.order[pos[ok]]
        exact = (windows[ok] == table.spec.ngrams[candidate]).all(axis=1)
        found[np.flatnonzero(ok)[exact]] = candidate[exact]
    hit = found >= 0
    return row[hit].astype(np.int64), start[hit].astype(np.int64), found[hit]


def tiled(replacement: np.ndarray, length: int) -> np.ndarray:
    """``replacement`` repeated to ``length`` tokens."""
    return np.resize(np.asarray(replacement, dtype=np.int64), length)


@dataclass(frozen=True)
class RemovalStep:
    """The spans removed from one rank's batch at one step, in (experiment, row, offset) order.

    Attributes:
        local_row, offset, length: where each removed span is in this rank's batch.
        experiment: the removal experiment's index in the plan.
        sequence: the experiment's sequence whose n-gram matched first in the span.
        ngram_start: where that n-gram starts in the sequence.
        token_hash: xxh64 (:func:`multirun.ledger.token_hash`) of the tokens written over the span.
    """

    local_row: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    experiment: np.ndarray
    sequence: np.ndarray
    ngram_start: np.ndarray
    token_hash: np.ndarray

    def __len__(self) -> int:
        return int(self.local_row.shape[0])


def _merge(row: np.ndarray, start: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows ``[start, start + n)`` (sorted by row, start) merged into spans when they
    overlap or touch: ``(first window of each span, offset, length)``."""
    new = np.ones(row.shape[0], dtype=bool)
    new[1:] = (row[1:] != row[:-1]) | (start[1:] > start[:-1] + n)
    first = np.flatnonzero(new)
    last = np.append(first[1:], row.shape[0]) - 1
    return first, start[first], start[last] + n - start[first]


class StreamRemoval:
    """The run's removal experiments, applied to a batch's tokens in plan order.

    Args:
        specs: ``(experiment index, spec)`` of each removal experiment, in plan order.
    """

    def __init__(self, specs: Sequence[tuple[int, RemovalSpec]]) -> None:
        self.tables = [(index, _NgramTable(spec)) for index, spec in specs]
        self._hashes: dict[tuple[int, int], int] = {}

    @classmethod
    def of_experiments(cls, experiments: Sequence[PreparedExperiment]) -> StreamRemoval | None:
        """The removal of a plan's experiments; None when none removes anything (no work per step)."""
        specs = [(i, e.removal) for i, e in enumerate(experiments) if e.removal is not None and len(e.removal.ngrams)]
        return cls(specs) if specs else None

    def active_at(self, step: int) -> bool:
        """Whether any removal experiment scans rows at ``step`` (the same on every rank)."""
        return any(table.spec.active_at(step) for _, table in self.tables)

    def _hash_of(self, experiment: int, length: int, replacement: np.ndarray) -> int:
        key = (experiment, length)
        if key not in self._hashes:
            self._hashes[key] = token_hash(tiled(replacement, length))
        return self._hashes[key]

    def apply(self, tokens: np.ndarray, *, step: int) -> RemovalStep:
        """Overwrite, in ``tokens`` (``(rows, sequence_length)``, written in place), every
        span a removal experiment active at ``step`` removes; returns those spans."""
        parts: list[tuple[np.ndarray, ...]] = []
        length = tokens.shape[1]
        for index, table in self.tables:
            spec = table.spec
            if not spec.active_at(step):
                continue
            row, start, ngram = find_ngrams(tokens, table)
            if not row.size:
                continue
            if spec.span == "row":
                first = np.flatnonzero(np.append(True, row[1:] != row[:-1]))
                offset, span_length = np.zeros(first.size, np.int64), np.full(first.size, length, np.int64)
            else:
                first, offset, span_length = _merge(row, start, spec.n)
            span_row, span_ngram = row[first], ngram[first]
            self._write(tokens, span_row, offset, span_length, spec.replacement)
            # The replacement beside the row's own tokens may form a removed n-gram: such
            # rows are replaced whole (the replacement repeated holds none).
            touched = np.unique(span_row)
            again, _, _ = find_ngrams(tokens[touched], table)
            if again.size:
                whole = touched[np.unique(again)]
                keep = ~np.isin(span_row, whole)
                firsts = np.searchsorted(span_row, whole)  # the row's first span: its first match
                span_row = np.concatenate([span_row[keep], whole])
                span_ngram = np.concatenate([span_ngram[keep], span_ngram[firsts]])
                offset = np.concatenate([offset[keep], np.zeros(whole.size, np.int64)])
                span_length = np.concatenate([span_length[keep], np.full(whole.size, length, np.int64)])
                self._write(
                    tokens, whole, np.zeros(whole.size, np.int64), np.full(whole.size, length), spec.replacement
                )
                order = np.lexsort((offset, span_row))
                span_row, span_ngram, offset, span_length = (
                    a[order] for a in (span_row, span_ngram, offset, span_length)
                )
            hashes = np.array(
                [self._hash_of(index, int(n), spec.replacement) for n in span_length.tolist()], dtype=np.uint64
            )
            parts.append(
                (
                    span_row,
                    offset,
                    span_length,
                    np.full(span_row.size, index, np.int64),
                    spec.ngram_sequence[span_ngram],
                    spec.ngram_start[span_ngram],
                    hashes,
                )
            )
        if not parts:
            empty = np.empty(0, np.int64)
            return RemovalStep(empty, empty, empty, empty, empty, empty, np.empty(0, np.uint64))
        columns = [np.concatenate([p[i] for p in parts]) for i in range(7)]
        return RemovalStep(*columns)

    @staticmethod
    def _write(tokens: np.ndarray, rows: np.ndarray, offset: np.ndarray, length: np.ndarray, fill: np.ndarray) -> None:
        ends = np.cumsum(length)
        within = np.arange(int(ends[-1])) - np.repeat(ends - length, length)
        columns = np.repeat(offset, length) + within
        tokens[np.repeat(rows, length), columns] = np.asarray(fill, dtype=tokens.dtype)[within % len(fill)]


def remove_from_batch(
    removal: StreamRemoval,
    batch: Any,
    rows: BatchRows,
    lookup: np.ndarray,
    *,
    step: int,
    injected_rows: dict[int, int],
    derived: DerivedKeys,
    plan: RunPlan,
) -> tuple[Any, dict[str, np.ndarray] | None]:
    """Apply ``removal`` to a training batch in place, after this step's injection.

    ``rows`` were read before the injection (:meth:`BatchRows.of_batch`), ``lookup`` is
    the step's local row of each global row (-1: another rank's), ``injected_rows`` the
    original fingerprint of each row a span overwrote this step. Returns the batch and the
    keyword arguments of the removals ledger's ``LedgerWriter.append`` (None when nothing
    matched): the global row, sample id and original fingerprint of each removed span's row.
    """
    tokens = input_ids_of(batch).detach().cpu().numpy().copy()
    original = tokens.copy()  # rows no span touched this step are still the data's rows
    removed = removal.apply(tokens, step=step)
    if not len(removed):
        return batch, None
    local = removed.local_row
    lengths = removed.length
    ends = np.cumsum(lengths)
    within = np.arange(int(ends[-1])) - np.repeat(ends - lengths, lengths)
    token_rows = np.repeat(local, lengths)
    token_columns = np.repeat(removed.offset, lengths) + within
    batch = write_tokens(
        batch,
        rows=token_rows,
        columns=token_columns,
        tokens=tokens[token_rows, token_columns],
        rows_touched=local,
        derived=derived,
    )
    # The original row's fingerprint: the one taken before injection where a span was
    # written, else the row's tokens as the dataset gave them.
    if rows.fingerprint is not None:
        row_fingerprints = rows.fingerprint[local]
    else:
        row_fingerprints = np.array(
            [injected_rows[r] if r in injected_rows else token_hash(original[r]) for r in local.tolist()],
            dtype=np.uint64,
        )
    global_of_local = np.full(tokens.shape[0], -1, dtype=np.int64)
    mine = lookup >= 0
    global_of_local[lookup[mine]] = np.flatnonzero(mine)
    columns = {
        "step": step,
        "global_row": global_of_local[local],
        "local_row": local,
        "sample_id": rows.sample_id[local],
        "offset": removed.offset,
        "length": lengths,
        "experiment": removed.experiment,
        "item_index": plan.items_of(removed.experiment, removed.sequence),
        "sequence": removed.sequence,
        "repetition": removed.ngram_start,
        "token_hash": removed.token_hash,
        "row_fingerprint": row_fingerprints,
    }
    return batch, columns


def removed_inserts(experiments: Sequence[PreparedExperiment]) -> list[tuple[str, str, int, int]]:
    """Inserts a removal will overwrite: ``(experiment, removal experiment, sequences hit,
    sequences)`` for every injecting experiment with a sequence that holds an n-gram of a
    removal experiment. Such spans are still injected (and in the ledger); the removal then
    overwrites them where they hold the n-gram (and records that in the removals ledger).
    """
    found = []
    for remover in experiments:
        spec = remover.removal
        if spec is None or not len(spec.ngrams):
            continue
        table = _NgramTable(spec)
        for e in experiments:
            count = int(e.seq_lengths.shape[0])
            if e is remover or not count or not np.asarray(e.seq_repetitions).any():
                continue
            # Sequences as rows of one array, padded with -1 (never a token, never matched exactly).
            width = max(int(e.seq_lengths.max()), spec.n)
            rows = np.full((count, width), -1, dtype=np.int64)
            mask = np.arange(width) < np.asarray(e.seq_lengths)[:, None]
            rows[mask] = np.concatenate([e.sequence_tokens(j) for j in range(count)]).astype(np.int64)
            hit = np.unique(find_ngrams(rows, table)[0])
            if hit.size:
                found.append((e.name, remover.name, int(hit.size), count))
    return found
