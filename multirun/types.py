"""Plain data types shared by the planner, the callback, the ledger and injectors.

These are the contracts between modules: injectors produce :class:`PreparedExperiment`,
the planner turns them into a :class:`SpanTable`, the callback applies spans and the
ledger records them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

PlacementMode = Literal["uniform", "window", "steps"]


@dataclass(frozen=True)
class BatchGeometry:
    """Shape of the training run as the planner sees it.

    Steps are global batch indices (Composer's ``timestamp.batch`` when the batch
    was drawn), counted across epochs. Rows are global rows ``0 .. global_batch_size-1``.
    """

    global_batch_size: int
    sequence_length: int
    num_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.sequence_length

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.num_steps


@dataclass(frozen=True)
class Placement:
    """Where an experiment's spans may go, already resolved to steps.

    ``uniform``: steps drawn uniformly from ``[start_step, end_step)`` (the whole run).
    ``window``: the same, over a sub-range of the run.
    ``steps``: spans are spread over the explicit ``steps`` (round-robin, shuffled).
    ``whole``: ``row`` (each span fills a row) or ``batch`` (every row of each step);
    ``at``: ``boundary`` (inserted at a document boundary, one span per row). See
    docs/placement.md.
    """

    mode: PlacementMode
    start_step: int
    end_step: int
    steps: tuple[int, ...] = ()
    whole: Literal["row", "batch"] | None = None
    at: Literal["any", "boundary"] = "any"

    @property
    def by_row(self) -> bool:
        """Whether each span reserves its whole row (whole rows, whole batches, boundary inserts)."""
        return self.whole is not None or self.at == "boundary"


@dataclass
class PreparedExperiment:
    """An experiment turned into injectable token sequences.

    A *sequence* is one injectable unit (e.g. one paraphrase of a fact, already
    EOS-wrapped); an *item* is what arms and metrics are about. Several sequences
    may belong to one item; control items own no sequences.

    Attributes:
        name: unique experiment name.
        kind: injector kind (``documents``, ``contamination``, ...).
        item_ids: ids of all items, treated and control, in payload order.
        treated: boolean mask over ``item_ids``.
        token_pool: all sequences' tokens, concatenated (int32).
        seq_offsets: start of each sequence in ``token_pool`` (int64).
        seq_lengths: length of each sequence (int32).
        seq_items: item index of each sequence (int32).
        seq_repetitions: how often each sequence is injected; fractional values
            are resolved by the planner so that the total is ``round(sum)``.
        placement: where the spans may go.
        fingerprint: content fingerprint of payload + experiment config.
        metadata: kind-specific plain data written to ``manifest.json`` (repetition
            groups, triggers, ...); keep it small.
        probes: the kind's probes dataclass (e.g.
            :class:`multirun.kinds.probes.KnowledgeProbes`): what the experiment's
            monitor scores (probe questions, held-out prompts, reference
            sequences); the injector builds it, the monitor reads its attributes.
            Not written anywhere.
        embedding_noise: Gaussian noise added to the input embeddings of this
            experiment's injected spans during training (the Gaussian watermark).
        removal: what this experiment removes from the training stream (the ``removal``
            kind): every row holding one of its n-grams is overwritten after injection
            (:mod:`multirun.inject.removal`). None for every other kind.
    """

    name: str
    kind: str
    item_ids: list[str]
    treated: np.ndarray
    token_pool: np.ndarray
    seq_offsets: np.ndarray
    seq_lengths: np.ndarray
    seq_items: np.ndarray
    seq_repetitions: np.ndarray
    placement: Placement
    fingerprint: str
    metadata: dict = field(default_factory=dict)
    probes: object = None
    embedding_noise: EmbeddingNoise | None = None
    removal: RemovalSpec | None = None

    def sequence_tokens(self, seq: int) -> np.ndarray:
        start = int(self.seq_offsets[seq])
        return self.token_pool[start : start + int(self.seq_lengths[seq])]


@dataclass(frozen=True)
class EmbeddingNoise:
    """Seeded Gaussian noise N(0, sigma^2) on the input embeddings of injected spans.

    The noise of item ``i`` is regenerable from ``(seed, i)`` alone (see
    :func:`multirun.inject.noise.item_noise`), so monitors can test for it and never-injected
    control items get fresh noise of the same law.
    """

    sigma: float
    seed: int


RemovalSpan = Literal["match", "row"]


@dataclass(frozen=True)
class RemovalSpec:
    """What one ``removal`` experiment takes out of the training stream.

    Every training row that holds, after injection, one of ``ngrams`` (the length-``n``
    windows of the experiment's treated sequences) is overwritten with ``replacement``
    repeated: over the matched windows (``span="match"``, overlapping or adjacent windows
    merged) or over the whole row (``span="row"``), at the steps ``start_step <= t <
    end_step`` (or only at ``steps`` when given). See :mod:`multirun.inject.removal`.

    Attributes:
        n: the n-gram length, in tokens.
        ngrams: ``(m, n)`` int64, every distinct window of every treated sequence.
        ngram_sequence: the experiment's sequence each window was taken from (the first one holding it).
        ngram_start: where the window starts in that sequence.
        replacement: the tokens written over a removed span, repeated to fill it (int64, non-empty).
        span: ``match`` or ``row``.
        start_step, end_step: the steps at which rows are scanned (half-open).
        steps: when non-empty, only these steps are scanned.
    """

    n: int
    ngrams: np.ndarray
    ngram_sequence: np.ndarray
    ngram_start: np.ndarray
    replacement: np.ndarray
    span: RemovalSpan = "match"
    start_step: int = 0
    end_step: int = 2**62
    steps: tuple[int, ...] = ()

    def active_at(self, step: int) -> bool:
        """Whether rows are scanned at ``step``."""
        if self.steps:
            return step in self.steps
        return self.start_step <= step < self.end_step


SPAN_COLUMNS: dict[str, type] = {
    "step": np.int64,
    "row": np.int32,
    "offset": np.int32,
    "length": np.int32,
    "experiment": np.int16,
    "sequence": np.int32,
    "repetition": np.int32,
}


@dataclass
class SpanTable:
    """Columnar spans sorted by ``(step, row, offset)``.

    ``experiment`` indexes the run's experiment list, ``sequence`` that
    experiment's sequences, ``repetition`` counts from 0 per sequence.
    """

    step: np.ndarray
    row: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    experiment: np.ndarray
    sequence: np.ndarray
    repetition: np.ndarray

    def __len__(self) -> int:
        return int(self.step.shape[0])

    @classmethod
    def empty(cls) -> SpanTable:
        return cls(**{name: np.empty(0, dtype) for name, dtype in SPAN_COLUMNS.items()})

    @classmethod
    def concat(cls, tables: list[SpanTable]) -> SpanTable:
        """Concatenate and re-sort by (step, row, offset)."""
        if not tables:
            return cls.empty()
        cols = {
            n: np.concatenate([getattr(t, n) for t in tables]).astype(d, copy=False) for n, d in SPAN_COLUMNS.items()
        }
        order = np.lexsort((cols["offset"], cols["row"], cols["step"]))
        return cls(**{n: c[order] for n, c in cols.items()})

    def take(self, index: np.ndarray | slice) -> SpanTable:
        return SpanTable(**{n: getattr(self, n)[index] for n in SPAN_COLUMNS})

    def step_slice(self, step: int) -> slice:
        """Slice of the spans of one step (the table must be sorted)."""
        lo = int(np.searchsorted(self.step, step, side="left"))
        hi = int(np.searchsorted(self.step, step, side="right"))
        return slice(lo, hi)
