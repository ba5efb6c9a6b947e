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
    "plan_static",
    "resolve_repetitions",
    "stable_id",
]

#: Re-draw rounds before a still-colliding span is reported as unplaceable. At the
#: paper's density (about 1% of tokens injected) nearly every span lands in round 1
#: and the rest within a handful; the bound only matters for crowded schedules.
DEFAULT_MAX_ROUNDS = 64

_EXPERIMENT_INDEX_MAX = int(np.iinfo(SPAN_COLUMNS["experiment"]).max)


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
    base = np.floor(reps)
    frac = reps - base  # exact in floating point for the values we can count
    counts = base.astype(np.int64)
    candidates = np.flatnonzero(frac > 0)
    whole = int(counts.sum())
    # fsum([whole, *fractions]) is the correctly rounded sum of all r (whole is exact
    # as a float), without converting every integer-valued entry to a Python float.
    extra = round(math.fsum([float(whole), *frac[candidates].tolist()])) - whole
    if extra == 0:
        return counts
    # extra <= candidates.size: every fraction is < 1, so their sum is < candidates.size.
    keys = np.log1p(-rng.random(candidates.size)) / frac[candidates]  # log(U), U in (0, 1]
    chosen = candidates[np.argsort(-keys, kind="stable")[:extra]]
    counts[chosen] += 1
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

    Spans are kept as sorted flat starts ``(step * B + row) * L + offset`` plus their
    lengths (12 bytes a span), and tokens used per step. The static planner builds
    one; a controller that later asks for more spans keeps one built from the static
    table (:meth:`from_spans`) and calls :meth:`place` for steps ``[t + 1, t + k)``.

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
        self._start = np.empty(0, np.int64)  # sorted flat starts; intervals never overlap
        self._length = np.empty(0, np.int32)
        self._used = np.zeros(geometry.num_steps, np.int64)  # injected tokens per step
        if spans is not None:
            self.add(spans)

    @classmethod
    def from_spans(cls, spans: SpanTable, geometry: BatchGeometry, max_modified_fraction: float) -> Occupancy:
        """Occupancy holding ``spans`` (validated) under the cap of ``max_modified_fraction``."""
        return cls(geometry, cap_tokens(geometry, max_modified_fraction), spans)

    def __len__(self) -> int:
        return int(self._start.size)

    @property
    def used(self) -> np.ndarray:
        """Injected tokens per step (a read-only view)."""
        view = self._used.view()
        view.flags.writeable = False
        return view

    def remaining(self, steps: np.ndarray | None = None) -> np.ndarray:
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
        order = np.argsort(g, kind="stable")
        g, length, step = g[order], length[order], step[order]
        overlap_new = int(np.count_nonzero(g[1:] < g[:-1] + length[:-1]))
        overlap_old = int(np.count_nonzero(_collides(self._start, self._length, g, length)))
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
        self._start, self._length = _merge_sorted(self._start, self._length, g, length)
        self._used = used

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
        B, L, T = self.geometry.global_batch_size, self.geometry.sequence_length, self.geometry.num_steps
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
        n = lengths.size
        pending = np.arange(n, dtype=np.int64)
        # Spans placed by this call are kept apart (small, cheap to grow each round)
        # and merged into the held spans once at the end.
        new_start, new_length = np.empty(0, np.int64), np.empty(0, np.int32)
        cap_failed: list[np.ndarray] = []
        done: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (request index, flat start, step) per round
        home = np.full(n, -1, np.int64) if spread else None  # dealt step of each request
        rounds = 0
        while pending.size and rounds < max_rounds:
            rounds += 1
            lp = lengths[pending]
            if home is not None and rounds == 1:
                st = allowed[rng.permutation(pending.size) % allowed.size]
                home[pending] = st
            else:
                # Steps sorted by remaining budget: those that can take length l are a
                # suffix, so one searchsorted gives each draw its own feasible range.
                rem = self.cap_tokens - self._used[allowed]
                by_rem = np.argsort(rem, kind="stable")
                rem_sorted, steps_by_rem = rem[by_rem], allowed[by_rem]
                first = np.searchsorted(rem_sorted, lp, side="left")
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
                else:
                    st = np.empty(pending.size, np.int64)
                    move = np.arange(pending.size)
                st[move] = steps_by_rem[first[move] + rng.integers(0, allowed.size - first[move])]
                if home is not None:
                    home[pending] = st
            row = rng.integers(0, B, size=pending.size, dtype=np.int64)
            off = rng.integers(0, L - lp + 1, dtype=np.int64)
            g = (st * B + row) * L + off
            # Work in flat order from here: searchsorted with sorted needles is ~50x
            # faster than with random ones, and neighbours in the draw become adjacent.
            # A stable sort keeps tie-breaking identical on every machine.
            g, order = _sort_with_order(g)
            pending, lp = pending[order], lp[order]
            st = g // (B * L)  # cheaper than a third random gather
            keep = self._select(g, lp, st, rng, new_start, new_length)
            if keep.size:
                new_start, new_length = _merge_sorted(new_start, new_length, g[keep], lp[keep])
                self._used += np.bincount(st[keep], weights=lp[keep], minlength=T).astype(np.int64)
                done.append((pending[keep], g[keep], st[keep]))
                mask = np.ones(pending.size, bool)
                mask[keep] = False
                pending = pending[mask]
        self._start, self._length = _merge_sorted(self._start, self._length, new_start, new_length)
        if done:
            index, g, step = (np.concatenate(col) for col in zip(*done))
            # Each round is sorted already, so this stable sort (timsort) only merges runs.
            order = np.argsort(g, kind="stable")
            index, g, step = index[order], g[order], step[order]
        else:
            index, g, step = (np.empty(0, np.int64) for _ in range(3))
        return PlaceOutcome(
            index=index,
            step=step,
            row=((g // L) % B).astype(np.int32),
            offset=(g % L).astype(np.int32),
            unplaced_cap=np.sort(np.concatenate([np.empty(0, np.int64), *cap_failed])),
            unplaced_collision=np.sort(pending),
            rounds=rounds,
        )

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
        step: np.ndarray,
        rng: np.random.Generator,
        new_start: np.ndarray,
        new_length: np.ndarray,
    ) -> np.ndarray:
        """Ascending indices of the draws of one round (sorted by ``g``) to commit together.

        ``new_start``/``new_length`` are the spans this ``place`` call already placed
        (not yet merged into the held ones).
        """
        hit = _collides(self._start, self._length, g, length) | _collides(new_start, new_length, g, length)
        cand = np.flatnonzero(~hit)
        if cand.size == 0:
            return cand
        gs = g[cand]
        ends = gs + length[cand]
        prev_end = np.empty_like(ends)
        prev_end[0] = np.iinfo(np.int64).min
        np.maximum.accumulate(ends[:-1], out=prev_end[1:])
        keep = cand[gs >= prev_end]
        # Per-step cap: only steps whose survivors overshoot need the (random) prefix
        # rule; a random order avoids favouring low rows in crowded steps.
        remaining = self.cap_tokens - self._used
        wanted = np.bincount(step[keep], weights=length[keep], minlength=remaining.size)
        over_step = wanted > remaining
        in_over = over_step[step[keep]]
        if not in_over.any():
            return keep
        contested = keep[in_over]
        contested = contested[np.lexsort((rng.random(contested.size), step[contested]))]
        cs, ls = step[contested], length[contested]
        cum = np.cumsum(ls)
        group_first = np.r_[True, cs[1:] != cs[:-1]]
        before = (cum - ls)[group_first][np.cumsum(group_first) - 1]
        fits = cum - before <= remaining[cs]
        return np.sort(np.concatenate([keep[~in_over], contested[fits]]))


def _collides(start: np.ndarray, length: np.ndarray, g: np.ndarray, glen: np.ndarray) -> np.ndarray:
    """Which intervals ``[g, g + glen)`` intersect one of the disjoint sorted spans ``start``."""
    if start.size == 0:
        return np.zeros(g.shape, bool)
    # Held spans are disjoint and sorted, so the last one starting before our end is
    # the only candidate: it has the largest end among all spans that start before it.
    idx = np.searchsorted(start, g + glen, side="left") - 1
    safe = np.maximum(idx, 0)
    return (idx >= 0) & (start[safe] + length[safe] > g)


def _merge_sorted(a: np.ndarray, a_len: np.ndarray, b: np.ndarray, b_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge two sorted, mutually disjoint span sets in linear time."""
    if b.size == 0:
        return a, a_len
    if a.size == 0:
        return b.astype(np.int64, copy=False), b_len.astype(np.int32, copy=False)
    pos = np.searchsorted(a, b) + np.arange(b.size)
    total = a.size + b.size
    start = np.empty(total, np.int64)
    length = np.empty(total, np.int32)
    from_a = np.ones(total, bool)
    from_a[pos] = False
    start[pos] = b
    length[pos] = b_len
    start[from_a] = a
    length[from_a] = a_len
    return start, length


def _sort_with_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted keys, order)``, identical to a stable argsort, about twice as fast.

    When key and position fit together in 63 bits, sort ``key << bits | position``:
    the packed keys are unique, so any sort algorithm gives the same (stable)
    result on every machine, and numpy's SIMD sort beats argsort plus a gather.
    """
    n = keys.size
    bits = max(1, (n - 1).bit_length())
    if n and keys.min() >= 0 and int(keys.max()) < (1 << (63 - bits)):
        packed = np.sort((keys << bits) | np.arange(n, dtype=np.int64))
        return packed >> bits, packed & ((1 << bits) - 1)
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
    would silently lose a whole experiment's design, so it is a config error.
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
    parts: list[tuple[np.ndarray, ...]] = []  # (flat start, length, experiment, sequence, repetition)

    for k, exp in enumerate(experiments):
        rng = experiment_rng(seed, exp.name, 0)
        lengths = np.asarray(exp.seq_lengths, dtype=np.int64)
        reps = np.asarray(exp.seq_repetitions, dtype=np.float64)
        if lengths.shape != reps.shape or lengths.ndim != 1:
            raise PlacementError(
                f"experiment {exp.name!r}: seq_lengths {lengths.shape} and seq_repetitions {reps.shape} "
                "must be 1-D of equal size"
            )
        if not np.isfinite(reps).all() or (reps < 0).any():
            raise PlacementError(f"experiment {exp.name!r}: seq_repetitions must be finite and non-negative")
        used_lengths = lengths[reps > 0]  # checked before drawing, so errors do not depend on the seed
        if used_lengths.size and used_lengths.min() < 1:
            raise PlacementError(f"experiment {exp.name!r}: sequence of length {used_lengths.min()} (must be >= 1)")
        if used_lengths.size and used_lengths.max() > min(L, cap):
            longest = int(used_lengths.max())
            what = f"the sequence length {L}" if longest > L else f"the per-step cap of {cap} tokens"
            raise PlacementError(f"experiment {exp.name!r}: a sequence of {longest} tokens is longer than {what}")
        counts = resolve_repetitions(reps, rng)
        seq = np.repeat(np.arange(lengths.size, dtype=np.int64), counts)
        span_len = lengths[seq]
        allowed, spread = _allowed_steps(exp, geometry)
        needed = int(span_len.sum())
        budget = int(np.maximum(occupancy.remaining(allowed), 0).sum())
        if needed > budget:
            raise PlacementError(
                f"experiment {exp.name!r}: needs {needed} tokens ({seq.size} spans) but its {allowed.size} step(s) "
                f"have only {budget} tokens of cap budget left (cap {cap} tokens per step = "
                f"{max_modified_fraction} x {geometry.global_batch_size} x {L})"
            )
        out = occupancy.place(span_len, rng, steps=allowed, spread=spread, max_rounds=max_rounds)

        result.requested[exp.name] = int(seq.size)
        result.placed[exp.name] = int(out.index.size)
        result.unplaced[exp.name] = out.num_unplaced
        if out.num_unplaced:
            msg = (
                f"experiment {exp.name!r}: {out.num_unplaced} of {seq.size} spans could not be placed: "
                f"{out.unplaced_cap.size} found no step with cap budget left for their length "
                f"(cap {cap} tokens per step), {out.unplaced_collision.size} still collided with other spans "
                f"after {max_rounds} re-draw rounds"
            )
            result.messages[exp.name] = msg
            if on_unplaceable == "error":
                raise PlacementError(msg)
            warnings.warn(msg, UnplacedSpansWarning, stacklevel=2)

        g = (out.step * geometry.global_batch_size + out.row) * L + out.offset  # sorted: place() returns flat order
        s = seq[out.index]
        parts.append(
            (
                g,
                span_len[out.index].astype(SPAN_COLUMNS["length"]),
                np.full(g.size, k, SPAN_COLUMNS["experiment"]),
                s.astype(SPAN_COLUMNS["sequence"]),
                _repetition_numbers(s, lengths.size).astype(SPAN_COLUMNS["repetition"]),
            )
        )

    del occupancy  # its arrays are as large as the table's; free them before building it
    result.spans = _to_table(parts, geometry)
    return result


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


def _repetition_numbers(seq: np.ndarray, num_sequences: int) -> np.ndarray:
    """0..k-1 per sequence, in the order of ``seq`` (spans already in flat order)."""
    rep = np.zeros(seq.size, np.int64)
    multi = np.flatnonzero(np.bincount(seq, minlength=num_sequences)[seq] > 1)
    if multi.size == 0:  # e.g. every sequence injected once: nothing to number
        return rep
    ss, order = _sort_with_order(seq[multi])  # stable: keeps flat order inside each sequence
    first = np.r_[True, ss[1:] != ss[:-1]]
    starts = np.flatnonzero(first)
    rep[multi[order]] = np.arange(ss.size) - starts[np.cumsum(first) - 1]
    return rep


def _to_table(parts: list[tuple[np.ndarray, ...]], geometry: BatchGeometry) -> SpanTable:
    """Merge the experiments' parts (each sorted by flat start) into one sorted table."""
    if not parts:
        return SpanTable.empty()
    B, L = geometry.global_batch_size, geometry.sequence_length
    g = np.concatenate([p[0] for p in parts])
    # Flat starts are unique (spans never overlap); the parts are sorted runs, which
    # the stable sort (timsort) merges in near-linear time.
    order = np.argsort(g, kind="stable")
    g = g[order]
    cols: dict[str, np.ndarray] = {}
    for i, name in enumerate(("length", "experiment", "sequence", "repetition"), start=1):
        cols[name] = np.concatenate([p[i] for p in parts])[order]
    del order
    cols["offset"] = (g % L).astype(SPAN_COLUMNS["offset"])
    row_index = g // L
    del g
    cols["row"] = (row_index % B).astype(SPAN_COLUMNS["row"])
    cols["step"] = row_index // B
    return SpanTable(**{name: cols[name].astype(dtype, copy=False) for name, dtype in SPAN_COLUMNS.items()})
