"""Overwrite planned spans into one rank's host batch.

The callback reads each step's :class:`LocalRows` (sample ids and content fingerprints
of the original rows) once per step, maps them to global rows with
:func:`global_rows`, then overwrites the tokens in place with :func:`apply_spans`.
Sequence length never changes: injected tokens *replace* pretraining tokens, as in
the paper.

Global rows are defined so that 1 rank and N ranks agree (invariant 3): the rows of a
step are ordered by ``(key, rank, local_row)`` across all ranks, where the key is the
dataset's sample id or, for datasets without ids (llm-foundry's text dataset), a
fingerprint of the row's original tokens. Streaming gives every world size the same
set of samples per global step when the global batch and ``num_canonical_nodes`` are
fixed, so every world size overwrites the same original rows.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from multirun.errors import MultirunError

#: Batch keys kept consistent with ``input_ids`` (Hugging Face / llm-foundry convention).
INPUT_KEY = "input_ids"
LABELS_KEY = "labels"
ATTENTION_KEY = "attention_mask"
SAMPLE_ID_KEY = "sample_id"
SEQUENCE_ID_KEY = "sequence_id"
#: Per-row token counts llm-foundry's LossGeneratingTokensCollatorWrapper adds at collate time;
#: recounted on the touched rows, as its get_tokens_per_batch_func counts them.
TOTAL_TOKENS_KEY = "total_tokens"
LOSS_GENERATING_KEY = "loss_generating_tokens"
#: Label of a position that generates no loss (Hugging Face's and llm-foundry's convention).
IGNORE_INDEX = -100

_INT64 = np.dtype(np.int64)  # numpy's builtin dtypes are singletons: an identity check suffices


class BatchFormatError(MultirunError):
    """The training batch has a shape multirun cannot inject into."""


@dataclass(frozen=True)
class LocalRows:
    """What identifies each of this rank's batch rows at one step, read before any overwrite.

    Attributes:
        sample_id: the dataset's sample id of each row, -1 where the dataset gives none.
        fingerprint: :func:`multirun.ledger.token_hash` of each original row (xxh64 of its
            tokens as int32), so anyone can match a ledger row to the data it replaced.
    """

    sample_id: np.ndarray
    fingerprint: np.ndarray

    @classmethod
    def of_batch(cls, batch: Any) -> LocalRows:
        """The rows of a training batch (dict with ``input_ids`` or a plain token tensor)."""
        tokens = input_ids_of(batch).detach().cpu().numpy()
        ids = sample_ids_of(batch)
        return cls(
            sample_id=ids if ids is not None else np.full(tokens.shape[0], -1, dtype=np.int64),
            fingerprint=row_fingerprints(tokens),
        )

    def __len__(self) -> int:
        return int(self.fingerprint.shape[0])

    @property
    def keyed_by(self) -> str:
        """``sample_id`` when the dataset gives ids, else ``content``."""
        return "sample_id" if len(self) and bool((self.sample_id >= 0).all()) else "content"

    @property
    def key(self) -> np.ndarray:
        """The int64 key that orders the step's rows across ranks: the sample id when every
        row has one, else the row's fingerprint (its bits read as int64)."""
        if self.keyed_by == "sample_id":
            return self.sample_id.astype(np.int64)
        return self.fingerprint.astype(np.uint64).view(np.int64)


def row_fingerprints(tokens: np.ndarray) -> np.ndarray:
    """:func:`multirun.ledger.token_hash` of each row of a ``(rows, sequence_length)`` token array."""
    rows = np.ascontiguousarray(tokens, dtype=np.int32)
    # Each row of a C-contiguous int32 array is its int32 bytes: what token_hash hashes.
    return np.fromiter((xxhash.xxh64_intdigest(row) for row in rows), dtype=np.uint64, count=rows.shape[0])


@dataclass(slots=True)
class BatchRows:
    """This rank's rows at one step, for the callback's hot path: :class:`LocalRows` with
    the fingerprints computed only where needed (every row when they are the key, else
    only the rows a span overwrites, see :meth:`fingerprints_of`).

    Attributes:
        tokens: the batch's tokens, a host view of ``input_ids``: read it before the overwrite.
        sample_id: the dataset's sample id of each row, -1 where the dataset gives none.
        fingerprint: every row's fingerprint when the rows are keyed by content, else None.
        order: the rows sorted by :attr:`key` (stable): in one process, global row ``g``
            is local row ``order[g]`` (:func:`single_process_lookup`).
        ids: :attr:`sample_id` as Python ints, for the hot path's per-span lookups.
    """

    tokens: np.ndarray
    sample_id: np.ndarray
    fingerprint: np.ndarray | None
    order: list[int]
    ids: list[int]

    @classmethod
    def of_batch(cls, batch: Any) -> BatchRows:
        """The rows of a training batch (dict with ``input_ids`` or a plain token tensor).

        The few rows of a rank are sorted in Python: right after a training step, that
        costs less than a numpy sort."""
        tokens = _host_array(input_ids_of(batch))  # read before the overwrite, which writes through it
        ids = sample_ids_of(batch)
        if ids is None:
            ids = _no_sample_ids(int(tokens.shape[0]))
        id_list: list[int] = ids.tolist()
        if id_list and min(id_list) >= 0:  # every row has an id
            return cls(tokens, ids, None, sorted(range(len(id_list)), key=id_list.__getitem__), id_list)
        fingerprint = row_fingerprints(tokens)
        keys: list[int] = fingerprint.view(np.int64).tolist()
        return cls(tokens, ids, fingerprint, sorted(range(len(keys)), key=keys.__getitem__), id_list)

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])

    @property
    def keyed_by(self) -> str:
        """As :attr:`LocalRows.keyed_by`."""
        return "content" if self.fingerprint is not None else "sample_id"

    @property
    def key(self) -> np.ndarray:
        """As :attr:`LocalRows.key`."""
        if self.fingerprint is None:
            return self.sample_id
        return self.fingerprint.view(np.int64)

    def sample_ids_of(self, local_rows: Sequence[int]) -> list[int]:
        """The sample id of each of ``local_rows``."""
        ids = self.ids
        return [ids[row] for row in local_rows]

    def copies_of(self, local_rows: Sequence[int]) -> list[np.ndarray]:
        """A copy of each of ``local_rows``' tokens (call before the overwrite); consecutive
        entries naming one row share one copy."""
        tokens, copies, last, copy = self.tokens, [], -1, self.tokens[:0]
        for row in local_rows:
            if row != last:
                copy, last = tokens[row].copy(), row
            copies.append(copy)
        return copies

    def fingerprints_of(self, local_rows: Sequence[int]) -> np.ndarray:
        """The original fingerprint of each of ``local_rows`` (call before the overwrite).

        A row that several consecutive entries name (a step's spans come sorted by row)
        is hashed once.
        """
        if self.fingerprint is not None:
            return self.fingerprint[np.asarray(local_rows, dtype=np.int64)]
        tokens, hashes, last, digest = self.tokens, [], -1, 0
        for row in local_rows:
            if row != last:
                digest, last = xxhash.xxh64_intdigest(tokens[row].astype(np.int32)), row
            hashes.append(digest)
        return np.array(hashes, dtype=np.uint64)


@functools.cache
def _no_sample_ids(rows: int) -> np.ndarray:
    """``rows`` times -1, read-only: a batch without sample ids, every step (made once per size)."""
    missing = np.full(rows, -1, dtype=np.int64)
    missing.flags.writeable = False
    return missing


def key_buffer(keys: np.ndarray, capacity: int) -> torch.Tensor:
    """``[count, keys..., padding]``: one rank's row keys in the int64 tensor that
    :func:`row_lookup` reads, of the same shape on every rank (``capacity + 1``)."""
    if keys.shape[0] > capacity:
        raise BatchFormatError(
            f"a batch of {keys.shape[0]} rows on one rank, but the dataloader's batch size is {capacity}"
        )
    buffer = np.zeros(capacity + 1, dtype=np.int64)
    buffer[0] = keys.shape[0]
    buffer[1 : keys.shape[0] + 1] = keys
    return torch.from_numpy(buffer)


def single_process_lookup(keys: np.ndarray) -> np.ndarray:
    """:func:`row_lookup` in one process: global row ``g`` is local row ``lookup[g]``
    (:attr:`BatchRows.order` holds it already, as a list)."""
    return np.argsort(keys, kind="stable")


def row_lookup(gathered: np.ndarray, rank: int) -> np.ndarray:
    """The local row on ``rank`` of each of the step's global rows, -1 where another rank holds it.

    The global rows are :func:`global_rows`' (ordered by ``(key, rank, local row)``), read
    from every rank's :func:`key_buffer` stacked as ``gathered`` (``(world, capacity + 1)``);
    the result's length is the step's rows across all ranks.
    """
    counts = gathered[:, 0]
    held = np.arange(gathered.shape[1] - 1) < counts[:, None]
    owners, positions = np.nonzero(held)  # in (rank, local row) order
    # A stable sort by key keeps (rank, local row) order among equal keys.
    order = np.argsort(gathered[:, 1:][held], kind="stable")
    return np.where(owners[order] == rank, positions[order], -1)


@dataclass(frozen=True)
class RowMap:
    """Which global rows this rank holds at one step.

    ``global_row[i]`` is the global row of local row ``i``; ``total_rows`` is the
    number of rows of the step across all ranks; ``local`` identifies each local row.
    """

    global_row: np.ndarray
    total_rows: int
    local: LocalRows

    def local_rows_of(self, rows: np.ndarray) -> np.ndarray:
        """Local row of each global row in ``rows``, -1 where another rank holds it."""
        lookup = np.full(max(self.total_rows, 1), -1, dtype=np.int64)
        lookup[self.global_row] = np.arange(self.global_row.shape[0])
        inside = rows < self.total_rows
        out = np.full(rows.shape[0], -1, dtype=np.int64)
        out[inside] = lookup[rows[inside]]
        return out


def input_ids_of(batch: Any) -> torch.Tensor:
    """The ``(rows, sequence_length)`` token tensor of a dict or plain tensor batch."""
    if type(batch) is dict and INPUT_KEY in batch:  # the common case first: no ABC check
        tokens = batch[INPUT_KEY]
    elif isinstance(batch, torch.Tensor):
        tokens = batch
    elif isinstance(batch, Mapping) and INPUT_KEY in batch:
        tokens = batch[INPUT_KEY]
    else:
        raise BatchFormatError(
            "multirun injects into dict batches with an 'input_ids' tensor or plain token tensors; "
            f"got {type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
        )
    if tokens.ndim != 2:
        raise BatchFormatError(f"expected input_ids of shape (rows, sequence_length), got {tuple(tokens.shape)}")
    return tokens


def sample_ids_of(batch: Any) -> np.ndarray | None:
    """Dataset sample ids of the batch rows, when the dataset provides them."""
    if (type(batch) is dict or isinstance(batch, Mapping)) and SAMPLE_ID_KEY in batch:
        ids = batch[SAMPLE_ID_KEY]
        host = _host_array(ids) if isinstance(ids, torch.Tensor) else np.asarray(torch.as_tensor(ids).numpy())
        if host.dtype is _INT64 and host.ndim == 1:  # the usual case: nothing to convert (`==` costs more)
            return host
        return host.astype(np.int64, copy=False).reshape(-1)
    return None


def global_rows(local: LocalRows, *, rank: int, gathered_keys: Sequence[np.ndarray] | None) -> RowMap:
    """Map this rank's local rows to global rows.

    The step's rows are ordered by ``(key, rank, local_row)`` across all ranks, where
    the key is the sample id or, without ids, the original row's content fingerprint.
    Whenever the world sizes train on the same samples at each step (Streaming with a
    fixed global batch and ``num_canonical_nodes``), every world size gives each sample
    the same global row; rows whose keys tie hold the same sample or the same tokens,
    so whichever of them a span lands on, the model trains on the same tokens.

    Args:
        local: this rank's rows (:meth:`LocalRows.of_batch`).
        rank: this process's global rank.
        gathered_keys: every rank's :attr:`LocalRows.key` (index = rank); None in a single process.
    """
    if gathered_keys is None:
        gathered_keys, rank = [local.key], 0
    keys = np.concatenate([np.asarray(g, dtype=np.int64) for g in gathered_keys])
    owners = np.concatenate([np.full(len(g), r) for r, g in enumerate(gathered_keys)])
    positions = np.concatenate([np.arange(len(g)) for g in gathered_keys])
    order = np.lexsort((positions, owners, keys))
    global_of = np.empty(keys.shape[0], dtype=np.int64)
    global_of[order] = np.arange(keys.shape[0])
    mine = owners == rank
    return RowMap(global_of[mine][np.argsort(positions[mine])], total_rows=int(keys.shape[0]), local=local)


def flat_token_positions(
    local_row: np.ndarray, offset: np.ndarray, length: np.ndarray, sequence_length: int
) -> np.ndarray:
    """Flat indices into a ``(rows, sequence_length)`` tensor covering every span, in span order."""
    starts = local_row.astype(np.int64) * sequence_length + offset.astype(np.int64)
    lengths = length.astype(np.int64)
    span_of_token = np.repeat(np.arange(lengths.shape[0]), lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return starts[span_of_token] + within


#: Batch keys multirun keeps exact when it overwrites tokens; any other per-row key is refused.
KEPT_KEYS = frozenset(
    {INPUT_KEY, LABELS_KEY, ATTENTION_KEY, SAMPLE_ID_KEY, SEQUENCE_ID_KEY, TOTAL_TOKENS_KEY, LOSS_GENERATING_KEY}
)
_COUNTED_KEYS = (INPUT_KEY, ATTENTION_KEY, LABELS_KEY, "decoder_attention_mask")


@dataclass(frozen=True)
class SequenceIdRule:
    """How ``sequence_id`` follows from the tokens (llm-foundry's ``ConcatenatedSequenceCollatorWrapper``):
    a new sequence starts after each EOS, or at each BOS in ``bos_mode``.

    Example:
        >>> SequenceIdRule(split_token_id=0).of(torch.tensor([[5, 0, 6, 0, 7]])).tolist()
        [[0, 0, 1, 1, 2]]
        >>> SequenceIdRule(split_token_id=1, bos_mode=True).of(torch.tensor([[1, 5, 1, 6]])).tolist()
        [[1, 1, 2, 2]]
    """

    split_token_id: int
    bos_mode: bool = False

    def of(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The ``sequence_id`` of ``(rows, sequence_length)`` tokens, in their dtype."""
        return torch.from_numpy(self.of_array(_host_array(input_ids))).to(input_ids)

    def of_array(self, tokens: np.ndarray) -> np.ndarray:
        """:meth:`of` on a numpy array (int64)."""
        cumulative = np.cumsum(tokens == self.split_token_id, axis=1, dtype=np.int64)
        if self.bos_mode:
            return cumulative
        shifted = np.zeros_like(cumulative)
        shifted[:, 1:] = cumulative[:, :-1]
        return shifted


@dataclass(frozen=True)
class DerivedKeys:
    """How a batch's derived per-row keys follow from its tokens.

    Found on the dataloader's collator (:meth:`of_collator`), so that after an overwrite
    they are computed again by the same rule that made them: llm-foundry's sequence-id
    wrapper and its loss-generating-token counter.

    Attributes:
        sequence_id: the rule of ``sequence_id``; None when the batch has none or no rule is known.
        count_tokens: llm-foundry's per-row token counting function (``token_counting_func``
            of its ``LossGeneratingTokensCollatorWrapper``); None: multirun counts by the same rule.
        counts_by_rule: ``count_tokens`` is llm-foundry's own decoder-only counter, whose rule
            multirun's count reproduces: the touched rows are then counted in one pass
            instead of one call per row (labelled batches; that function needs labels to
            count loss-generating tokens).
    """

    sequence_id: SequenceIdRule | None = None
    count_tokens: Callable[[dict[str, torch.Tensor]], Any] | None = None
    counts_by_rule: bool = False

    @classmethod
    def of_collator(cls, collate_fn: object, *, eos_token_id: int | None) -> DerivedKeys:
        """Walk the collator's ``base_collator`` chain; without a sequence-id wrapper, assume EOS mode."""
        rule, count = None, None
        seen: set[int] = set()
        while collate_fn is not None and id(collate_fn) not in seen:
            seen.add(id(collate_fn))
            split = getattr(collate_fn, "split_token_id", None)
            if rule is None and isinstance(split, int):
                rule = SequenceIdRule(split, bool(getattr(collate_fn, "bos_mode", False)))
            counter = getattr(collate_fn, "token_counting_func", None)
            if count is None and callable(counter):
                count = counter
            collate_fn = getattr(collate_fn, "base_collator", None)
        if rule is None and eos_token_id is not None:
            rule = SequenceIdRule(eos_token_id)
        return cls(rule, count, count is not None and _is_llmfoundry_decoder_counter(count))


def _is_llmfoundry_decoder_counter(count: Callable[..., Any]) -> bool:
    """Whether ``count`` is the function llm-foundry's ``get_tokens_per_batch_func(decoder_only=True)``
    returns. Every such closure shares the factory's one code object, so identity of the code
    is the test; a wrapper or any other function is counted by calling it, row by row."""
    module = sys.modules.get(getattr(count, "__module__", None) or "")  # loaded when its collator made ``count``
    factory = getattr(module, "get_tokens_per_batch_func", None)
    code = getattr(count, "__code__", None)
    if factory is None or code is None or code is not factory(decoder_only=True).__code__:
        return False
    return inspect.getclosurevars(count).nonlocals.get("decoder_only") is True


def check_batch(batch: Any, derived: DerivedKeys) -> None:
    """Refuse, before anything is overwritten, a batch multirun cannot keep exact.

    Every per-row key must be one multirun keeps consistent (:data:`KEPT_KEYS`), and the
    batch's own ``sequence_id``, ``total_tokens`` and ``loss_generating_tokens`` must be
    what ``derived`` computes from its tokens: then they are exact after the overwrite too.
    """
    tokens = input_ids_of(batch)
    if not isinstance(batch, Mapping):
        return
    rows = tokens.shape[0]
    unknown = sorted(
        str(k)
        for k, v in batch.items()
        if k not in KEPT_KEYS and isinstance(v, (torch.Tensor, list)) and len(v) == rows
    )
    if unknown:
        raise BatchFormatError(
            f"the batch carries per-row keys multirun cannot keep consistent with injected tokens: {unknown}; "
            f"multirun keeps {sorted(KEPT_KEYS)}: remove the others from the collator, or inject elsewhere"
        )
    if SEQUENCE_ID_KEY in batch:
        if derived.sequence_id is None:
            raise BatchFormatError("the batch has 'sequence_id' but the tokenizer has no EOS token to recompute it")
        if not torch.equal(derived.sequence_id.of(tokens), batch[SEQUENCE_ID_KEY].to(tokens.dtype)):
            raise BatchFormatError(
                f"the batch's 'sequence_id' does not follow from token {derived.sequence_id.split_token_id} "
                f"({'BOS' if derived.sequence_id.bos_mode else 'EOS'} mode), so it could not be recomputed after an "
                "overwrite; use llm-foundry's sequence-id collator or the tokenizer's EOS"
            )
    for key, counted in zip((TOTAL_TOKENS_KEY, LOSS_GENERATING_KEY), _token_counts(batch, np.arange(rows), derived)):
        if key in batch and [int(c) for c in batch[key]] != counted:
            raise BatchFormatError(
                f"the batch's {key!r} are not the per-row counts multirun would compute again after an overwrite"
            )


def apply_spans(
    batch: Any,
    *,
    positions: np.ndarray,
    tokens: np.ndarray,
    rows_touched: np.ndarray,
    derived: DerivedKeys,
) -> Any:
    """Overwrite ``tokens`` at flat ``positions`` of the batch, in place (as :func:`write_tokens`).

    Returns the (same) batch.
    """
    if positions.shape[0] == 0:
        return batch
    rows, columns = np.divmod(positions, input_ids_of(batch).shape[1])
    return write_tokens(batch, rows=rows, columns=columns, tokens=tokens, rows_touched=rows_touched, derived=derived)


def write_tokens(
    batch: Any,
    *,
    rows: np.ndarray,
    columns: np.ndarray,
    tokens: np.ndarray,
    rows_touched: np.ndarray,
    derived: DerivedKeys,
) -> Any:
    """Overwrite ``tokens`` at ``(rows, columns)`` of the ``(rows, sequence_length)`` batch, in place.

    ``labels`` get the same tokens (they are a copy of ``input_ids`` in causal LM
    batches), ``attention_mask`` becomes 1 on injected tokens, and on the touched rows
    llm-foundry's ``sequence_id`` and per-row ``total_tokens`` and
    ``loss_generating_tokens`` are computed again by ``derived``'s rules.
    Returns the (same) batch.
    """
    if rows.shape[0] == 0:
        return batch
    input_ids = input_ids_of(batch)
    shape = input_ids.shape
    for tensor, values in _written(batch, input_ids, tokens):
        _overwrite(tensor, shape, rows, columns, values)
    _recount_rows(batch, input_ids, rows_touched, derived)
    return batch


#: Above this many runs, :func:`write_runs` writes each tensor with one fancy-indexed
#: assignment instead of a slice assignment per run.
FEW_RUNS = 64


def write_runs(
    batch: Any,
    *,
    rows: Sequence[int],
    columns: Sequence[int],
    lengths: Sequence[int],
    source: np.ndarray,
    starts: Sequence[int],
    derived: DerivedKeys,
    few_runs: int = FEW_RUNS,
) -> Any:
    """Overwrite contiguous runs of tokens in the batch, in place, as :func:`write_tokens` does:
    run ``k`` writes ``source[starts[k]:starts[k] + lengths[k]]`` at ``columns[k]`` onwards of
    row ``rows[k]``.

    A step writes a few runs per rank, and a slice assignment per run is the cheapest write
    right after a training step (no index arrays, no ufunc); more than ``few_runs`` go through
    :func:`write_tokens`. Returns the (same) batch.

    Example:
        >>> batch = {"input_ids": torch.zeros(2, 6, dtype=torch.int64)}
        >>> _ = write_runs(batch, rows=[1, 0], columns=[2, 0], lengths=[3, 1], source=np.arange(10, 20),
        ...                starts=[0, 5], derived=DerivedKeys())
        >>> batch["input_ids"].tolist()
        [[15, 0, 0, 0, 0, 0], [0, 0, 10, 11, 12, 0]]
    """
    if not rows:
        return batch

    def each_token() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The runs as ``write_tokens``' arrays: each token's row, column and value."""
        token_rows = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
        return token_rows, run_positions(columns, lengths), source[run_positions(starts, lengths)]

    if len(rows) > few_runs:
        token_rows, token_columns, tokens = each_token()
        return write_tokens(
            batch, rows=token_rows, columns=token_columns, tokens=tokens, rows_touched=token_rows, derived=derived
        )
    input_ids = input_ids_of(batch)
    shape = input_ids.shape
    for tensor, values in _written(batch, input_ids, source):
        view = _numpy_view(tensor, shape)
        if view is None:  # torch writes it, through index arrays
            token_rows, token_columns, tokens = each_token()
            _overwrite(tensor, shape, token_rows, token_columns, values if isinstance(values, int) else tokens)
        elif isinstance(values, int):
            for row, column, length in zip(rows, columns, lengths):
                view[row, column : column + length] = values
        else:
            for row, column, length, start in zip(rows, columns, lengths, starts):
                view[row, column : column + length] = values[start : start + length]
    _recount_rows(batch, input_ids, rows, derived)
    return batch


def run_positions(firsts: Sequence[int] | np.ndarray, lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """``first, first + 1, ..., first + length - 1`` of each run, run after run (int64).

    Example:
        >>> run_positions([5, 0], [2, 3]).tolist()
        [5, 6, 0, 1, 2]
    """
    lengths_ = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths_)
    total = int(ends[-1]) if lengths_.shape[0] else 0
    within = np.arange(total, dtype=np.int64) - np.repeat(ends - lengths_, lengths_)
    return np.repeat(np.asarray(firsts, dtype=np.int64), lengths_) + within


def _written(batch: Any, input_ids: torch.Tensor, tokens: Any) -> list[tuple[torch.Tensor, Any]]:
    """The tensors an injection writes, each with what it gets: ``tokens`` in ``input_ids``
    and ``labels``, 1 in ``attention_mask``."""
    written: list[tuple[torch.Tensor, Any]] = [(input_ids, tokens)]
    if type(batch) is dict or isinstance(batch, MutableMapping):
        if LABELS_KEY in batch and isinstance(batch[LABELS_KEY], torch.Tensor):
            written.append((batch[LABELS_KEY], tokens))
        if ATTENTION_KEY in batch and isinstance(batch[ATTENTION_KEY], torch.Tensor):
            written.append((batch[ATTENTION_KEY], 1))
    return written


def _recount_rows(
    batch: Any, input_ids: torch.Tensor, rows_touched: Sequence[int] | np.ndarray, derived: DerivedKeys
) -> None:
    """Recompute llm-foundry's per-row keys (``sequence_id``, token counts) on the touched rows,
    in numpy on the host (a torch operation costs several numpy ones on these few rows)."""
    if not (type(batch) is dict or isinstance(batch, MutableMapping)):
        return
    if SEQUENCE_ID_KEY not in batch and TOTAL_TOKENS_KEY not in batch and LOSS_GENERATING_KEY not in batch:
        return
    rows_list = rows_touched.tolist() if isinstance(rows_touched, np.ndarray) else rows_touched
    touched = np.array(sorted(set(rows_list)), dtype=np.int64)
    if SEQUENCE_ID_KEY in batch:
        if derived.sequence_id is None:
            raise BatchFormatError("the batch has 'sequence_id' but the tokenizer has no EOS token to recompute it")
        column = batch[SEQUENCE_ID_KEY]
        recomputed = derived.sequence_id.of_array(_host_array(input_ids)[touched])
        view = _numpy_view(column, tuple(input_ids.shape))
        if view is not None:
            view[touched] = recomputed
        else:
            column[torch.from_numpy(touched).to(column.device)] = torch.from_numpy(recomputed).to(column)
    if TOTAL_TOKENS_KEY in batch or LOSS_GENERATING_KEY in batch:
        _store_counts(batch, touched, _token_counts(batch, touched, derived))


def _host_array(tensor: torch.Tensor) -> np.ndarray:
    """The tensor as a numpy array: a view sharing its memory on the host, else a copy."""
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError):  # another device, autograd, or a dtype numpy lacks
        return tensor.detach().cpu().numpy()


def _numpy_view(tensor: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray | None:
    """A numpy view of a host tensor laid out as ``input_ids`` (``shape``), else None: writing
    through it costs no torch dispatch, nor release of the GIL, on the training loop's critical path."""
    try:
        view = tensor.numpy()
    except (TypeError, RuntimeError):  # another device, autograd, or a dtype numpy lacks
        return None
    return view if view.shape == shape else None


def _overwrite(
    tensor: torch.Tensor, shape: tuple[int, ...], rows: np.ndarray, columns: np.ndarray, values: np.ndarray | int
) -> None:
    """``tensor[rows, columns] = values`` for a tensor laid out as ``input_ids`` (``shape``):
    through a numpy view on the host, else by torch on its flat view."""
    view = _numpy_view(tensor, shape)
    if view is not None:
        view[rows, columns] = values
        return
    index = torch.from_numpy(rows * shape[1] + columns).to(tensor.device)
    if isinstance(values, int):
        tensor.view(-1)[index] = values
    else:
        tensor.view(-1)[index] = torch.from_numpy(np.ascontiguousarray(values)).to(tensor)


def _token_counts(batch: Mapping, rows: np.ndarray, derived: DerivedKeys) -> tuple[list[int], list[int]]:
    """(total, loss-generating) token counts of ``rows`` as llm-foundry's collator counts them:
    by its rule (:func:`_counts_by_rule`) when no counting function is known or it is
    llm-foundry's own, else with the collator's function, one row at a time as the collator calls it."""
    if derived.count_tokens is None or (derived.counts_by_rule and LABELS_KEY in batch):
        return _counts_by_rule(batch, rows)
    totals: list[int] = []
    generating: list[int] = []
    for row in rows.tolist():
        one = {k: batch[k][row : row + 1] for k in _COUNTED_KEYS if k in batch}
        counted = derived.count_tokens(one)
        total, loss = (
            (counted["total"], counted["loss_generating"]) if isinstance(counted, dict) else (counted, counted)
        )
        totals.append(int(total))
        generating.append(int(loss))
    return totals, generating


def _counts_by_rule(batch: Mapping, rows: np.ndarray) -> tuple[list[int], list[int]]:
    """llm-foundry's count of each of ``rows``, all in one pass: the tokens under the attention
    mask (every token without one), and the label positions after the first that are not
    ``IGNORE_INDEX`` (the total without labels)."""
    length = int(batch[INPUT_KEY].shape[1])
    if ATTENTION_KEY in batch:
        totals = [int(v) for v in _host_array(batch[ATTENTION_KEY])[rows].sum(axis=1).tolist()]
    else:
        totals = [length] * int(rows.shape[0])
    if LABELS_KEY not in batch:
        return totals, totals
    ignored = np.count_nonzero(_host_array(batch[LABELS_KEY])[rows, 1:] == IGNORE_INDEX, axis=1)
    return totals, [length - 1 - int(v) for v in ignored.tolist()]


def _store_counts(batch: MutableMapping, rows: np.ndarray, counts: tuple[list[int], list[int]]) -> None:
    rows_in_batch = input_ids_of(batch).shape[0]
    for key, values in zip((TOTAL_TOKENS_KEY, LOSS_GENERATING_KEY), counts):
        if key not in batch:
            continue
        column = batch[key]
        if not isinstance(column, (list, torch.Tensor)) or len(column) != rows_in_batch:
            raise BatchFormatError(f"the batch's {key!r} is not one count per row")
        for row, value in zip(rows.tolist(), values):
            column[row] = value if isinstance(column, list) else torch.as_tensor(value, dtype=column.dtype)
