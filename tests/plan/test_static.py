"""Tests of the span planner: invariant 5 (no overlap, no boundary crossing, cap,
nothing dropped silently), exact repetition counts, determinism (invariant 1) and
append-stability, on real numpy arrays and real PreparedExperiment objects."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from multirun.errors import PlacementError
from multirun.plan.static import (
    Occupancy,
    PlanResult,
    UnplacedSpansWarning,
    cap_tokens,
    experiment_rng,
    plan_static,
    resolve_repetitions,
)
from multirun.types import BatchGeometry, Placement, PreparedExperiment, SpanTable

# sha256 of the int64 columns of test_plan_is_a_fixed_function_of_seed_and_config's plan.
# Re-pinned once, on purpose, when offsets became floor(u * (L + 1 - length)) instead of
# numpy's array-bounded integers (issue 17, 1.8x on the whole planner): a checkpoint
# planned before is refused on resume by its schedule fingerprint. Any other change to
# this value is a bug: the planner's speed-ups must choose the same spans, bit for bit.
PINNED_PLAN_SHA256 = "0affa2063c6d0d41347d60b5bd04621966489988ca8e9b587e46cf32d7eec2a0"
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REPS = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 2.75, 3.0, 0.1, 1.3, 5.0, 8.0]


def make_experiment(name: str, lengths, reps, placement: Placement) -> PreparedExperiment:
    """A real PreparedExperiment with a tiny token pool (one item per sequence)."""
    lengths = np.asarray(lengths, dtype=np.int32)
    n = lengths.size
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if n else np.empty(0, np.int64)
    return PreparedExperiment(
        name=name,
        kind="documents",
        item_ids=[f"{name}-{i}" for i in range(n)],
        treated=np.ones(n, bool),
        token_pool=np.arange(int(lengths.sum()), dtype=np.int32),
        seq_offsets=offsets,
        seq_lengths=lengths,
        seq_items=np.arange(n, dtype=np.int32),
        seq_repetitions=np.asarray(reps, dtype=np.float64),
        placement=placement,
        fingerprint=f"fp-{name}",
    )


def allowed_steps(p: Placement) -> np.ndarray:
    return np.unique(np.asarray(p.steps, np.int64)) if p.mode == "steps" else np.arange(p.start_step, p.end_step)


def flat_start(spans: SpanTable, geo: BatchGeometry) -> np.ndarray:
    return (spans.step.astype(np.int64) * geo.global_batch_size + spans.row) * geo.sequence_length + spans.offset


def check_invariants(plan: PlanResult, exps: list[PreparedExperiment], geo: BatchGeometry, cap: int) -> None:
    """Every property the planner promises, checked independently of its internals."""
    sp = plan.spans
    B, L, T = geo.global_batch_size, geo.sequence_length, geo.num_steps
    for col in ("step", "row", "offset", "length", "experiment", "sequence", "repetition"):
        assert getattr(sp, col).shape == (len(sp),)
    # Inside the run, inside the row (no boundary crossing).
    assert ((sp.step >= 0) & (sp.step < T)).all()
    assert ((sp.row >= 0) & (sp.row < B)).all()
    assert (sp.offset >= 0).all() and (sp.length >= 1).all()
    assert (sp.offset.astype(np.int64) + sp.length <= L).all()
    # Sorted by (step, row, offset) and no overlap: flat intervals strictly ordered.
    g = flat_start(sp, geo)
    assert (g[1:] >= g[:-1] + sp.length[:-1]).all()
    # Per-step cap.
    per_step = np.bincount(sp.step, weights=sp.length, minlength=T)
    assert (per_step <= cap).all()
    for k, e in enumerate(exps):
        mine = sp.experiment == k
        seqs = sp.sequence[mine]
        assert np.isin(sp.step[mine], allowed_steps(e.placement)).all()
        assert (sp.length[mine] == e.seq_lengths[seqs]).all()
        # Counts: nothing vanishes, totals exact.
        expected_total = round(math.fsum(e.seq_repetitions.tolist()))
        assert plan.requested[e.name] == expected_total
        assert plan.placed[e.name] == int(mine.sum())
        assert plan.placed[e.name] + plan.unplaced[e.name] == plan.requested[e.name]
        assert (e.name in plan.messages) == (plan.unplaced[e.name] > 0)
        counts = np.bincount(seqs, minlength=e.seq_lengths.size)
        assert (counts <= np.ceil(e.seq_repetitions)).all()
        if plan.unplaced[e.name] == 0:
            assert (counts >= np.floor(e.seq_repetitions)).all()
        # Repetition numbers count 0..k-1 per sequence in (step, row, offset) order.
        reps = sp.repetition[mine]
        for s in np.unique(seqs):
            assert reps[seqs == s].tolist() == list(range(int(counts[s])))


@st.composite
def scenarios(draw):
    B = draw(st.integers(1, 6))
    L = draw(st.integers(4, 40))
    T = draw(st.integers(1, 20))
    geo = BatchGeometry(global_batch_size=B, sequence_length=L, num_steps=T)
    fraction = draw(st.sampled_from([0.2, 0.5, 1.0]))
    cap = cap_tokens(geo, fraction)
    exps = []
    for k in range(draw(st.integers(1, 3))):
        n = draw(st.integers(0, 10))
        lengths = draw(st.lists(st.integers(1, max(1, min(L, cap))), min_size=n, max_size=n))
        reps = draw(st.lists(st.sampled_from(REPS), min_size=n, max_size=n))
        mode = draw(st.sampled_from(["uniform", "window", "steps"]))
        if mode == "uniform":
            placement = Placement("uniform", 0, T)
        elif mode == "window":
            lo = draw(st.integers(0, T - 1))
            placement = Placement("window", lo, draw(st.integers(lo + 1, T)))
        else:
            steps = draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=5))
            placement = Placement("steps", 0, T, tuple(steps))
        exps.append(make_experiment(f"e{k}", lengths, reps, placement))
    seed = draw(st.integers(0, 2**32))
    return geo, fraction, exps, seed


def plan_warn(exps, geo, seed, fraction) -> PlanResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnplacedSpansWarning)
        return plan_static(exps, geo, seed=seed, max_modified_fraction=fraction, on_unplaceable="warn")


def assert_justified(err: PlacementError, exps, geo, seed, fraction) -> None:
    """A PlacementError before sampling must be a real impossibility: recompute it."""
    k = next(i for i, e in enumerate(exps) if f"experiment {e.name!r}" in str(err))
    e, cap = exps[k], cap_tokens(geo, fraction)
    if "is longer than" in str(err):  # judged on every sequence with reps > 0, before any draw
        assert e.seq_lengths[e.seq_repetitions > 0].max() > min(geo.sequence_length, cap), str(err)
        return
    counts = resolve_repetitions(e.seq_repetitions, experiment_rng(seed, e.name))  # the planner's first draw
    needed = int((counts * e.seq_lengths.astype(np.int64)).sum())
    before = plan_warn(exps[:k], geo, seed, fraction).spans  # append-stable: same spans as in the full plan
    used = np.bincount(before.step, weights=before.length, minlength=geo.num_steps)
    budget = np.maximum(cap - used[allowed_steps(e.placement)], 0).sum()
    assert needed > budget, str(err)


# ------------------------------------------------------------------ properties


@PROPERTY
@given(scenarios())
def test_plan_invariants(scenario):
    geo, fraction, exps, seed = scenario
    try:
        plan = plan_warn(exps, geo, seed, fraction)
    except PlacementError as err:
        event("impossible budget raised")
        assert_justified(err, exps, geo, seed, fraction)
        return
    event("some spans unplaced" if sum(plan.unplaced.values()) else "all spans placed")
    check_invariants(plan, exps, geo, cap_tokens(geo, fraction))
    assert plan.cap_tokens == cap_tokens(geo, fraction)


@PROPERTY
@given(scenarios())
def test_plan_is_deterministic_and_append_stable(scenario):
    geo, fraction, exps, seed = scenario
    try:
        full = plan_warn(exps, geo, seed, fraction)
    except PlacementError:
        return  # justified in test_plan_invariants
    again = plan_warn(exps, geo, seed, fraction)
    for col in ("step", "row", "offset", "length", "experiment", "sequence", "repetition"):
        assert np.array_equal(getattr(full.spans, col), getattr(again.spans, col)), col
    # Appending the last experiment never moves the spans of the earlier ones.
    prefix = plan_warn(exps[:-1], geo, seed, fraction)
    earlier = full.spans.take(full.spans.experiment < len(exps) - 1)
    for col in ("step", "row", "offset", "length", "experiment", "sequence", "repetition"):
        assert np.array_equal(getattr(prefix.spans, col), getattr(earlier, col)), col
    assert {n: prefix.unplaced[n] for n in prefix.unplaced} == {n: full.unplaced[n] for n in prefix.unplaced}


@PROPERTY
@given(st.lists(st.sampled_from(REPS + [7.5, 0.01, 0.99]), max_size=40), st.integers(0, 2**32))
def test_resolve_repetitions_exact(reps, seed):
    reps = np.asarray(reps, np.float64)
    counts = resolve_repetitions(reps, np.random.default_rng(seed))
    assert counts.dtype == np.int64
    assert (counts >= np.floor(reps)).all() and (counts <= np.ceil(reps)).all()
    assert counts.sum() == round(math.fsum(reps))  # correctly rounded sum, then half to even
    assert np.array_equal(counts, resolve_repetitions(reps, np.random.default_rng(seed)))


def test_resolve_repetitions_follows_fractional_parts():
    # One extra placement between 0.9 and 0.1: the 0.9 sequence should get it ~90% of the time.
    wins = sum(int(resolve_repetitions(np.array([1.9, 0.1]), np.random.default_rng(i))[0] == 2) for i in range(2000))
    assert 0.86 < wins / 2000 < 0.94
    # Many tiny parts: naive float sums drift (sum([0.1] * 10) < 1), the total must not.
    assert resolve_repetitions(np.full(10, 0.1), np.random.default_rng(0)).sum() == 1
    assert resolve_repetitions(np.full(25, 0.1), np.random.default_rng(0)).sum() == 2  # 2.5, half to even
    assert resolve_repetitions(np.array([1.5]), np.random.default_rng(0)).tolist() == [2]
    assert resolve_repetitions(np.array([0.5, 2.0]), np.random.default_rng(0)).tolist() == [0, 2]
    with pytest.raises(ValueError):
        resolve_repetitions(np.array([1.0, -0.5]), np.random.default_rng(0))
    with pytest.raises(ValueError):
        resolve_repetitions(np.array([np.nan]), np.random.default_rng(0))


# ------------------------------------------------------------- rng and cap


def test_experiment_rng_streams():
    draw = lambda *a: experiment_rng(*a).integers(0, 2**62, 4).tolist()  # noqa: E731
    assert draw(3, "canary") == draw(3, "canary", 0)
    assert draw(3, "canary") != draw(4, "canary")
    assert draw(3, "canary") != draw(3, "canary2")
    assert draw(3, "canary", 0) != draw(3, "canary", 1)
    with pytest.raises(ValueError):
        experiment_rng(-1, "canary")


def test_cap_tokens_is_exact():
    geo = BatchGeometry(global_batch_size=10, sequence_length=10, num_steps=1)
    assert cap_tokens(geo, 0.29) == 29  # 0.29 * 100 == 28.999999999999996 in floats
    assert cap_tokens(BatchGeometry(512, 4096, 1), 0.05) == 104857
    with pytest.raises(ValueError):
        cap_tokens(geo, 0.0)


# ------------------------------------------------------------ plan examples


def test_determinism_and_seed_sensitivity():
    geo = BatchGeometry(global_batch_size=16, sequence_length=128, num_steps=50)
    exps = [
        make_experiment("a", np.arange(5, 45), np.full(40, 2.5), Placement("uniform", 0, 50)),
        make_experiment("b", [30] * 10, [1.0] * 10, Placement("window", 10, 20)),
    ]
    p1 = plan_static(exps, geo, seed=1, max_modified_fraction=0.25)
    p2 = plan_static(exps, geo, seed=1, max_modified_fraction=0.25)
    p3 = plan_static(exps, geo, seed=2, max_modified_fraction=0.25)
    check_invariants(p1, exps, geo, cap_tokens(geo, 0.25))
    assert np.array_equal(p1.spans.step, p2.spans.step) and np.array_equal(p1.spans.offset, p2.spans.offset)
    assert not np.array_equal(p1.spans.step, p3.spans.step)
    assert p1.requested == {"a": 100, "b": 10} and p1.unplaced == {"a": 0, "b": 0}


def test_steps_placement_spreads_evenly():
    geo = BatchGeometry(global_batch_size=64, sequence_length=512, num_steps=30)
    steps = (3, 7, 11, 20)
    exp = make_experiment("fc", [10] * 103, [1.0] * 103, Placement("steps", 0, 30, steps))
    plan = plan_static([exp], geo, seed=5)
    per_step = np.bincount(plan.spans.step, minlength=30)
    assert per_step.sum() == 103
    assert sorted(per_step[list(steps)].tolist()) == [25, 26, 26, 26]
    assert per_step.sum() == per_step[list(steps)].sum()


def test_medium_scale_invariants():
    # Large enough to exercise several re-draw rounds and the cap rule in bulk.
    geo = BatchGeometry(global_batch_size=32, sequence_length=256, num_steps=400)
    rng = np.random.default_rng(0)
    exps = [
        make_experiment("docs", rng.integers(20, 200, 3000), np.ones(3000), Placement("uniform", 0, 400)),
        make_experiment(
            "groups", rng.integers(20, 200, 500), np.repeat([2.0, 4.5, 9.0, 0.5], 125), Placement("uniform", 0, 400)
        ),
        make_experiment("late", rng.integers(20, 200, 360), np.full(360, 1.25), Placement("window", 300, 400)),
    ]
    plan = plan_static(exps, geo, seed=11, max_modified_fraction=0.25)
    check_invariants(plan, exps, geo, cap_tokens(geo, 0.25))
    used = np.bincount(plan.spans.step, weights=plan.spans.length, minlength=400)
    assert used[300:].mean() > 0.8 * cap_tokens(geo, 0.25)  # the window really is crowded


# ----------------------------------------------------- impossible and unplaceable


@pytest.mark.parametrize("mode", ["error", "warn"])
def test_impossible_budgets_raise_before_sampling(mode):
    geo = BatchGeometry(global_batch_size=4, sequence_length=10, num_steps=5)  # cap 0.5 -> 20 tokens/step
    whole = Placement("uniform", 0, 5)
    cases = {
        "longer than the sequence length": make_experiment("x", [11], [1.0], whole),
        "longer than the per-step cap": make_experiment("x", [10, 10], [1.0, 0.0], Placement("uniform", 0, 5)),
        "cap budget left": make_experiment("x", [10], [11.0], whole),  # 110 tokens > 5 steps x 20
        "outside the run": make_experiment("x", [3], [1.0], Placement("window", 2, 9)),
    }
    for fragment, exp in cases.items():
        fraction = 0.2 if "per-step cap" in fragment else 0.5
        with pytest.raises(PlacementError, match=fragment) as info:
            plan_static([exp], geo, seed=0, max_modified_fraction=fraction, on_unplaceable=mode)
        assert "experiment 'x'" in str(info.value)
    # The budget check counts what earlier experiments used: 4 steps x 20 = 80 tokens in all.
    first = make_experiment("first", [10] * 6, [1.0] * 6, Placement("uniform", 0, 4))
    second = make_experiment("second", [10] * 3, [1.0] * 3, Placement("window", 0, 4))
    with pytest.raises(PlacementError, match=r"'second': needs 30 tokens .* only 20 tokens"):
        plan_static([first, second], BatchGeometry(4, 10, 4), seed=0, max_modified_fraction=0.5, on_unplaceable=mode)


def test_unplaceable_spans_warn_or_raise():
    # Cap 10 tokens/step over 2 steps: 3 spans of 6 tokens pass the total-budget
    # check (18 <= 20) but only one fits in each step.
    geo = BatchGeometry(global_batch_size=4, sequence_length=10, num_steps=2)
    exps = [make_experiment("tight", [6, 6, 6], [1.0, 1.0, 1.0], Placement("uniform", 0, 2))]
    with pytest.warns(UnplacedSpansWarning, match="'tight': 1 of 3 spans could not be placed"):
        plan = plan_static(exps, geo, seed=0, max_modified_fraction=0.25, on_unplaceable="warn")
    assert plan.unplaced == {"tight": 1} and plan.placed == {"tight": 2} and len(plan.spans) == 2
    assert "cap budget" in plan.messages["tight"]
    check_invariants(plan, exps, geo, 10)
    with pytest.raises(PlacementError, match="1 of 3 spans could not be placed: 1 found no step with cap budget"):
        plan_static(exps, geo, seed=0, max_modified_fraction=0.25, on_unplaceable="error")


def test_bad_experiment_lists():
    geo = BatchGeometry(2, 10, 2)
    e = make_experiment("same", [3], [1.0], Placement("uniform", 0, 2))
    with pytest.raises(PlacementError, match="unique"):
        plan_static([e, e], geo, seed=0)
    with pytest.raises(ValueError):
        plan_static([e], geo, seed=0, on_unplaceable="ignore")  # type: ignore[arg-type]
    bad = make_experiment("neg", [3], [-1.0], Placement("uniform", 0, 2))
    with pytest.raises(PlacementError, match=r"'neg'.*non-negative"):
        plan_static([bad], geo, seed=0)
    assert len(plan_static([], geo, seed=0).spans) == 0


# ------------------------------------------------------------------- occupancy


def test_occupancy_dynamic_requests_avoid_static_spans():
    geo = BatchGeometry(global_batch_size=8, sequence_length=64, num_steps=40)
    static = plan_static(
        [make_experiment("s", np.arange(8, 40), np.full(32, 3.0), Placement("uniform", 0, 40))],
        geo,
        seed=3,
        max_modified_fraction=0.25,
    ).spans
    occ = Occupancy.from_spans(static, geo, 0.25)
    assert len(occ) == len(static)
    before = occ.used.copy()
    lengths = np.random.default_rng(0).integers(4, 30, 60)
    out = occ.place(lengths, experiment_rng(3, "controller", 1), step_lo=11, step_hi=16)
    assert out.index.size + out.num_unplaced == 60
    assert ((out.step >= 11) & (out.step < 16)).all()
    dyn = SpanTable(
        step=out.step,
        row=out.row,
        offset=out.offset,
        length=lengths[out.index].astype(np.int32),
        experiment=np.ones(out.index.size, np.int16),
        sequence=out.index.astype(np.int32),
        repetition=np.zeros(out.index.size, np.int32),
    )
    union = SpanTable.concat([static, dyn])
    g = flat_start(union, geo)
    assert (g[1:] >= g[:-1] + union.length[:-1]).all()  # no overlap with static spans
    used = np.bincount(union.step, weights=union.length, minlength=40)
    assert (used <= occ.cap_tokens).all() and np.array_equal(used, occ.used)
    assert (occ.used - before)[11:16].sum() == lengths[out.index].sum()
    # Returned in flat order, and committed: adding them again is an overlap.
    assert (np.diff(flat_start(dyn, geo)) > 0).all()
    with pytest.raises(PlacementError, match="overlap"):
        occ.add(dyn)


def test_occupancy_reports_why_spans_are_unplaced():
    geo = BatchGeometry(global_batch_size=1, sequence_length=10, num_steps=1)
    held = SpanTable(
        step=np.array([0]),
        row=np.array([0], np.int32),
        offset=np.array([2], np.int32),
        length=np.array([5], np.int32),
        experiment=np.array([0], np.int16),
        sequence=np.array([0], np.int32),
        repetition=np.array([0], np.int32),
    )
    occ = Occupancy(geo, cap_tokens=10, spans=held)
    # 5 tokens of budget left, but the free gaps are [0, 2) and [7, 10): 5 never fits
    # (collision), 6 exceeds the budget (cap).
    out = occ.place(np.array([5, 6]), np.random.default_rng(0), max_rounds=8)
    assert out.unplaced_collision.tolist() == [0]
    assert out.unplaced_cap.tolist() == [1]
    assert out.index.size == 0 and out.rounds == 8 and out.num_unplaced == 2
    out = occ.place(np.array([2]), np.random.default_rng(0))
    assert out.index.tolist() == [0] and out.offset.tolist() in ([0], [7], [8])
    assert len(occ) == 2 and occ.used.tolist() == [7]


def test_occupancy_add_validates_atomically():
    geo = BatchGeometry(global_batch_size=2, sequence_length=10, num_steps=3)
    occ = Occupancy(geo, cap_tokens=8)

    def spans(step, row, offset, length):
        n = len(step)
        return SpanTable(
            step=np.array(step, np.int64),
            row=np.array(row, np.int32),
            offset=np.array(offset, np.int32),
            length=np.array(length, np.int32),
            experiment=np.zeros(n, np.int16),
            sequence=np.zeros(n, np.int32),
            repetition=np.zeros(n, np.int32),
        )

    occ.add(spans([0, 0], [0, 1], [0, 0], [4, 4]))
    for bad, fragment in [
        (spans([1], [0], [8], [3]), "outside"),  # crosses the row end
        (spans([3], [0], [0], [1]), "outside"),  # step beyond the run
        (spans([1, 1], [0, 0], [0, 3], [4, 4]), "overlap"),  # overlap among new spans
        (spans([0], [0], [3], [1]), "overlap"),  # overlap with held spans
        (spans([2, 2], [0, 1], [0, 0], [5, 4]), "cap"),  # 9 tokens > 8
    ]:
        with pytest.raises(PlacementError, match=fragment):
            occ.add(bad)
    assert len(occ) == 2 and occ.used.tolist() == [8, 0, 0]
    assert math.isclose(occ.remaining([0, 1]).sum(), 8)


# ------------------------------------------------ budget before expansion, internals


@pytest.mark.parametrize("reps", [1e12, 1e300])
def test_absurd_repetitions_refused_before_expanding(reps):
    # A direct caller (no experiment preparation) asks for 1e12 spans: the planner must
    # refuse from the counts alone, not allocate 1e12 spans and then compare.
    geo = BatchGeometry(global_batch_size=4, sequence_length=16, num_steps=10)  # budget 10 x 32 tokens
    exp = make_experiment("huge", [4], [reps], Placement("uniform", 0, 10))
    with pytest.raises(PlacementError, match=r"'huge': needs at least .* only 320 tokens of cap budget"):
        plan_static([exp], geo, seed=0, max_modified_fraction=0.5)
    # Just above the budget in spans (each span takes >= 1 token): also refused.
    exp = make_experiment("many", [1], [321.0], Placement("uniform", 0, 10))
    with pytest.raises(PlacementError, match=r"'many': needs .*321 .*only 320 tokens"):
        plan_static([exp], geo, seed=0, max_modified_fraction=0.5)


@pytest.mark.parametrize(
    "internals",
    [
        {"_MAP_MIN_SPANS": 0},  # block map from the first span
        {"_MAP_MIN_SPANS": 0, "_MAP_MAX_BYTES": 3},  # coarse blocks spanning many rows
        {"_MAP_MIN_SPANS": 0, "_MAX_RUNS": 1},  # every run merged at once
        {"_MAX_RUNS": 2},
    ],
)
def test_collision_index_settings_do_not_change_the_plan(monkeypatch, internals):
    """The block map and the run merging only speed up collision tests: same spans."""
    import multirun.plan.static as static

    for L in (64, 48):  # one block per span when L is a power of two, two otherwise
        geo = BatchGeometry(global_batch_size=8, sequence_length=L, num_steps=60)
        rng = np.random.default_rng(L)
        exps = [
            make_experiment("a", rng.integers(4, 20, 150), np.ones(150), Placement("uniform", 0, 60)),
            make_experiment("b", rng.integers(4, 20, 60), np.full(60, 2.5), Placement("window", 10, 30)),
            make_experiment("c", rng.integers(4, 20, 20), np.ones(20), Placement("steps", 0, 60, (3, 17, 29, 44))),
            make_experiment("d", rng.integers(1, 8, 200), np.ones(200), Placement("uniform", 0, 60)),
        ]
        reference = plan_warn(exps, geo, 9, 0.5)
        for name, value in internals.items():
            monkeypatch.setattr(static, name, value)
        plan = plan_warn(exps, geo, 9, 0.5)
        monkeypatch.undo()
        check_invariants(plan, exps, geo, cap_tokens(geo, 0.5))
        for col in ("step", "row", "offset", "length", "experiment", "sequence", "repetition"):
            assert np.array_equal(getattr(plan.spans, col), getattr(reference.spans, col)), (L, col)
        assert plan.unplaced == reference.unplaced
        # Dynamic requests on top of the static plan agree as well.
        outs = []
        chosen: dict[str, int]
        for chosen in ({}, internals):
            for name, value in chosen.items():
                monkeypatch.setattr(static, name, value)
            occ = Occupancy.from_spans(plan.spans, geo, 0.5)
            out = [occ.place(np.full(30, k + 3), np.random.default_rng(k), step_lo=5, step_hi=25) for k in range(3)]
            outs.append(([(o.index, o.step, o.row, o.offset) for o in out], occ.used.copy(), len(occ)))
            monkeypatch.undo()
        (a, used_a, n_a), (b, used_b, n_b) = outs
        assert n_a == n_b and np.array_equal(used_a, used_b)
        for xa, xb in zip(a, b, strict=True):
            assert all(np.array_equal(u, v) for u, v in zip(xa, xb, strict=True))


def test_plan_is_a_fixed_function_of_seed_and_config():
    """The spans of a config are pinned: a faster planner must not change which are chosen."""
    import hashlib

    geo = BatchGeometry(global_batch_size=16, sequence_length=128, num_steps=200)
    rng = np.random.default_rng(0)
    exps = [
        make_experiment("docs", rng.integers(8, 100, 800), np.ones(800), Placement("uniform", 0, 200)),
        make_experiment("groups", rng.integers(8, 100, 200), np.repeat([2.0, 4.5], 100), Placement("uniform", 0, 200)),
        make_experiment("late", rng.integers(8, 100, 300), np.full(300, 1.25), Placement("window", 150, 200)),
        make_experiment("fixed", rng.integers(8, 100, 20), np.ones(20), Placement("steps", 0, 200, (5, 50, 99, 120))),
    ]
    plan = plan_static(exps, geo, seed=3, max_modified_fraction=0.5)
    assert len(plan.spans) == 1845 and sum(plan.unplaced.values()) == 0
    h = hashlib.sha256()
    for col in ("step", "row", "offset", "length", "experiment", "sequence", "repetition"):
        h.update(getattr(plan.spans, col).astype(np.int64).tobytes())
    assert h.hexdigest() == PINNED_PLAN_SHA256
