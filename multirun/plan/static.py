"""Span planner: where every injected sequence goes, decided once, vectorised.

The planner turns each :class:`~multirun.types.PreparedExperiment` into spans
``(step, global row, offset, length)`` such that (invariant 5 of docs/architecture.md)

* no span crosses a sequence boundary: ``0 <= offset`` and ``offset + length <= sequence_length``;
* no two spans overlap, across all experiments;
* the tokens injected into one step never exceed the per-step cap
  ``floor(max_modified_fraction * global_batch_size * sequence_length)``;
* whatever cannot be placed is reported (error or warning), never dropped silently.

Core idea: a span is an interval on one flat token axis. Position
``g = (step * global_batch_size + row) * sequence_length + offset`` numbers every
token of the run; because a span never crosses its row, two spans overlap iff their
flat intervals intersect. All spans placed so far live in :class:`Occupancy` as a
sorted array of flat starts, so collision tests are one ``searchsorted``. Placement
draws every pending span at once, rejects collisions (with placed spans and within
the draw), enforces the per-step cap with a ``bincount``, commits the survivors and
re-draws only the rejected ones, for a bounded number of rounds.

Static schedule (:func:`plan_static`) and later dynamic requests from controllers
both go through :meth:`Occupancy.place`, so they share one collision and cap rule.

Cost (issue 17): at the paper's geometry (10M spans, 100k steps x 512 rows x 4096
tokens) the work is a few passes over int32/int64 arrays, one packed sort per
experiment and one for the final table, and a ``searchsorted`` only for the draws
whose block of the byte map already holds a span. Fresh memory costs as much as
the arithmetic at this size (page faults), so buffers are reused and no per-round
array is as large as the run's spans; ``benchmarks/bench_planner.py`` prints the
figures.

Determinism and independence: each experiment draws from its own generator
:func:`experiment_rng` ``(seed, name, stream=0)`` and experiments are placed in
declaration order, each avoiding only the spans of the experiments before it.
Appending an experiment therefore never moves the spans of earlier ones.
*Inserting* one earlier in the list (or changing an earlier one) may move later
experiments' spans: the later draws are the same, but a draw that now collides with
the new experiment, or hits a step whose cap it used up, is re-drawn.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import numpy as np
import xxhash

from multirun.errors import PlacementError
from multirun.types import SPAN_COLUMNS, BatchGeometry, PreparedExperiment, SpanTable

__all__ = [
    "DEFAULT_MAX_ROUNDS",
    "Occupancy",
    "PlaceOutcome",
    "PlanResult",
    "UnplacedSpansWarning",
    "cap_tokens",
    "experiment_rng",
    "occupancy_of",
    "plan_static",
    "resolve_repetitions",
    "stable_id",
]

#: Re-draw rounds before a still-colliding span is reported as unplaceable. At the
#: paper's density (about 1% of tokens injected) nearly every span lands in round 1
#: and the rest within a handful; the bound only matters for crowded schedules.
DEFAULT_MAX_ROUNDS = 64

_EXPERIMENT_INDEX_MAX = int(np.iinfo(SPAN_COLUMNS["experiment"]).max)

#: Runs (sorted span arrays) an :class:`Occupancy` keeps before merging the two
#: smallest: each collision test searches every run, and a merge copies both.
_MAX_RUNS = 8
#: A ``place`` call with at least this many spans builds the occupancy's block map
#: (one byte per block of ``2**shift >= L`` tokens, at most ``_MAP_MAX_BYTES``); below
#: it, searching every run is cheaper than building the map.
_MAP_MIN_SPANS = 1 << 16
_MAP_MAX_BYTES = 1 << 26


class UnplacedSpansWarning(UserWarning):
    """Some spans could not be placed and ``on_unplaceable="warn"`` was chosen."""


# --------------------------------------------------------------------------- rng


def stable_id(name: str) -> int:
    """A 64-bit id of ``name`` that is stable across processes and Python versions.

    (``hash(str)`` is salted per process, so it cannot seed anything.)
    """
    return xxhash.xxh64_intdigest(name.encode("utf-8"))


def experiment_rng(seed: int, name: str, stream: int = 0) -> np.random.Generator:
    """The random generator of one experiment's random stream.

    Every module that needs randomness for an experiment derives it here, with its
    own ``stream`` number, so that streams never share draws and do not depend on
    the other experiments of the run. The planner uses ``stream=0``.

    Example:
        >>> a = experiment_rng(7, "canaries").integers(0, 1000, 3)
        >>> b = experiment_rng(7, "canaries").integers(0, 1000, 3)
        >>> bool((a == b).all())
        True
    """
    if seed < 0 or stream < 0:
        raise ValueError(f"seed and stream must be non-negative, got seed={seed}, stream={stream}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), stable_id(name), int(stream)]))


def resolve_repetitions(seq_repetitions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Turn fractional repetition counts into integers with an exact total.

    The total is ``round(math.fsum(r))``: ``fsum`` is the correctly rounded sum, so
    float noise cannot shift it (25 x ``0.1`` sums to 2.5, not 2.5000000000000004),
    and ``round`` is Python's, half to even on the total (``[1.5]`` gives 2,
    ``[2.5]`` gives 2). Each sequence gets ``floor(r)``; the ``k = total - sum(floor(r))``
    extra placements go to ``k`` distinct sequences drawn without replacement with
    weights equal to their fractional parts (Efraimidis and Spirakis: the ``k``
    largest keys ``log(U) / w``, the same law as drawing them one by one
    proportionally to the fractional parts). So every sequence gets ``floor(r)`` or
    ``ceil(r)``, and no draws are made when all values are integers.

    Example:
        >>> counts = resolve_repetitions(np.array([1.5, 1.5, 2.0]), np.random.default_rng(0))
        >>> int(counts.sum()), sorted(counts.tolist())
        (5, [1, 2, 2])
    """
    reps = np.asarray(seq_repetitions, dtype=np.float64)
    if reps.ndim != 1:
        raise ValueError(f"seq_repetitions must be 1-D, got shape {reps.shape}")
    if not np.isfinite(reps).all() or (reps < 0).any():
        raise ValueError("seq_repetitions must be finite and non-negative")
    counts = reps.astype(np.int64)  # floor, as reps >= 0
    candidates = np.flatnonzero(reps != counts)
    frac = reps[candidates] - counts[candidates]  # exact in floating point for the values we can count
    whole = int(counts.sum())
    # fsum([whole, *fractions]) is the correctly rounded sum of all r (whole is exact
    # as a float), without converting every integer-valued entry to a Python float.
    extra = round(math.fsum([float(whole), *frac.tolist()])) - whole
    if extra == 0:
        return counts
    # extra <= candidates.size: every fraction is < 1, so their sum is < candidates.size.
    keys = np.log1p(-rng.random(candidates.size)) / frac  # log(U), U in (0, 1]
    if extra < candidates.size:
        # The `extra` largest keys, ties to the lower index (as a stable sort would),
        # found by one partition instead of a full sort.
        kth = np.partition(keys, candidates.size - extra)[candidates.size - extra]
        chosen = keys > kth
        ties = np.flatnonzero(keys == kth)
        chosen[ties[: extra - int(np.count_nonzero(chosen))]] = True
        candidates = candidates[chosen]
    counts[candidates] += 1
    return counts


# --------------------------------------------------------------------- occupancy


def cap_tokens(geometry: BatchGeometry, max_modified_fraction: float) -> int:
    """Per-step cap ``floor(max_modified_fraction * global_batch_size * sequence_length)``.

    Computed exactly from the fraction's shortest decimal form, so ``0.29`` of 100
    tokens is 29 and not 28 (``0.29 * 100 == 28.999999999999996`` in floats).
    """
    if not (0.0 < max_modified_fraction <= 1.0):
        raise ValueError(f"max_modified_fraction must be in (0, 1], got {max_modified_fraction}")
    return math.floor(Fraction(repr(float(max_modified_fraction))) * geometry.tokens_per_step)


@dataclass
class PlaceOutcome:
    """What :meth:`Occupancy.place` did with each requested length.

    ``index`` lists the requests that were placed, in ``(step, row, offset)`` order;
    ``step``, ``row`` and ``offset`` are aligned with it. Requests that were not
    placed are split by cause: ``unplaced_cap`` had no allowed step with cap budget
    left for their length (this can only get worse, so they are not re-drawn);
    ``unplaced_collision`` still collided after the last re-draw round.
    """

    index: np.ndarray
    step: np.ndarray
    row: np.ndarray
    offset: np.ndarray
    unplaced_cap: np.ndarray
    unplaced_collision: np.ndarray
    rounds: int

    @property
    def num_unplaced(self) -> int:
        return int(self.unplaced_cap.size + self.unplaced_collision.size)


class Occupancy:
    """All spans placed so far, with the collision and per-step cap rules.

    Spans are kept as a few *runs*: sorted arrays of flat starts
    ``(step * B + row) * L + offset`` with their lengths (12 bytes a span), mutually
    disjoint, plus the tokens used per step. Each :meth:`add` call adds one run and
    each :meth:`place` call up to two (its first round's spans, and the later
    rounds' merged); the two smallest runs are merged when there are more than
    ``_MAX_RUNS``, so the static plan's experiments are never copied into one array
    while it is built. A collision test is a ``searchsorted`` per run; for large
    requests a byte map of the token axis in blocks of ``2**shift >= L`` tokens
    (set where some span starts or ends) first discards the draws whose blocks are
    empty, so only the few that share a block with a span are searched.

    The static planner builds one; a controller that later asks for more spans
    keeps one built from the static table (:meth:`from_spans`) and calls
    :meth:`place` for steps ``[t + 1, t + k)``.

    Example:
        >>> geo = BatchGeometry(global_batch_size=4, sequence_length=16, num_steps=10)
        >>> occ = Occupancy(geo, cap_tokens=cap_tokens(geo, 0.25))
        >>> out = occ.place(np.array([5, 5, 8]), np.random.default_rng(0), step_lo=2, step_hi=4)
        >>> out.num_unplaced, len(occ), set(out.step.tolist()) <= {2, 3}
        (0, 3, True)
    """

    def __init__(self, geometry: BatchGeometry, cap_tokens: int, spans: SpanTable | None = None) -> None:
        if geometry.global_batch_size < 1 or geometry.sequence_length < 1 or geometry.num_steps < 1:
            raise ValueError(f"geometry must have positive sizes, got {geometry}")
        if cap_tokens < 0:
            raise ValueError(f"cap_tokens must be >= 0, got {cap_tokens}")
        self.geometry = geometry
        self.cap_tokens = int(cap_tokens)
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted flat starts int64, lengths int32)
        self._used = np.zeros(geometry.num_steps, np.int64)  # injected tokens per step
        # Block map (built by the first large place() call): the smallest power of
        # two >= L keeps every span within two blocks (one when L is a power of two,
        # as blocks then end on row boundaries), coarser when the run is too long for
        # _MAP_MAX_BYTES.
        L, total = geometry.sequence_length, geometry.total_tokens
        shift = (L - 1).bit_length()
        while ((total - 1) >> shift) + 1 > _MAP_MAX_BYTES:
            shift += 1
        self._shift = shift
        self._one_block = L & (L - 1) == 0
        BL = geometry.tokens_per_step
        self._bl_shift = BL.bit_length() - 1 if BL & (BL - 1) == 0 else None  # g >> shift is the step
        self._map: np.ndarray | None = None
        self._scratch = np.empty(0, np.int64)  # int64 work buffer of place(), grown on demand
        if spans is not None:
            self.add(spans)

    @classmethod
    def from_spans(cls, spans: SpanTable, geometry: BatchGeometry, max_modified_fraction: float) -> Occupancy:
        """Occupancy holding ``spans`` (validated) under the cap of ``max_modified_fraction``."""
        return cls(geometry, cap_tokens(geometry, max_modified_fraction), spans)

    def __len__(self) -> int:
        return sum(int(start.size) for start, _ in self._runs)

    @property
    def used(self) -> np.ndarray:
        """Injected tokens per step (a read-only view)."""
        view = self._used.view()
        view.flags.writeable = False
        return view

    def remaining(self, steps: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """Cap budget left per step (all steps, or the given ones)."""
        rem = self.cap_tokens - self._used
        return rem if steps is None else rem[np.asarray(steps, dtype=np.int64)]

    # -- adding known spans -------------------------------------------------

    def add(self, spans: SpanTable) -> None:
        """Add spans placed elsewhere (a static table, restored dynamic spans).

        Raises :class:`PlacementError` if any span leaves its row, lies outside the
        run, overlaps another (new or already held) or pushes a step over the cap;
        nothing is added then.
        """
        if len(spans) == 0:
            return
        B, L, T = self.geometry.global_batch_size, self.geometry.sequence_length, self.geometry.num_steps
        step = spans.step.astype(np.int64)
        row = spans.row.astype(np.int64)
        offset = spans.offset.astype(np.int64)
        length = spans.length.astype(np.int64)
        bad = (step < 0) | (step >= T) | (row < 0) | (row >= B) | (offset < 0) | (length < 1) | (offset + length > L)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise PlacementError(
                f"{int(bad.sum())} span(s) outside the run's geometry {B} rows x {L} tokens x {T} steps, "
                f"first: step={step[i]} row={row[i]} offset={offset[i]} length={length[i]}"
            )
        g = (step * B + row) * L + offset
        if not (g[1:] > g[:-1]).all():  # a SpanTable is sorted already: skip the sort then
            order = np.argsort(g, kind="stable")
            g, length, step = g[order], length[order], step[order]
        overlap_new = int(np.count_nonzero(g[1:] < g[:-1] + length[:-1]))
        overlap_old = int(self._hits(g, length).size)
        if overlap_new or overlap_old:
            raise PlacementError(
                f"spans overlap: {overlap_new} among the added spans, {overlap_old} with spans already placed"
            )
        used = self._used + np.bincount(step, weights=length, minlength=T).astype(np.int64)
        over = np.flatnonzero(used > self.cap_tokens)
        if over.size:
            raise PlacementError(
                f"{over.size} step(s) exceed the per-step cap of {self.cap_tokens} tokens, "
                f"first: step {int(over[0])} with {int(used[over[0]])} tokens"
            )
        self._used = used
        self._add_run(g, length.astype(np.int32))

    # -- whole rows (docs/placement.md) ---------------------------------------

    def free_rows(self, step: int) -> np.ndarray:
        """The global rows of ``step`` that hold no span at all (ascending)."""
        B, L = self.geometry.global_batch_size, self.geometry.sequence_length
        g = (int(step) * B + np.arange(B, dtype=np.int64)) * L
        free = np.ones(B, bool)
        free[self._hits(g, np.full(B, L, np.int64))] = False
        return np.flatnonzero(free)

    def add_rows(self, step: np.ndarray, row: np.ndarray, counted: np.ndarray) -> None:
        """Reserve whole rows (whole-row spans, boundary inserts): no other span may enter them.

        ``counted``: the tokens each row adds to its step's cap use: 0 for a whole row (exempt
        from the cap), the inserted length for a boundary span. Raises
        :class:`PlacementError` (nothing added) if a row is outside the run, reserved twice,
        already holds a span, or a step would exceed the cap.
        """
        B, L, T = self.geometry.global_batch_size, self.geometry.sequence_length, self.geometry.num_steps
        step = np.asarray(step, np.int64)
        row = np.asarray(row, np.int64)
        counted = np.asarray(counted, np.int64)
        if step.size == 0:
            return
        if ((step < 0) | (step >= T) | (row < 0) | (row >= B)).any():
            raise PlacementError(f"whole rows outside the run's geometry {B} rows x {T} steps")
        g = np.sort((step * B + row) * L)
        length = np.full(g.size, L, np.int64)
        twice = int(np.count_nonzero(g[1:] == g[:-1]))
        held = int(self._hits(g, length).size)
        if twice or held:
            raise PlacementError(f"whole rows overlap: {twice} reserved twice, {held} holding spans already placed")
        used = self._used + np.bincount(step, weights=counted, minlength=T).astype(np.int64)
        over = np.flatnonzero((used > self.cap_tokens) & (used > self._used))
        if over.size:
            raise PlacementError(
                f"{over.size} step(s) exceed the per-step cap of {self.cap_tokens} tokens, "
                f"first: step {int(over[0])} with {int(used[over[0]])} tokens"
            )
        self._used = used
        self._add_run(g, length.astype(np.int32))

    # -- placing new spans --------------------------------------------------

    def place(
        self,
        lengths: np.ndarray,
        rng: np.random.Generator,
        *,
        step_lo: int | None = None,
        step_hi: int | None = None,
        steps: np.ndarray | Sequence[int] | None = None,
        spread: bool = False,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
    ) -> PlaceOutcome:
        """Place spans of the given lengths and add them to this occupancy.

        Steps come from ``[step_lo, step_hi)`` or from the explicit ``steps``; rows
        are uniform over the batch, offsets uniform over ``[0, L - length]``. A draw
        only considers steps whose remaining cap budget can hold the span, so steps
        are uniform among the steps that can still take it. With ``spread=True`` the
        first round instead deals the spans round-robin over ``steps`` in random
        order (each step gets ``floor(n/m)`` or ``ceil(n/m)`` draws), and for the first
        half of the rounds a draw that collided retries in its dealt step (while that
        step has budget for it), so the deal stays even; later rounds draw freely.

        Each round: reject draws that hit placed spans (``searchsorted`` on flat
        starts); among the rest, in flat order, keep a draw only if it starts after
        every earlier draw has ended (one survivor per overlapping cluster, so every
        round makes progress); where a step's survivors exceed its remaining budget,
        keep a random prefix that fits. Survivors are committed, the rest re-drawn.

        Placed spans are committed here (not by the caller), so a request can never
        be placed twice against a stale occupancy.
        """
        B, L = self.geometry.global_batch_size, self.geometry.sequence_length
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 1:
            raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
        if lengths.size and (lengths.min() < 1 or lengths.max() > L):
            raise PlacementError(
                f"span lengths must be in [1, {L}] (the sequence length), got {lengths.min()}..{lengths.max()}"
            )
        if spread and steps is None:
            raise ValueError("spread=True needs explicit steps")
        allowed = self._allowed_steps(step_lo, step_hi, steps)
        pieces, cap_failed, collided, rounds = self._place(
            lengths.astype(np.int32), rng, allowed, spread=spread, max_rounds=max_rounds
        )
        g, _, index = _merge_pieces(pieces)
        row_index = g // L
        return PlaceOutcome(
            index=index.astype(np.int64),
            step=row_index // B,
            row=(row_index % B).astype(np.int32),
            offset=(g % L).astype(np.int32),
            unplaced_cap=cap_failed.astype(np.int64),
            unplaced_collision=collided.astype(np.int64),
            rounds=rounds,
        )

    def _place(
        self, lengths: np.ndarray, rng: np.random.Generator, allowed: np.ndarray, *, spread: bool, max_rounds: int
    ) -> tuple[list[tuple[np.ndarray, ...]], np.ndarray, np.ndarray, int]:
        """:meth:`place` on checked int32 ``lengths`` and sorted unique ``allowed`` steps.

        Returns the placed requests as at most two pieces ``(flat start, length,
        index)``, each in flat order (round 1's survivors, then the later rounds'
        merged: :func:`_merge_pieces` interleaves them, a caller that does not need
        flat order skips that copy), then the sorted indices of the requests
        unplaced for the cap and for collisions, and the number of rounds. Every draw is made exactly as described
        in :meth:`place`; only the bookkeeping is arranged for speed.
        """
        B, L, BL = self.geometry.global_batch_size, self.geometry.sequence_length, self.geometry.tokens_per_step
        within_int32 = np.iinfo(np.int32).max >= BL  # row * L + offset fits in int32
        n = lengths.size
        if n >= _MAP_MIN_SPANS and self._map is None:
            self._build_map()
        # Allocated once per call and sliced each round: fresh pages cost as much as
        # the arithmetic at this size.
        ar = np.arange(n, dtype=np.intp)
        if self._scratch.size < n + 1:  # kept between calls: the static plan's experiments share it
            self._scratch = np.empty(n + 1, np.int64)
        scratch = self._scratch
        pending = ar  # request indices still to place, in the order of this round's draws
        lp = lengths
        cap_failed: list[np.ndarray] = []
        first_run: tuple[np.ndarray, ...] | None = None  # round 1's survivors (flat start, length, index)
        later: tuple[np.ndarray, ...] | None = None  # later rounds' survivors, merged
        home = np.full(n, -1, np.int64) if spread else None  # dealt step of each request
        packable = self.geometry.total_tokens <= (1 << (63 - max(1, (n - 1).bit_length())))
        rounds = 0
        while pending.size and rounds < max_rounds:
            rounds += 1
            if home is not None and rounds == 1:
                st = allowed[rng.permutation(pending.size) % allowed.size]
                home[pending] = st
                g = st * BL
            else:
                # Steps sorted by remaining budget: those that can take length l are a
                # suffix, so one searchsorted gives each draw its own feasible range.
                rem = self.cap_tokens - self._used[allowed]
                if rem[0] == rem.min() == rem.max():
                    rem_sorted, steps_by_rem = rem, allowed
                else:
                    rem_sorted, by_rem = _sort_with_order(rem)
                    steps_by_rem = allowed[by_rem]
                # Only draws longer than the smallest budget need the search (usually none).
                tight = np.flatnonzero(lp > rem_sorted[0])
                first = None
                if tight.size:
                    first = np.zeros(pending.size, np.intp)
                    first[tight] = np.searchsorted(rem_sorted, lp[tight], side="left")
                    nofit = first == allowed.size
                    if nofit.any():  # budgets only shrink: these can never be placed here
                        cap_failed.append(pending[nofit])
                        pending, lp, first = pending[~nofit], lp[~nofit], first[~nofit]
                        if not pending.size:
                            break
                if home is not None and rounds <= max_rounds // 2:
                    # Keep the even deal: a draw that collided retries in its dealt
                    # step while that step has budget for it; only the others move.
                    st = home[pending]
                    move = np.flatnonzero(self.cap_tokens - self._used[st] < lp)
                    low = 0 if first is None else first[move]
                    st[move] = steps_by_rem[low + rng.integers(0, allowed.size - low, size=move.size)]
                    home[pending] = st
                    g = st * BL
                else:
                    if first is not None:
                        pick = first + rng.integers(0, allowed.size - first)
                    else:
                        # The same draws as with an array of equal bounds (numpy's bounded
                        # integers make one generator call per value either way).
                        pick = rng.integers(0, allowed.size, size=pending.size)
                    if home is not None:
                        home[pending] = steps_by_rem[pick]
                    # The flat start of the step, written over the picks (all in range).
                    g = np.take(steps_by_rem * BL, pick, out=pick, mode="clip")
                    del pick
            # int32 draws are the same values as int64 ones (one 32-bit draw each).
            m = pending.size
            row = rng.integers(0, B, size=m, dtype=np.int32)
            # Offsets uniform over [0, L - length]: floor(u * (L + 1 - length)) with u
            # uniform in [0, 1) (53 bits: each offset's probability is exact to 2**-53).
            # numpy's integers with an array of bounds runs a rejection loop per value,
            # about 5x slower at 10M spans.
            high = np.multiply(
                rng.random(m, out=scratch.view(np.float64)[:m]), L + 1 - lp, out=scratch.view(np.float64)[:m]
            )
            off = high.astype(np.int32)
            if within_int32:
                row *= L
                row += off
                g += row
            else:
                g += row.astype(np.int64) * L
                g += off
            del row, off, high
            # Work in flat order from here: searchsorted with sorted needles is ~50x
            # faster than with random ones, and neighbours in the draw become adjacent.
            # Ties keep draw order, so the result is the same on every machine.
            if pending is ar:  # round 1: the order is the request index, written over ar
                g, pending = _sort_with_order(g, packable=packable, arange=ar, order_into_arange=True)
                ar = np.empty(0, np.intp)
                lp = lp[pending]
            else:
                g, order = _sort_with_order(g, packable=packable)
                pending, lp = pending[order], lp[order]
                del order
            in_call = [r[:2] for r in (first_run, later) if r is not None]
            ok, steps, wanted = self._select(g, lp, rng, in_call, scratch)
            if ok is None:
                survivors = (g, lp, pending)
                pending = pending[:0]
            elif ok.any():
                survivors = (g[ok], lp[ok], pending[ok])
                np.logical_not(ok, out=ok)
                pending, lp = pending[ok], lp[ok]
            else:
                continue
            del g, ok
            self._used[steps] += wanted
            self._mark(survivors[0], survivors[1], scratch)
            if first_run is None:
                first_run = survivors
            else:
                later = survivors if later is None else _merge_runs(later, survivors)
        pieces = [r for r in (first_run, later) if r is not None]
        for g, length, _ in pieces:
            self._add_run(g, length, marked=True)
        cap_unplaced = np.sort(np.concatenate([np.empty(0, np.intp), *cap_failed]))
        return pieces, cap_unplaced, np.sort(pending), rounds

    # -- internals ----------------------------------------------------------

    def _allowed_steps(self, step_lo: int | None, step_hi: int | None, steps) -> np.ndarray:
        T = self.geometry.num_steps
        if steps is not None:
            if step_lo is not None or step_hi is not None:
                raise ValueError("give either steps or step_lo/step_hi, not both")
            allowed = np.unique(np.asarray(steps, dtype=np.int64))
            if allowed.size == 0:
                raise PlacementError("no steps to place spans in")
            if allowed[0] < 0 or allowed[-1] >= T:
                raise PlacementError(f"steps must lie in [0, {T}), got {allowed[0]}..{allowed[-1]}")
            return allowed
        lo = 0 if step_lo is None else int(step_lo)
        hi = T if step_hi is None else int(step_hi)
        if not (0 <= lo < hi <= T):
            raise PlacementError(f"step range [{lo}, {hi}) is empty or outside the run's steps [0, {T})")
        return np.arange(lo, hi, dtype=np.int64)

    def _select(
        self,
        g: np.ndarray,
        length: np.ndarray,
        rng: np.random.Generator,
        in_call: Sequence[tuple[np.ndarray, ...]],
        scratch: np.ndarray,
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """The draws of one round (sorted by ``g``) to commit together.

        Returns a mask of them (``None`` meaning all), and the steps they fall in with
        the tokens they add to each. ``in_call`` are the spans this ``place`` call already placed
        (marked in the map, not yet a run); ``scratch`` is an int64 buffer of at least
        ``g.size + 1`` values.
        """
        n = g.size
        hit = self._hits(g, length, in_call, scratch)
        # One survivor per cluster of mutually overlapping candidates (draws that hit
        # nothing held): a candidate is kept when it starts after every earlier
        # candidate ended. A hit's end is set below every start so it never counts.
        ends = np.add(g, length, out=scratch[:n])
        ends[hit] = np.iinfo(np.int64).min
        np.maximum.accumulate(ends, out=ends)
        ok: np.ndarray | None = np.empty(n, bool)
        assert ok is not None
        ok[:1] = True
        np.greater_equal(g[1:], ends[:-1], out=ok[1:])
        del ends
        ok[hit] = False
        if ok.all():
            ok = None
        steps, wanted = self._tokens_per_step(g, length, ok, scratch)
        over = wanted > self.cap_tokens - self._used[steps]
        if not over.any():
            return ok, steps, wanted
        # Per-step cap: only steps whose survivors overshoot need the (random) prefix
        # rule; a random order avoids favouring low rows in crowded steps.
        BL = self.geometry.tokens_per_step
        keep = np.arange(n, dtype=np.intp) if ok is None else np.flatnonzero(ok)
        over_step = np.zeros(self.geometry.num_steps, bool)
        over_step[steps] = over
        in_over = over_step[g[keep] // BL]
        contested = keep[in_over]
        contested = contested[np.lexsort((rng.random(contested.size), g[contested] // BL))]
        cs, ls = g[contested] // BL, length[contested].astype(np.int64)
        cum = np.cumsum(ls)
        group_first = np.r_[True, cs[1:] != cs[:-1]]
        before = (cum - ls)[group_first][np.cumsum(group_first) - 1]
        fits = cum - before <= self.cap_tokens - self._used[cs]
        ok = np.zeros(n, bool)
        ok[keep[~in_over]] = True
        ok[contested[fits]] = True
        return (ok, *self._tokens_per_step(g, length, ok, scratch))

    def _tokens_per_step(
        self, g: np.ndarray, length: np.ndarray, ok: np.ndarray | None, scratch: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, tokens)``: the distinct steps of the spans sorted by flat start
        ``g``, and the tokens of the spans where ``ok`` is true (``None``: all) in each.

        Linear in the spans, never in the run's steps: later rounds are small.
        """
        m = g.size
        step = scratch[:m]
        if self._bl_shift is not None:
            np.right_shift(g, self._bl_shift, out=step)
        else:
            np.floor_divide(g, self.geometry.tokens_per_step, out=step)
        change = np.empty(m, bool)
        change[:1] = True
        np.not_equal(step[1:], step[:-1], out=change[1:])
        starts = np.flatnonzero(change)
        del change
        steps = step[starts]
        cum = scratch[: m + 1]  # the step values are no longer needed
        if ok is None:
            np.cumsum(length, out=cum[1:])
        else:
            np.multiply(length, ok, out=cum[1:])
            np.cumsum(cum[1:], out=cum[1:])
        cum[0] = 0
        bounds = np.append(starts, m)
        return steps, cum[bounds[1:]] - cum[bounds[:-1]]

    def _hits(
        self,
        g: np.ndarray,
        length: np.ndarray,
        in_call: Sequence[tuple[np.ndarray, ...]] = (),
        scratch: np.ndarray | None = None,
    ) -> np.ndarray:
        """Indices of the sorted intervals ``[g, g + length)`` that intersect a held or in-call span."""
        runs = [r for r in (*self._runs, *in_call) if r[0].size]
        if not runs or g.size == 0:
            return np.empty(0, np.intp)
        if self._map is None:
            cand = None
            gc, lc = g, length
        else:
            # Only draws whose first or last block holds a span start or end can
            # collide: a span they share a token with starts or ends in one of their
            # (at most two) blocks.
            blocks = np.right_shift(g, self._shift, out=None if scratch is None else scratch[: g.size])
            flagged = self._map[blocks]
            if not self._one_block:
                np.add(g, length, out=blocks)
                blocks -= 1
                blocks >>= self._shift
                flagged |= self._map[blocks]
            del blocks
            cand = np.flatnonzero(flagged)
            del flagged
            gc, lc = g[cand], length[cand]
        hit = _collides(runs[0][0], runs[0][1], gc, lc)
        for start, span_len in runs[1:]:
            hit |= _collides(start, span_len, gc, lc)
        return np.flatnonzero(hit) if cand is None else cand[hit]

    def _build_map(self) -> None:
        self._map = np.zeros(((self.geometry.total_tokens - 1) >> self._shift) + 1, np.uint8)
        for start, span_len in self._runs:
            self._mark(start, span_len)

    def _mark(self, g: np.ndarray, length: np.ndarray, scratch: np.ndarray | None = None) -> None:
        """Flag the blocks of the first and last token of each span in the map."""
        if self._map is None:
            return
        blocks = np.right_shift(g, self._shift, out=None if scratch is None else scratch[: g.size])
        self._map[blocks] = 1
        if not self._one_block:
            np.add(g, length, out=blocks)
            blocks -= 1
            blocks >>= self._shift
            self._map[blocks] = 1

    def _add_run(self, g: np.ndarray, length: np.ndarray, *, marked: bool = False) -> None:
        """Hold the sorted spans ``(g, length)``, disjoint from all held ones."""
        if g.size == 0:
            return
        if not marked:
            self._mark(g, length)
        self._runs.append((g, length))
        while len(self._runs) > _MAX_RUNS:
            # Merging the two smallest keeps the copying small and the count bounded.
            a, b = sorted(range(len(self._runs)), key=lambda i: self._runs[i][0].size)[:2]
            start, span_len = _merge_runs(self._runs[a], self._runs[b])
            self._runs = [r for i, r in enumerate(self._runs) if i not in (a, b)] + [(start, span_len)]


def _collides(start: np.ndarray, length: np.ndarray, g: np.ndarray, glen: np.ndarray) -> np.ndarray:
    """Which intervals ``[g, g + glen)`` intersect one of the disjoint sorted spans ``start``."""
    if start.size == 0:
        return np.zeros(g.shape, bool)
    # Held spans are disjoint and sorted, so the last one starting before our end is
    # the only candidate: it has the largest end among all spans that start before it.
    idx = np.searchsorted(start, g + glen, side="left") - 1
    safe = np.maximum(idx, 0)
    return (idx >= 0) & (start[safe] + length[safe] > g)


def _merge_runs(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Merge two column sets sorted by their first column (disjoint flat starts)."""
    if b[0].size == 0:
        return a
    if a[0].size == 0:
        return b
    pos = np.searchsorted(a[0], b[0])
    pos += np.arange(b[0].size)
    from_a = np.ones(a[0].size + b[0].size, bool)
    from_a[pos] = False
    out = []
    for col_a, col_b in zip(a, b, strict=True):
        col = np.empty(from_a.size, np.result_type(col_a, col_b))
        col[pos] = col_b
        col[from_a] = col_a
        out.append(col)
    return tuple(out)


def _merge_pieces(pieces: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """``(flat start, length, index)`` of :meth:`Occupancy._place`'s pieces, in flat order."""
    if not pieces:
        return np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.intp)
    return pieces[0] if len(pieces) == 1 else _merge_runs(pieces[0], pieces[1])


def _sort_with_order(
    keys: np.ndarray,
    *,
    packable: bool | None = None,
    arange: np.ndarray | None = None,
    order_into_arange: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted keys, order)``, identical to a stable argsort, about twice as fast.

    When key and position fit together in 63 bits, sort ``key << bits | position``:
    the packed keys are unique, so any sort algorithm gives the same (stable)
    result on every machine, and numpy's SIMD sort beats argsort plus a gather.
    ``keys`` (int64) is overwritten then. ``packable`` says, when the caller knows,
    whether the keys are non-negative and below ``2 ** (63 - bits)``; ``arange`` is
    an optional ``0, 1, ...`` of at least ``keys.size`` values to reuse, and with
    ``order_into_arange`` the order is written over it (saving an allocation).
    """
    n = keys.size
    bits = max(1, (n - 1).bit_length())
    if packable is None:
        packable = bool(n) and keys.min() >= 0 and int(keys.max()) < (1 << (63 - bits))
    if packable and keys.dtype == np.int64:
        keys <<= bits
        keys |= np.arange(n, dtype=np.int64) if arange is None else arange[:n]
        keys.sort()
        mask = (1 << bits) - 1
        if order_into_arange and arange is not None and arange.dtype == np.int64:
            order = np.bitwise_and(keys, mask, out=arange[:n])
        else:
            order = keys & mask
        keys >>= bits
        return keys, order
    order = np.argsort(keys, kind="stable")
    return keys[order], order


# ----------------------------------------------------------------- static plan


@dataclass
class PlanResult:
    """The static schedule.

    Attributes:
        spans: all placed spans, sorted by ``(step, row, offset)``.
        requested / placed / unplaced: span counts per experiment name
            (``requested == placed + unplaced``).
        cap_tokens: the per-step cap that was applied.
        messages: per experiment with unplaced spans, why they were not placed.
    """

    spans: SpanTable
    requested: dict[str, int]
    placed: dict[str, int]
    unplaced: dict[str, int]
    cap_tokens: int = 0
    messages: dict[str, str] = field(default_factory=dict)


def plan_static(
    experiments: Sequence[PreparedExperiment],
    geometry: BatchGeometry,
    *,
    seed: int,
    max_modified_fraction: float = 0.05,
    on_unplaceable: Literal["error", "warn"] = "error",
    max_rounds: int = DEFAULT_MAX_ROUNDS,
) -> PlanResult:
    """Place every sequence of every experiment; a pure function of its inputs.

    Experiments are handled in list order with generator ``experiment_rng(seed, name, 0)``:
    first :func:`resolve_repetitions`, then :meth:`Occupancy.place` on one shared
    occupancy. ``uniform`` and ``window`` placements draw steps in
    ``[start_step, end_step)``; ``steps`` placements deal the spans evenly over the
    listed steps. ``SpanTable.repetition`` numbers each sequence's spans 0..k-1 in
    (step, row, offset) order.

    Budgets that are impossible whatever the draws raise :class:`PlacementError`
    before sampling, *also* with ``on_unplaceable="warn"``: a sequence longer than
    the sequence length or than the per-step cap, a placement outside the run, or an
    experiment needing more tokens than the cap budget left in its steps. Such a run
    would silently lose a whole experiment's design, so it is a config error. The
    budget is checked on the repetition counts, before any span is materialised, so
    an absurd count fails fast instead of allocating.
    Spans that remain unplaced after ``max_rounds`` re-draw rounds (or find no step
    with budget for their length) raise with ``"error"``, and with ``"warn"`` emit
    :class:`UnplacedSpansWarning` and are counted in ``PlanResult.unplaced``.

    Example:
        >>> from multirun.types import Placement
        >>> exp = PreparedExperiment(
        ...     name="canary", kind="documents", item_ids=["a"], treated=np.array([True]),
        ...     token_pool=np.arange(8, dtype=np.int32), seq_offsets=np.array([0]),
        ...     seq_lengths=np.array([8], dtype=np.int32), seq_items=np.array([0], dtype=np.int32),
        ...     seq_repetitions=np.array([3.0]), placement=Placement("uniform", 0, 10), fingerprint="x")
        >>> geo = BatchGeometry(global_batch_size=4, sequence_length=32, num_steps=10)
        >>> plan = plan_static([exp], geo, seed=0, max_modified_fraction=0.25)
        >>> len(plan.spans), plan.spans.repetition.tolist(), plan.unplaced
        (3, [0, 1, 2], {'canary': 0})
    """
    if on_unplaceable not in ("error", "warn"):
        raise ValueError(f"on_unplaceable must be 'error' or 'warn', got {on_unplaceable!r}")
    if len(experiments) > _EXPERIMENT_INDEX_MAX + 1:
        raise PlacementError(f"at most {_EXPERIMENT_INDEX_MAX + 1} experiments per run, got {len(experiments)}")
    names = [e.name for e in experiments]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PlacementError(f"experiment names must be unique (they seed the random streams): {dupes}")
    cap = cap_tokens(geometry, max_modified_fraction)
    occupancy = Occupancy(geometry, cap)
    L = geometry.sequence_length
    result = PlanResult(spans=SpanTable.empty(), requested={}, placed={}, unplaced={}, cap_tokens=cap)
    parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    # (experiment, flat start, length, sequence, repetition), each sorted by flat start

    for k, exp in enumerate(experiments):
        rng = experiment_rng(seed, exp.name, 0)
        if exp.placement.by_row:
            # Whole rows, whole batches and boundary inserts reserve rows (docs/placement.md).
            rows = _place_rows(exp, occupancy, rng, geometry)
            result.requested[exp.name] = rows.requested
            result.placed[exp.name] = int(rows.g.size)
            result.unplaced[exp.name] = rows.requested - int(rows.g.size)
            if rows.message:
                result.messages[exp.name] = rows.message
                if on_unplaceable == "error":
                    raise PlacementError(rows.message)
                warnings.warn(rows.message, UnplacedSpansWarning, stacklevel=2)
            parts.append((k, rows.g, rows.length, rows.sequence, rows.repetition))
            continue
        lengths = np.asarray(exp.seq_lengths)
        if lengths.dtype.kind not in "iu":
            lengths = lengths.astype(np.int64)
        reps = np.asarray(exp.seq_repetitions, dtype=np.float64)
        if lengths.shape != reps.shape or lengths.ndim != 1:
            raise PlacementError(
                f"experiment {exp.name!r}: seq_lengths {lengths.shape} and seq_repetitions {reps.shape} "
                "must be 1-D of equal size"
            )
        if lengths.size > np.iinfo(SPAN_COLUMNS["sequence"]).max:
            raise PlacementError(
                f"experiment {exp.name!r}: {lengths.size} sequences, more than the sequence column holds"
            )
        if not np.isfinite(reps).all() or (reps < 0).any():
            raise PlacementError(f"experiment {exp.name!r}: seq_repetitions must be finite and non-negative")
        # Checked before drawing, so errors do not depend on the seed.
        used = reps > 0
        shortest = int(np.min(lengths, where=used, initial=np.iinfo(lengths.dtype).max))
        longest = int(np.max(lengths, where=used, initial=np.iinfo(lengths.dtype).min))
        if shortest < 1:
            raise PlacementError(f"experiment {exp.name!r}: sequence of length {shortest} (must be >= 1)")
        if used.any() and longest > min(L, cap):
            what = f"the sequence length {L}" if longest > L else f"the per-step cap of {cap} tokens"
            raise PlacementError(f"experiment {exp.name!r}: a sequence of {longest} tokens is longer than {what}")
        allowed, spread = _allowed_steps(exp, geometry)
        budget = int(np.maximum(occupancy.remaining(allowed), 0).sum())

        def over_budget(needed: str, spans: str) -> PlacementError:
            return PlacementError(
                f"experiment {exp.name!r}: needs {needed} tokens ({spans} spans) but its {allowed.size} step(s) "  # noqa: B023
                f"have only {budget} tokens of cap budget left (cap {cap} tokens per step = "  # noqa: B023
                f"{max_modified_fraction} x {geometry.global_batch_size} x {L})"
            )

        # Every span takes at least one token, so more spans than budget tokens can
        # never fit: refuse before resolving or expanding the counts (a direct caller
        # may pass any repetition count; only the budget bounds what is allocated).
        # The float sum is within a relative 1e-9 of the exact one at any size here,
        # so this margin only lets through totals that the exact check below judges.
        approx = float(reps.sum())
        if approx > (budget + 1) * (1 + 1e-6):
            raise over_budget(f"at least {approx:.0f}", f"about {approx:.0f}")
        counts = resolve_repetitions(reps, rng)
        needed = int(np.dot(counts, lengths.astype(np.int64, copy=False)))
        n_spans = int(counts.sum())
        if needed > budget:
            raise over_budget(str(needed), str(n_spans))
        lengths32 = lengths.astype(np.int32, copy=False)
        # Request i is the i-th span of the expansion; with one span per sequence
        # (the common case) it is sequence i, and nothing needs expanding.
        seq = (
            None
            if n_spans == counts.size and counts.min(initial=1) == 1
            else np.repeat(np.arange(lengths.size, dtype=np.int32), counts)
        )
        span_len = lengths32 if seq is None else lengths32[seq]
        pieces, cap_failed, collided, _ = occupancy._place(span_len, rng, allowed, spread=spread, max_rounds=max_rounds)
        del span_len
        num_placed = sum(int(p[0].size) for p in pieces)
        num_unplaced = int(cap_failed.size + collided.size)
        result.requested[exp.name] = n_spans
        result.placed[exp.name] = num_placed
        result.unplaced[exp.name] = num_unplaced
        if num_unplaced:
            msg = (
                f"experiment {exp.name!r}: {num_unplaced} of {n_spans} spans could not be placed: "
                f"{cap_failed.size} found no step with cap budget left for their length "
                f"(cap {cap} tokens per step), {collided.size} still collided with other spans "
                f"after {max_rounds} re-draw rounds"
            )
            result.messages[exp.name] = msg
            if on_unplaceable == "error":
                raise PlacementError(msg)
            warnings.warn(msg, UnplacedSpansWarning, stacklevel=2)
        if counts.size and counts.max() > 1:
            # Repetition numbers follow flat order: interleave the pieces first.
            pieces = [_merge_pieces(pieces)]
        for g, length, index in pieces:  # g, length: the occupancy's runs, shared
            s = index.astype(np.int32) if seq is None else seq[index]
            del index
            repetition = (
                _repetition_numbers(s)
                if counts.size and counts.max() > 1
                else np.zeros(s.size, SPAN_COLUMNS["repetition"])
            )
            parts.append((k, g, length, s, repetition))
        del pieces, seq

    del occupancy  # its map and merged runs are not needed to build the table
    result.spans = _to_table(parts, geometry)
    return result


@dataclass
class _RowSpans:
    """One row-placed experiment's spans, in flat order, and what could not be placed."""

    g: np.ndarray
    length: np.ndarray
    sequence: np.ndarray
    repetition: np.ndarray
    requested: int
    message: str = ""


def _place_rows(
    exp: PreparedExperiment, occupancy: Occupancy, rng: np.random.Generator, geometry: BatchGeometry
) -> _RowSpans:
    """Place an experiment whose every span reserves its row (``whole`` or ``at: boundary``).

    ``whole: batch``: the spans of :func:`multirun.kinds.rows.batch_assignment`, every row
    of each listed step; a row already holding a span is an error (list whole-batch
    experiments first). ``whole: row`` and ``at: boundary``: each span's step is drawn as
    for scattered spans (uniform over the window, or dealt evenly over listed steps), its
    row uniformly among the step's rows that hold no span; whole rows are exempt from the
    cap, a boundary span counts its length and gets a planned offset uniform over
    ``[0, L - length]`` (the injection moves it to a document boundary). A span whose step
    has no free row (or no cap budget left) is drawn again, up to ``DEFAULT_MAX_ROUNDS``
    rounds, then reported. One Python iteration per step used per round.
    """
    from multirun.kinds.rows import batch_assignment  # kinds precede plan; only row experiments need it

    B, L, cap = geometry.global_batch_size, geometry.sequence_length, occupancy.cap_tokens
    p, name = exp.placement, exp.name
    reps = np.asarray(exp.seq_repetitions, dtype=np.float64)
    lengths = np.asarray(exp.seq_lengths, dtype=np.int64)
    if not np.isfinite(reps).all() or (reps < 0).any():
        raise PlacementError(f"experiment {name!r}: seq_repetitions must be finite and non-negative")
    used = reps > 0
    if p.at == "boundary" and exp.embedding_noise is not None:
        raise PlacementError(f"experiment {name!r}: embedding noise cannot follow a boundary insert's shift")
    if p.whole is not None and (lengths[used] != L).any():
        raise PlacementError(
            f"experiment {name!r}: whole-row sequences must be exactly {L} tokens "
            "(multirun.kinds.rows.fit_experiment_to_rows fits them)"
        )
    if p.at == "boundary" and used.any() and int(lengths[used].max()) > min(L, cap):
        raise PlacementError(
            f"experiment {name!r}: a sequence of {int(lengths[used].max())} tokens is longer than the "
            f"{'sequence length' if lengths[used].max() > L else 'per-step cap'} ({min(L, cap)} tokens)"
        )
    empty = np.zeros(0, np.int64)
    if not used.any():
        return _RowSpans(empty, empty.astype(np.int32), empty.astype(np.int32), empty.astype(np.int32), 0)
    if p.whole == "batch":
        try:
            a = batch_assignment(reps, p.steps, B)
        except ValueError as e:
            raise PlacementError(f"experiment {name!r}: {e}") from None
        try:
            occupancy.add_rows(a.step, a.row, np.zeros(a.step.size, np.int64))
        except PlacementError as e:
            raise PlacementError(
                f"experiment {name!r}: its whole batches meet rows already used ({e}); "
                "list whole-batch experiments before the others"
            ) from None
        g = (a.step * B + a.row) * L
        order = np.argsort(g, kind="stable")
        return _RowSpans(g[order], np.full(g.size, L, np.int32), a.sequence[order], a.repetition[order], int(g.size))
    counts = resolve_repetitions(reps, rng)
    seq = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
    n = int(seq.size)
    allowed, spread = _allowed_steps(exp, geometry)
    span_len = lengths[seq]
    counted = np.zeros(n, np.int64) if p.whole is not None else span_len
    st = np.zeros(n, np.int64)
    pending = np.arange(n, dtype=np.int64)
    placed_idx: list[np.ndarray] = []
    placed_rows: list[np.ndarray] = []
    no_row = no_budget = 0
    for round_ in range(DEFAULT_MAX_ROUNDS):
        if not pending.size:
            break
        # Round 1 deals listed steps evenly (as scattered spans); later rounds re-draw the
        # spans that found no free row or budget uniformly among the allowed steps.
        if spread and round_ == 0:
            st[pending] = allowed[rng.permutation(pending.size) % allowed.size]
        else:
            st[pending] = allowed[rng.integers(0, allowed.size, pending.size)]
        order = pending[np.argsort(st[pending], kind="stable")]
        bounds = np.flatnonzero(np.diff(st[order])) + 1
        failed: list[np.ndarray] = []
        no_row = no_budget = 0
        for idx in np.split(order, bounds):
            step = int(st[idx[0]])
            free = rng.permutation(occupancy.free_rows(step))
            take = min(idx.size, free.size)
            no_row += idx.size - take
            failed.append(idx[take:])
            idx, rows = idx[:take], free[:take]
            if p.whole is None:  # boundary spans count their length against the step's cap
                fits = np.cumsum(counted[idx]) <= int(occupancy.remaining([step])[0])
                no_budget += int(idx.size - fits.sum())
                failed.append(idx[~fits])
                idx, rows = idx[fits], rows[fits]
            occupancy.add_rows(np.full(idx.size, step), rows, counted[idx])
            placed_idx.append(idx)
            placed_rows.append(rows)
        pending = np.sort(np.concatenate([empty, *failed]))
    idx = np.concatenate([empty, *placed_idx])
    rows = np.concatenate([empty, *placed_rows])
    if p.whole is None:
        offset = rng.integers(0, L - span_len[idx] + 1)  # the planned offset, before the boundary rule
    else:
        offset = np.zeros(idx.size, np.int64)
    g = (st[idx] * B + rows) * L + offset
    order = np.argsort(g, kind="stable")
    g, idx = g[order], idx[order]
    s = seq[idx]
    message = ""
    if pending.size:
        message = (
            f"experiment {name!r}: {pending.size} of {n} row spans could not be placed after {DEFAULT_MAX_ROUNDS} "
            f"rounds: in the last, {no_row} found no row free of other spans in their step, {no_budget} no cap "
            f"budget left (cap {cap} tokens per step)"
        )
    return _RowSpans(g, span_len[idx].astype(np.int32), s, _repetition_numbers(s), n, message)


def occupancy_of(
    spans: SpanTable,
    experiments: Sequence[PreparedExperiment],
    geometry: BatchGeometry,
    max_modified_fraction: float,
) -> Occupancy:
    """The occupancy of a planned table, row-placed experiments' spans holding their whole rows.

    What a controller's later spans must avoid (:class:`multirun.plan.dynamic.DynamicSchedule`):
    a whole row or a boundary insert's row takes no other span; whole rows do not count
    against the cap, boundary inserts count their length.
    """
    occupancy = Occupancy(geometry, cap_tokens(geometry, max_modified_fraction))
    by_row = np.array([e.placement.by_row for e in experiments] + [False], bool)
    if len(spans) and by_row.any():
        whole = np.array([e.placement.whole is not None for e in experiments] + [False], bool)
        mask = by_row[spans.experiment]
        rows = spans.take(mask)
        occupancy.add_rows(rows.step, rows.row, np.where(whole[rows.experiment], 0, rows.length))
        spans = spans.take(~mask)
    occupancy.add(spans)
    return occupancy


def _allowed_steps(exp: PreparedExperiment, geometry: BatchGeometry) -> tuple[np.ndarray, bool]:
    """The steps an experiment may use, and whether to deal spans evenly over them."""
    p, T = exp.placement, geometry.num_steps
    if p.mode == "steps":
        steps = np.unique(np.asarray(p.steps, dtype=np.int64))
        if steps.size == 0 or steps[0] < 0 or steps[-1] >= T:
            raise PlacementError(
                f"experiment {exp.name!r}: placement steps must be non-empty and lie in [0, {T}), "
                f"got {list(p.steps)[:10]}"
            )
        return steps, True
    if p.mode not in ("uniform", "window"):
        raise PlacementError(f"experiment {exp.name!r}: unknown placement mode {p.mode!r}")
    if not (0 <= p.start_step < p.end_step <= T):
        raise PlacementError(
            f"experiment {exp.name!r}: placement window [{p.start_step}, {p.end_step}) is empty "
            f"or outside the run's steps [0, {T})"
        )
    return np.arange(p.start_step, p.end_step, dtype=np.int64), False


def _repetition_numbers(seq: np.ndarray) -> np.ndarray:
    """0..k-1 per sequence, in the order of ``seq`` (spans already in flat order), as int32."""
    n = seq.size
    if n == 0:
        return np.zeros(0, SPAN_COLUMNS["repetition"])
    # Sort (sequence, position) packed in one int64 (sequence < 2**31, position < 2**31).
    ss, order = _sort_with_order(
        seq.astype(np.int64), packable=True, arange=np.arange(n, dtype=np.int64), order_into_arange=True
    )
    starts = np.flatnonzero(ss[1:] != ss[:-1]) + 1  # where each sequence's run begins, after the first
    del ss
    # Rank inside the run: a cumulative sum of ones that drops back to 0 at each run start.
    rank: np.ndarray = np.ones(n, SPAN_COLUMNS["repetition"])
    rank[0] = 0
    rank[starts] = 1 - np.diff(starts, prepend=0)
    np.cumsum(rank, out=rank)
    rep: np.ndarray = np.empty(n, SPAN_COLUMNS["repetition"])
    rep[order] = rank
    return rep


def _to_table(
    parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]], geometry: BatchGeometry
) -> SpanTable:
    """Merge the experiments' parts (each sorted by flat start) into one sorted table.

    One packed sort of ``flat start << bits | position`` gives the merged order; each
    column is then concatenated, gathered and released in turn, so the peak stays
    near the table's own size.
    """
    if not parts:
        return SpanTable.empty()
    BL, L = geometry.tokens_per_step, geometry.sequence_length
    experiment: np.ndarray = np.repeat(
        np.array([p[0] for p in parts], SPAN_COLUMNS["experiment"]), [p[1].size for p in parts]
    )
    g = np.concatenate([p[1] for p in parts])
    n = g.size
    columns = [list(col) for col in zip(*(p[2:] for p in parts), strict=True)]  # length, sequence, repetition
    parts.clear()
    # Flat starts are unique (spans never overlap), so any sort gives the same order.
    packable = geometry.total_tokens <= 1 << (63 - max(1, (n - 1).bit_length()))
    g, order = _sort_with_order(g, packable=packable, arange=np.arange(n, dtype=np.int64), order_into_arange=True)
    cols: dict[str, np.ndarray] = {"experiment": experiment[order]}
    del experiment
    for name, pieces in zip(("length", "sequence", "repetition"), columns, strict=True):
        joined = np.concatenate(pieces)
        pieces.clear()
        cols[name] = joined[order].astype(SPAN_COLUMNS[name], copy=False)
        del joined
    del order
    # Position inside the step, computed in int64 but stored straight into int32.
    within: np.ndarray = np.empty(n, np.int32 if np.iinfo(np.int32).max >= BL else np.int64)
    if BL & (BL - 1) == 0:
        np.bitwise_and(g, BL - 1, out=within, casting="unsafe")
        g >>= BL.bit_length() - 1  # g becomes the step column, in place
    else:
        np.remainder(g, BL, out=within, casting="unsafe")
        np.floor_divide(g, BL, out=g)
    cols["step"] = g
    if L & (L - 1) == 0:
        cols["row"] = (within >> (L.bit_length() - 1)).astype(SPAN_COLUMNS["row"], copy=False)
        within &= L - 1
    else:
        cols["row"] = (within // L).astype(SPAN_COLUMNS["row"], copy=False)
        within %= L
    cols["offset"] = within.astype(SPAN_COLUMNS["offset"], copy=False)
    return SpanTable(**{name: cols[name].astype(dtype, copy=False) for name, dtype in SPAN_COLUMNS.items()})
