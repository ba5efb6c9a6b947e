"""Tests of dynamic span placement: controller decisions placed into the shared
occupancy never overlap static or other dynamic spans, honour the per-step cap and
their windows, count what they could not place, number repetitions on from the
static schedule, and replay exactly from the decision log (resume, invariant 4)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from multirun.control.controllers import ControllerDecision, build_controller
from multirun.errors import PlacementError
from multirun.plan.dynamic import (
    DynamicSchedule,
    decision_rng,
    place_decision,
    sequence_counts,
)
from multirun.plan.static import Occupancy, UnplacedSpansWarning, cap_tokens, plan_static
from multirun.types import SPAN_COLUMNS, BatchGeometry, Placement, PreparedExperiment, SpanTable

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_experiment(name: str, lengths, reps, items=None, treated=None, steps: int = 100) -> PreparedExperiment:
    """A real PreparedExperiment; by default one treated item per sequence."""
    lengths = np.asarray(lengths, dtype=np.int32)
    n = lengths.size
    items = np.arange(n) if items is None else np.asarray(items)
    n_items = int(items.max()) + 1 if n else 0
    treated = np.ones(n_items, bool) if treated is None else np.asarray(treated, bool)
    return PreparedExperiment(
        name=name,
        kind="documents",
        item_ids=[f"{name}-{i}" for i in range(treated.size)],
        treated=treated,
        token_pool=np.arange(int(lengths.sum()), dtype=np.int32),
        seq_offsets=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if n else np.empty(0, np.int64),
        seq_lengths=lengths,
        seq_items=items.astype(np.int32),
        seq_repetitions=np.asarray(reps, dtype=np.float64),
        placement=Placement("uniform", 0, steps),
        fingerprint=f"fp-{name}",
    )


def decision_for(
    exp: PreparedExperiment, step: int, window: tuple[int, int], seqs: list[int], controller: str = "test"
) -> ControllerDecision:
    """A decision injecting the given sequence indices (several may repeat)."""
    sequences: dict[str, list[int]] = {item: [] for item, t in zip(exp.item_ids, exp.treated) if t}
    for s in seqs:
        sequences[exp.item_ids[int(exp.seq_items[s])]].append(int(s))
    return ControllerDecision(
        step=step,
        experiment=exp.name,
        controller=controller,
        window=window,
        exposures={k: len(v) for k, v in sequences.items()},
        sequences=sequences,
    )


def flat(spans: SpanTable, geo: BatchGeometry) -> np.ndarray:
    return (spans.step.astype(np.int64) * geo.global_batch_size + spans.row) * geo.sequence_length + spans.offset


def assert_valid_union(tables: list[SpanTable], geo: BatchGeometry, cap: int) -> SpanTable:
    """Checked independently of Occupancy: inside rows, no overlap anywhere, cap per step."""
    union = SpanTable.concat(tables)
    assert ((union.step >= 0) & (union.step < geo.num_steps)).all()
    assert ((union.row >= 0) & (union.row < geo.global_batch_size)).all()
    assert (union.offset >= 0).all() and (union.offset.astype(np.int64) + union.length <= geo.sequence_length).all()
    g = flat(union, geo)
    assert (g[1:] >= g[:-1] + union.length[:-1]).all(), "two spans overlap"
    assert (np.bincount(union.step, weights=union.length, minlength=geo.num_steps) <= cap).all()
    return union


# ------------------------------------------------------------------ property


@st.composite
def scenarios(draw):
    B = draw(st.integers(1, 5))
    L = draw(st.integers(8, 32))
    T = draw(st.integers(3, 25))
    geo = BatchGeometry(global_batch_size=B, sequence_length=L, num_steps=T)
    fraction = draw(st.sampled_from([0.1, 0.25, 0.5, 1.0]))
    cap = cap_tokens(geo, fraction)
    assume(cap >= 4)
    longest = min(L, cap)
    statics = []
    for k in range(draw(st.integers(0, 2))):
        n = draw(st.integers(1, 5))
        lengths = draw(st.lists(st.integers(1, longest), min_size=n, max_size=n))
        reps = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=n, max_size=n))
        statics.append(make_experiment(f"static{k}", lengths, reps, steps=T))
    controlled = []
    for k in range(draw(st.integers(1, 2))):
        n = draw(st.integers(1, 6))
        lengths = draw(st.lists(st.integers(1, longest), min_size=n, max_size=n))
        reps = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))  # some static spans too
        items = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
        n_items = max(items) + 1
        treated = draw(st.lists(st.booleans(), min_size=n_items, max_size=n_items))
        treated[items[0]] = True
        controlled.append(make_experiment(f"dyn{k}", lengths, reps, items=items, treated=treated, steps=T))
    experiments = statics + controlled
    plan_decisions = []
    for _ in range(draw(st.integers(1, 8))):
        e = draw(st.integers(0, len(controlled) - 1))
        exp = controlled[e]
        own = [s for s in range(exp.seq_lengths.size) if exp.treated[exp.seq_items[s]]]
        seqs = draw(st.lists(st.sampled_from(own), min_size=0, max_size=12))
        lo = draw(st.integers(0, T))
        hi = min(T, lo + draw(st.integers(0, T)))
        plan_decisions.append((exp, lo, (lo, hi), seqs))
    seed = draw(st.integers(0, 2**16))
    return geo, fraction, experiments, plan_decisions, seed


@PROPERTY
@given(scenarios())
def test_dynamic_spans_never_overlap_respect_cap_and_windows(scenario) -> None:
    geo, fraction, experiments, plan_decisions, seed = scenario
    cap = cap_tokens(geo, fraction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnplacedSpansWarning)
        try:
            plan = plan_static(experiments, geo, seed=seed, max_modified_fraction=fraction, on_unplaceable="warn")
        except PlacementError:
            assume(False)
        schedule = DynamicSchedule(experiments, plan.spans, geo, max_modified_fraction=fraction, seed=seed)
        index = {e.name: k for k, e in enumerate(experiments)}
        tables = [plan.spans]
        for exp, step, window, seqs in plan_decisions:
            decision = decision_for(exp, step, window, seqs)
            spans, unplaced = schedule.apply(decision)
            tables.append(spans)
            # Nothing silently dropped: placed + unplaced == requested.
            assert len(spans) + unplaced == len(seqs)
            if len(spans):
                assert ((spans.step >= window[0]) & (spans.step < window[1])).all()
                assert (spans.experiment == index[exp.name]).all()
                assert (spans.length == exp.seq_lengths[spans.sequence]).all()
                # Each sequence placed at most as often as it was asked for.
                n_seq = exp.seq_lengths.size
                assert (np.bincount(spans.sequence, minlength=n_seq) <= np.bincount(seqs, minlength=n_seq)).all()
            if window[0] >= window[1]:
                assert len(spans) == 0
    union = assert_valid_union(tables, geo, cap)
    assert len(schedule.spans) == sum(len(t) for t in tables[1:])
    assert len(schedule.occupancy) == len(union)
    # Repetitions: per (experiment, sequence), static then dynamic spans number 0..k-1 without gaps.
    for e in np.unique(union.experiment):
        mine = union.experiment == e
        for s in np.unique(union.sequence[mine]):
            reps = np.sort(union.repetition[mine & (union.sequence == s)])
            assert reps.tolist() == list(range(reps.size))
    # Merging per step, as the callback does, keeps every step sorted and disjoint.
    for t in range(geo.num_steps):
        merged = SpanTable.concat([plan.spans.take(plan.spans.step_slice(t)), schedule.spans_at(t)])
        g = flat(merged, geo)
        assert (g[1:] >= g[:-1] + merged.length[:-1]).all()
        assert len(merged) == int(np.count_nonzero(union.step == t))


# ------------------------------------------------------------------ replay and determinism


def controlled_run(seed: int, *, interrupt_at: int | None = None):
    """Two controlled experiments (track + acquire) on top of a static one, decisions
    every 5 steps from simulated scores; optionally rebuilt from the log midway."""
    T, W = 60, 5
    geo = BatchGeometry(global_batch_size=4, sequence_length=32, num_steps=T)
    static = make_experiment("static", [10, 12, 7], [6.0, 4.0, 5.0], steps=T)
    facts = make_experiment(
        "facts", [9, 11, 8, 10, 12, 6], np.zeros(6), items=[0, 0, 1, 1, 2, 2], treated=[True, True, False], steps=T
    )
    canaries = make_experiment(
        "canaries", [5, 6, 7, 8], [1.0, 0.0, 0.0, 0.0], items=[0, 1, 2, 3], treated=[True, True, True, False], steps=T
    )
    experiments = [static, facts, canaries]
    plan = plan_static(experiments, geo, seed=seed, max_modified_fraction=0.2)
    metrics = ["target_probability"]

    def controllers():
        return [
            build_controller(
                "track",
                {"metric": "target_probability", "target": 0.5, "initial_n": 3},
                experiment=facts,
                metrics_available=metrics,
                window_steps=W,
                num_steps=T,
            ),
            build_controller(
                "acquire",
                {"metric": "target_probability", "threshold": 0.3, "max_rate": 4},
                experiment=canaries,
                metrics_available=metrics,
                window_steps=W,
                num_steps=T,
            ),
        ]

    ctls = controllers()
    schedule = DynamicSchedule(experiments, plan.spans, geo, max_modified_fraction=0.2, seed=seed)
    for step in range(0, T + 1, W):
        if interrupt_at is not None and step == interrupt_at:
            # "Kill and resume": checkpointed plain state -> fresh objects, spans replayed from the log.
            states = json.loads(json.dumps([c.state_dict() for c in ctls]))
            log = json.loads(json.dumps(schedule.log()))
            ctls = controllers()
            for c, s in zip(ctls, states):
                c.load_state_dict(s)
            schedule = DynamicSchedule.from_decisions(
                [ControllerDecision.from_dict(d) for d in log],
                experiments,
                plan.spans,
                geo,
                max_modified_fraction=0.2,
                seed=seed,
            )
        # Simulated learning: scores grow with the dynamic exposures seen so far.
        seen = schedule.spans.take(schedule.spans.step < step)
        recs = []
        for k, exp in ((1, facts), (2, canaries)):
            items = [
                [
                    item,
                    bool(t),
                    float(0.04 * np.count_nonzero((seen.experiment == k) & (exp.seq_items[seen.sequence] == i))),
                ]
                for i, (item, t) in enumerate(zip(exp.item_ids, exp.treated))
            ]
            recs.append(
                {
                    "step": step,
                    "experiment": exp.name,
                    "metric": "target_probability",
                    "group": None,
                    "treated_mean": None,
                    "items": items,
                }
            )
        for exp, ctl in ((facts, ctls[0]), (canaries, ctls[1])):
            schedule.apply(ctl.decide(step=step, records=recs, experiment=exp, num_steps=T))
    return schedule, plan, experiments, geo


def columns(spans: SpanTable) -> dict[str, list[int]]:
    return {name: getattr(spans, name).tolist() for name in SPAN_COLUMNS}


def test_replay_equals_live_and_resume_is_exact() -> None:
    live, plan, experiments, geo = controlled_run(seed=7)
    assert len(live.spans) > 20 and live.placed["facts"] > 0 and live.placed["canaries"] > 0
    decisions = [ControllerDecision.from_dict(d) for d in json.loads(json.dumps(live.log()))]
    replayed = DynamicSchedule.from_decisions(
        decisions, experiments, plan.spans, geo, max_modified_fraction=0.2, seed=7
    )
    spans, occupancy = replayed.spans, replayed.occupancy
    assert columns(spans) == columns(live.spans)
    assert len(occupancy) == len(plan.spans) + len(live.spans)
    assert np.array_equal(occupancy.used, live.occupancy.used)
    for cut in (10, 35):
        resumed, *_ = controlled_run(seed=7, interrupt_at=cut)
        assert columns(resumed.spans) == columns(live.spans)
        assert [d.to_dict() for d in resumed.decisions] == live.log()
    assert_valid_union([plan.spans, live.spans], geo, cap_tokens(geo, 0.2))


def test_placement_is_deterministic_and_seeded() -> None:
    a, *_ = controlled_run(seed=3)
    b, *_ = controlled_run(seed=3)
    c, *_ = controlled_run(seed=4)
    assert columns(a.spans) == columns(b.spans)
    assert columns(a.spans) != columns(c.spans)
    # The generator depends on seed, experiment and decision index.
    draw = lambda *k: decision_rng(*k).integers(0, 1 << 40, 4).tolist()  # noqa: E731
    assert draw(1, "facts", 0) == draw(1, "facts", 0)
    assert (
        len({str(draw(1, "facts", 0)), str(draw(1, "facts", 1)), str(draw(1, "other", 0)), str(draw(2, "facts", 0))})
        == 4
    )


def test_place_decision_continues_repetitions_and_uses_its_own_generator() -> None:
    geo = BatchGeometry(global_batch_size=4, sequence_length=16, num_steps=20)
    exp = make_experiment("facts", [5, 6], [2.0, 1.0], steps=20)
    plan = plan_static([exp], geo, seed=1, max_modified_fraction=0.5)
    counts = sequence_counts(plan.spans, 0, 2)
    assert counts.tolist() == [2, 1]
    occupancy = Occupancy.from_spans(plan.spans, geo, 0.5)
    d = decision_for(exp, 4, (4, 9), [0, 0, 1, 0])
    spans, unplaced = place_decision(d, exp, 0, occupancy, seed=1, decision_index=0, counts=counts)
    assert unplaced == 0 and counts.tolist() == [5, 2]
    assert sorted(spans.repetition[spans.sequence == 0].tolist()) == [2, 3, 4]
    assert spans.repetition[spans.sequence == 1].tolist() == [1]
    assert ((spans.step >= 4) & (spans.step < 9)).all()
    # Same decision, same index, fresh occupancy: same spans; without counts numbering starts at 0.
    again, _ = place_decision(d, exp, 0, Occupancy.from_spans(plan.spans, geo, 0.5), seed=1, decision_index=0)
    assert (again.step.tolist(), again.row.tolist(), again.offset.tolist()) == (
        spans.step.tolist(),
        spans.row.tolist(),
        spans.offset.tolist(),
    )
    assert sorted(again.repetition[again.sequence == 0].tolist()) == [0, 1, 2]


def test_unplaceable_spans_are_counted_and_warned() -> None:
    geo = BatchGeometry(global_batch_size=2, sequence_length=16, num_steps=10)
    exp = make_experiment("facts", [8, 8, 20], [0.0, 0.0, 0.0], steps=10)
    schedule = DynamicSchedule([exp], SpanTable.empty(), geo, max_modified_fraction=0.5, seed=0)  # cap 16 per step
    # Window of 2 steps holds at most 4 spans of 8 tokens; 6 are asked for.
    with pytest.warns(UnplacedSpansWarning, match="2 of 6 spans"):
        spans, unplaced = schedule.apply(decision_for(exp, 3, (3, 5), [0, 1, 0, 1, 0, 1]))
    assert (len(spans), unplaced) == (4, 2) and schedule.unplaced == {"facts": 2}
    # A sequence longer than a row, and an empty window: counted, not placed, nothing raised.
    with pytest.warns(UnplacedSpansWarning):
        spans, unplaced = schedule.apply(decision_for(exp, 6, (6, 8), [2, 0]))
    assert (len(spans), unplaced) == (1, 1)
    with pytest.warns(UnplacedSpansWarning):
        spans, unplaced = schedule.apply(decision_for(exp, 10, (10, 10), [0]))
    assert (len(spans), unplaced) == (0, 1) and schedule.unplaced == {"facts": 4}
    assert schedule.placed == {"facts": 5}


def test_bad_decisions_are_rejected() -> None:
    geo = BatchGeometry(global_batch_size=2, sequence_length=16, num_steps=10)
    exp = make_experiment("facts", [4, 5, 6], [0.0, 0.0, 0.0], items=[0, 0, 1], treated=[True, False])
    occupancy = Occupancy(geo, 16)
    good = decision_for(exp, 0, (0, 5), [0, 1])
    bad_count = ControllerDecision(0, "facts", "t", (0, 5), {"facts-0": 3}, {"facts-0": [0]})
    foreign = ControllerDecision(0, "facts", "t", (0, 5), {"facts-0": 1}, {"facts-0": [2]})
    control = ControllerDecision(0, "facts", "t", (0, 5), {"facts-1": 1}, {"facts-1": [2]})
    unknown = ControllerDecision(0, "facts", "t", (0, 5), {"zzz": 1}, {"zzz": [0]})
    for decision, message in (
        (bad_count, "3 exposures"),
        (foreign, "not its own"),
        (control, "control item"),
        (unknown, "unknown items"),
    ):
        with pytest.raises(ValueError, match=message):
            place_decision(decision, exp, 0, occupancy, seed=0, decision_index=0)
    with pytest.raises(ValueError, match="placed for experiment"):
        place_decision(good, make_experiment("other", [4], [0.0]), 0, occupancy, seed=0, decision_index=0)
    assert len(occupancy) == 0  # nothing was added by the rejected calls
    spans, unplaced = place_decision(good, exp, 0, occupancy, seed=0, decision_index=0)
    assert (len(spans), unplaced, len(occupancy)) == (2, 0, 2)
