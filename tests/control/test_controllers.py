"""Tests of the closed-loop controllers: the acquire rule (patience, stop, escalation
cap), the paper's track rule (halve/double/band/cap/clamp, true modular pool wrap),
the token budget, exact state round trips, option validation, and exposures to
acquisition from a real ledger. Real PreparedExperiment objects, real pyarrow."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from multirun.control.controllers import (
    CONTROLLERS,
    AcquireController,
    BudgetController,
    Controller,
    ControllerDecision,
    TrackController,
    acquisition_record,
    build_controller,
    exposures_to_acquisition,
    metric_range,
    treated_pool,
)
from multirun.errors import ConfigError, ResumeError
from multirun.ledger import Ledger, LedgerWriter
from multirun.measure.records import (
    EffectRecord,
    EvaluationRecord,
    FailureRecord,
    ItemScore,
    RunMetricRecord,
)
from multirun.measure.stats import EffectResult
from multirun.types import Placement, PreparedExperiment

METRICS = ["target_logprob", "target_probability", "exact_match"]


def make_experiment(
    name: str = "facts",
    paraphrases: tuple[int, ...] = (3, 2, 4),
    controls: int = 2,
    lengths: list[int] | None = None,
) -> PreparedExperiment:
    """Treated items f0.. with the given numbers of sequences (listed by item, as a
    payload does), then control items without sequences."""
    treated_ids = [f"f{i}" for i in range(len(paraphrases))]
    item_ids = treated_ids + [f"c{i}" for i in range(controls)]
    seq_items = np.repeat(np.arange(len(paraphrases)), paraphrases).astype(np.int32)
    n = seq_items.size
    seq_lengths = np.asarray(lengths if lengths is not None else [4 + (3 * s) % 7 for s in range(n)], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(seq_lengths)[:-1]]).astype(np.int64)
    return PreparedExperiment(
        name=name,
        kind="knowledge",
        item_ids=item_ids,
        treated=np.array([True] * len(treated_ids) + [False] * controls),
        token_pool=np.arange(int(seq_lengths.sum()), dtype=np.int32),
        seq_offsets=offsets,
        seq_lengths=seq_lengths,
        seq_items=seq_items,
        seq_repetitions=np.zeros(n),
        placement=Placement("uniform", 0, 100),
        fingerprint=f"fp-{name}",
    )


def records(
    step: int,
    scores: dict[str, float | None],
    *,
    experiment: str = "facts",
    metric: str = "target_probability",
    control: float = 0.01,
) -> list[EvaluationRecord]:
    """Records shaped as MonitorRunner.evaluate returns them, plus decoys the
    controller must ignore (other metric, other experiment, a group record, a failure)."""
    items = ItemScore.of(
        [*scores, "c0", "c1"], [True] * len(scores) + [False, False], [*scores.values(), control, control]
    )
    valid = [v for v in scores.values() if v is not None]

    def effect(metric: str, treated_mean: float) -> EffectResult:
        return EffectResult(
            metric=metric,
            test="permutation",
            alternative="greater",
            n_treated=len(valid),
            n_control=2,
            treated_mean=treated_mean,
            control_mean=control,
            effect=0.0,
            ci_low=math.nan,
            ci_high=math.nan,
            ci_level=0.95,
            p_value=0.5,
        )

    whole = EffectRecord(
        step=step,
        when="interval",
        experiment=experiment,
        monitor="knowledge",
        group=None,
        primary=False,
        effect=effect(metric, float(np.mean(valid)) if valid else math.nan),
        items=items,
    )
    all_ones = ItemScore.of(list(scores), [True] * len(scores), [1.0] * len(scores))
    decoys = [
        replace(whole, effect=effect("exact_match", whole.effect.treated_mean), items=all_ones),
        replace(whole, experiment="other", items=all_ones),
        replace(whole, group="x4", items=None, effect=effect(metric, 1.0)),
        RunMetricRecord(step=step, when="interval", metric="heldout_loss", value=3.0),
        FailureRecord(step=step, when="interval", experiment=experiment, monitor="knowledge", error="RuntimeError()"),
    ]
    return [decoys[0], whole, *decoys[1:]]


def build(
    name: str, options: dict, exp: PreparedExperiment | None = None, *, window: int = 10, steps: int = 100
) -> Any:
    exp = exp if exp is not None else make_experiment()
    return build_controller(
        name, options, experiment=exp, metrics_available=METRICS, window_steps=window, num_steps=steps
    )


# ------------------------------------------------------------------ acquire


def test_acquire_marks_items_after_patience_hits_then_stops_them() -> None:
    exp = make_experiment()
    ctl = build("acquire", {"metric": "target_probability", "threshold": 0.5, "patience": 2}, exp)
    assert isinstance(ctl, Controller) and isinstance(ctl, AcquireController)
    # f0: two hits in a row at 20, 30 -> acquired at 30. f1: hit, miss (reset), hit, hit -> acquired at 40.
    # f2: never reaches the threshold. After acquisition scores fall: still 0 exposures.
    seq = {
        0: {"f0": 0.1, "f1": 0.6, "f2": 0.1},
        10: {"f0": 0.2, "f1": 0.2, "f2": 0.1},
        20: {"f0": 0.6, "f1": 0.7, "f2": 0.2},
        30: {"f0": 0.9, "f1": 0.8, "f2": 0.3},
        40: {"f0": 0.0, "f1": 0.0, "f2": 0.4},
        50: {"f0": 0.0, "f1": 0.0, "f2": 0.45},
    }
    out = {s: ctl.decide(step=s, records=records(s, v), experiment=exp, num_steps=100) for s, v in seq.items()}
    assert out[20].exposures["f0"] > 0 and out[30].exposures["f0"] == 0
    assert out[20].exposures["f1"] > 0 and out[30].exposures["f1"] == 0  # 20, 30 are consecutive hits
    assert out[30].info["newly_acquired"] == ["f0", "f1"]
    assert ctl.acquired_at == {"f0": 30, "f1": 30, "f2": None}
    for s in (40, 50):
        assert out[s].exposures["f0"] == out[s].exposures["f1"] == 0 and out[s].sequences["f0"] == []
        assert out[s].exposures["f2"] >= 1
    assert out[50].info["acquired_at"] == {"f0": 30, "f1": 30} and out[50].info["remaining"] == 1
    assert not out[50].info["done"]
    # Control items are never in a decision.
    assert all(set(d.exposures) == {"f0", "f1", "f2"} for d in out.values())
    # Every decision's windows and sequences are well formed.
    for s, d in out.items():
        assert d.window == (s, s + 10)
        for item, seqs in d.sequences.items():
            assert len(seqs) == d.exposures[item]
            assert all(exp.item_ids[exp.seq_items[q]] == item for q in seqs)


def test_acquire_patience_counts_only_consecutive_hits() -> None:
    exp = make_experiment(paraphrases=(2,))
    ctl = build("acquire", {"metric": "target_probability", "threshold": 0.5, "patience": 3}, exp)
    hits = [0.6, 0.6, 0.1, 0.6, 0.6, None, 0.6, 0.6, 0.6]  # a miss and a missing score both reset
    acquired_when = None
    for k, v in enumerate(hits):
        step = 10 * k
        d = ctl.decide(step=step, records=records(step, {"f0": v}), experiment=exp, num_steps=100)
        if d.info["newly_acquired"]:
            acquired_when = step
    assert acquired_when == 80 and ctl.acquired_at == {"f0": 80}
    assert d.info["done"] is True and d.exposures == {"f0": 0}


def test_acquire_escalation_is_capped_and_only_without_progress() -> None:
    exp = make_experiment(paraphrases=(3, 2))
    ctl = build(
        "acquire",
        {"metric": "target_probability", "threshold": 0.9, "initial_rate": 1, "max_rate": 5, "escalation": 2},
        exp,
    )
    rates_f0, rates_f1, escalated = [], [], []
    for k in range(7):
        # f0 is stuck at 0.1; f1 improves every window (progress): its rate stays.
        d = ctl.decide(
            step=10 * k, records=records(10 * k, {"f0": 0.1, "f1": 0.1 + 0.05 * k}), experiment=exp, num_steps=100
        )
        rates_f0.append(d.exposures["f0"])
        rates_f1.append(d.exposures["f1"])
        escalated.append(d.info["escalated"])
    assert rates_f0 == [1, 2, 4, 5, 5, 5, 5]
    assert rates_f1 == [1] * 7
    assert escalated == [[], ["f0"], ["f0"], ["f0"], [], [], []]
    # Round-robin over the item's own sequences: f0 owns sequences 0, 1, 2.
    ctl2 = build("acquire", {"metric": "target_probability", "threshold": 0.9, "initial_rate": 2, "max_rate": 2}, exp)
    seen = []
    for k in range(3):
        seen += ctl2.decide(step=10 * k, records=[], experiment=exp, num_steps=100).sequences["f0"]
    assert seen == [0, 1, 2, 0, 1, 2]


def test_acquire_min_progress_and_non_integer_escalation() -> None:
    exp = make_experiment(paraphrases=(2,))
    ctl = build(
        "acquire",
        {"metric": "target_logprob", "threshold": -0.5, "escalation": 1.5, "max_rate": 8, "min_progress": 0.1},
        exp,
    )
    rates = []
    for k, v in enumerate([-3.0, -2.95, -2.0, -1.99, -1.98]):  # +0.05 is not progress, +0.95 is
        rates.append(
            ctl.decide(
                step=10 * k, records=records(10 * k, {"f0": v}, metric="target_logprob"), experiment=exp, num_steps=100
            ).exposures["f0"]
        )
    assert rates == [1, 2, 2, 3, 5]  # ceil(1 * 1.5) = 2, ceil(2 * 1.5) = 3, ceil(3 * 1.5) = 5


def test_acquisition_is_recorded_at_the_final_evaluation_with_an_empty_window() -> None:
    exp = make_experiment(paraphrases=(2,))
    ctl = build("acquire", {"metric": "target_probability", "threshold": 0.5}, exp, window=40, steps=100)
    d = ctl.decide(step=80, records=records(80, {"f0": 0.1}), experiment=exp, num_steps=100)
    assert d.window == (80, 100)  # clipped to the run
    d = ctl.decide(step=100, records=records(100, {"f0": 0.7}), experiment=exp, num_steps=100)
    assert d.window == (100, 100) and d.exposures == {"f0": 0}
    assert ctl.acquired_at == {"f0": 100}


def test_decisions_must_move_forward() -> None:
    exp = make_experiment()
    ctl = build("budget", {"max_tokens": 1000}, exp)
    ctl.decide(step=10, records=[], experiment=exp, num_steps=100)
    with pytest.raises(ValueError, match="last decision step"):
        ctl.decide(step=10, records=[], experiment=exp, num_steps=100)
    with pytest.raises(ValueError, match="asked to decide"):
        ctl.decide(step=20, records=[], experiment=make_experiment("other"), num_steps=100)


# ------------------------------------------------------------------ track


def paper_rule(n: int, v: float, p: float, *, max_change: int = 256, lo: int = 1, hi: int = 8192) -> int:
    """TOAA's controller step (docs/references.md §2.1), written out independently."""
    new = n
    if v > p * 1.05:
        new = n // 2
    if v < p * 0.95:
        new = n * 2
    new = min(new, n + max_change)
    new = max(new, n - max_change)
    return max(lo, min(new, hi))


def test_track_reproduces_the_paper_rule_on_hand_made_values() -> None:
    exp = make_experiment()
    ctl = build(
        "track",
        {"metric": "target_probability", "target": 1.0, "initial_n": 300, "max_n": 1000},
        exp,
        window=10,
        steps=200,
    )
    # step -> (value, expected n, action); target p = step / 200
    plan = [
        (0, 0.9, 300, "initial"),  # no update at s = 0, whatever v is
        (10, 0.2, 150, "halve"),  # p = 0.05; v > 1.05 p
        (20, 0.1, 150, "hold"),  # p = 0.1: in the band
        (30, 0.1549, 150, "hold"),  # p = 0.15: 0.1549 < 1.05 p
        (40, 0.15, 300, "double"),  # p = 0.2: below 0.95 p
        (50, 0.1, 556, "double"),  # 600 capped at 300 + 256
        (60, 0.1, 812, "double"),
        (70, 0.1, 1000, "double"),  # 1068 clamped to max_n
        (80, 0.9, 744, "halve"),  # 500 capped at 1000 - 256
        (90, 0.9, 488, "halve"),  # 372 capped at 744 - 256
        (100, None, 488, "no_value"),  # failed evaluation: n kept
    ]
    for step, v, expected, action in plan:
        recs = (
            records(step, {"f0": v, "f1": v, "f2": v})
            if v is not None
            else [
                FailureRecord(
                    step=step, when="interval", experiment="facts", monitor="knowledge", error="RuntimeError('boom')"
                )
            ]
        )
        d = ctl.decide(step=step, records=recs, experiment=exp, num_steps=200)
        assert (d.info["n"], d.info["action"]) == (expected, action), step
        assert d.num_spans == expected and d.info["target"] == pytest.approx(step / 200)
    # Down to the clamp at min_n: 488 -> 244 -> ... -> 3 -> 1 -> 1 (0 clamped).
    ns = [
        ctl.decide(step=s, records=records(s, {"f0": 1.0, "f1": 1.0, "f2": 1.0}), experiment=exp, num_steps=200).info[
            "n"
        ]
        for s in range(110, 200, 10)
    ]
    assert ns == [244, 122, 61, 30, 15, 7, 3, 1, 1]


def test_track_matches_the_reference_rule_on_random_values() -> None:
    exp = make_experiment()
    rng = np.random.default_rng(5)
    ctl = build(
        "track",
        {"metric": "target_probability", "target": 0.08, "initial_n": 40, "max_change": 64, "max_n": 500},
        exp,
        window=5,
        steps=400,
    )
    n = 40
    for step in range(0, 400, 5):
        v = float(rng.uniform(0, 0.1))
        d = ctl.decide(step=step, records=records(step, {"f0": v, "f1": v, "f2": v}), experiment=exp, num_steps=400)
        if step > 0:
            n = paper_rule(n, v, 0.08 * step / 400, max_change=64, hi=500)
        assert d.info["n"] == n


def test_track_value_options_and_negative_metrics() -> None:
    exp = make_experiment()
    # treated_mean reads the record's field: 0.3 here, while the items average 0.2.
    ctl = build("track", {"metric": "target_probability", "target": 1.0, "value": "treated_mean"}, exp)
    recs = records(10, {"f0": 0.1, "f1": 0.2, "f2": 0.3})
    recs[1] = replace(recs[1], effect=replace(recs[1].effect, treated_mean=0.3))
    ctl.decide(step=0, records=[], experiment=exp, num_steps=100)
    assert ctl.decide(step=10, records=recs, experiment=exp, num_steps=100).info["value"] == 0.3
    # A log-probability ramp from -4 to -1: at step 50 the target is -2.5, band +-0.125.
    ctl = build("track", {"metric": "target_logprob", "target": -1.0, "start_value": -4.0, "initial_n": 8}, exp)
    ctl.decide(step=0, records=[], experiment=exp, num_steps=100)
    mk = lambda s, v: records(s, {"f0": v, "f1": v, "f2": v}, metric="target_logprob")  # noqa: E731
    assert ctl.decide(step=50, records=mk(50, -2.0), experiment=exp, num_steps=100).info["action"] == "halve"
    assert (
        ctl.decide(step=60, records=mk(60, -2.25), experiment=exp, num_steps=100).info["action"] == "hold"
    )  # p = -2.2
    assert ctl.decide(step=70, records=mk(70, -3.0), experiment=exp, num_steps=100).info["action"] == "double"


def test_treated_pool_interleaves_items_and_skips_controls() -> None:
    exp = make_experiment(paraphrases=(3, 1, 2))  # f0: 0,1,2  f1: 3  f2: 4,5
    assert treated_pool(exp).tolist() == [0, 3, 4, 1, 5, 2]
    exp.treated = np.array([True, False, True, False, False])  # f1 becomes a control
    assert treated_pool(exp).tolist() == [0, 4, 1, 5, 2]


def test_track_pool_index_wraps_modularly() -> None:
    exp = make_experiment(paraphrases=(3, 2, 2))  # pool of 7
    ctl = build(
        "track",
        {"metric": "target_probability", "target": 1.0, "initial_n": 3, "max_change": 8, "max_n": 20},
        exp,
        window=1,
        steps=60,
    )
    pool = treated_pool(exp).tolist()
    i = 0
    stream: list[int] = []
    ns: list[int] = []
    for step in range(60):
        v = 0.0 if step % 3 else 1.0  # mostly doubling, sometimes halving: n crosses the pool size
        d = ctl.decide(step=step, records=records(step, {"f0": v, "f1": v, "f2": v}), experiment=exp, num_steps=60)
        n = d.info["n"]
        expected = [pool[(i + k) % len(pool)] for k in range(n)]  # independent loop
        assert d.info["pool_index"] == i
        i = (i + n) % len(pool)
        assert d.info["next_pool_index"] == i
        by_item: dict[str, list[int]] = {}
        for s in expected:
            by_item.setdefault(exp.item_ids[exp.seq_items[s]], []).append(s)
        assert {k: v for k, v in d.sequences.items() if v} == by_item
        assert sum(d.exposures.values()) == n
        stream += expected
        ns.append(n)
    # True wrap: the selections concatenate to the pool repeated without gaps or
    # truncation, also where one window takes more than the whole pool.
    assert max(ns) > 2 * len(pool)
    assert stream == [pool[k % len(pool)] for k in range(len(stream))]


# ------------------------------------------------------------------ budget


@pytest.mark.parametrize("rate,max_tokens", [(1, 50), (2, 73), (3, 200), (1, 4)])
def test_budget_never_exceeds_max_tokens(rate: int, max_tokens: int) -> None:
    exp = make_experiment(paraphrases=(3, 2, 4))
    ctl = build("budget", {"max_tokens": max_tokens, "rate": rate}, exp, window=5, steps=100)
    total = 0
    exhausted_at = None
    for step in range(0, 100, 5):
        d = ctl.decide(step=step, records=[], experiment=exp, num_steps=100)
        tokens = sum(int(exp.seq_lengths[s]) for seqs in d.sequences.values() for s in seqs)
        total += tokens
        assert total <= max_tokens
        assert d.info["tokens"] == total and d.info["window_tokens"] == tokens
        if exhausted_at is not None:
            assert d.num_spans == 0
        elif d.info["exhausted"]:
            exhausted_at = step
        else:
            assert all(v == rate for v in d.exposures.values())  # the base schedule passes through
    assert exhausted_at is not None
    # Independent model: the round-robin stream (window, then pass r, then item) is
    # injected up to the first span that would not fit, and not one span more.
    own = [np.flatnonzero(exp.seq_items == k) for k in range(3)]
    stream = [
        int(exp.seq_lengths[own[k][(w * rate + r) % own[k].size]])
        for w in range(20)
        for r in range(rate)
        for k in range(3)
    ]
    prefix = np.cumsum(stream)
    assert total == int(prefix[prefix <= max_tokens][-1])
    assert total + stream[int((prefix <= max_tokens).sum())] > max_tokens


# ------------------------------------------------------------------ state round trip

CASES = [
    ("acquire", {"metric": "target_probability", "threshold": 0.6, "patience": 2, "max_rate": 4}),
    ("track", {"metric": "target_probability", "target": 0.5, "initial_n": 2, "max_change": 3}),
    ("budget", {"max_tokens": 150, "rate": 2}),
]


@pytest.mark.parametrize("name,options", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_state_dict_round_trip_continues_identically(name: str, options: dict, k: int) -> None:
    exp = make_experiment()
    rng = np.random.default_rng(11)
    steps = list(range(0, 100, 10))
    scores = [
        {item: (None if rng.random() < 0.1 else float(rng.uniform(0, 1))) for item in ("f0", "f1", "f2")} for _ in steps
    ]
    uninterrupted = build(name, options, exp)
    straight = [
        uninterrupted.decide(step=s, records=records(s, v), experiment=exp, num_steps=100).to_dict()
        for s, v in zip(steps, scores)
    ]

    first = build(name, options, exp)
    for s, v in zip(steps[:k], scores[:k]):
        first.decide(step=s, records=records(s, v), experiment=exp, num_steps=100)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON, as a checkpoint keeps it
    resumed = build(name, options, exp)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == first.state_dict()
    after = [
        resumed.decide(step=s, records=records(s, v), experiment=exp, num_steps=100).to_dict()
        for s, v in zip(steps[k:], scores[k:])
    ]
    assert after == straight[k:]
    assert json.loads(json.dumps(straight)) == straight  # decisions are plain JSON too


def test_load_state_dict_rejects_foreign_state() -> None:
    exp = make_experiment()
    track = build("track", {"metric": "target_probability", "target": 0.5}, exp)
    acquire = build("acquire", {"metric": "target_probability", "threshold": 0.5}, exp)
    with pytest.raises(ResumeError, match="expected 'acquire'"):
        acquire.load_state_dict(track.state_dict())
    other = build("acquire", {"metric": "target_probability", "threshold": 0.5}, make_experiment(paraphrases=(1, 1)))
    state = other.state_dict()
    with pytest.raises(ResumeError, match="other treated items"):
        acquire.load_state_dict(state)
    bigger = build("track", {"metric": "target_probability", "target": 0.5}, make_experiment(paraphrases=(5, 5, 5)))
    with pytest.raises(ResumeError, match="pool"):
        track.load_state_dict(bigger.state_dict())


# ------------------------------------------------------------------ option validation

BAD = [
    ("nope", {}, 10, "controller.name"),
    ("acquire", {"metric": "target_probability", "threshold": 0.5, "speed": 2}, 10, "controller.speed"),
    ("acquire", {"metric": "loss", "threshold": 0.5}, 10, "controller.metric"),
    ("acquire", {"threshold": 0.5}, 10, "controller.metric"),
    ("acquire", {"metric": "target_probability"}, 10, "controller.threshold"),
    ("acquire", {"metric": "target_probability", "threshold": 1.5}, 10, "controller.threshold"),
    ("acquire", {"metric": "target_logprob", "threshold": 0.5}, 10, "controller.threshold"),
    ("acquire", {"metric": "target_probability", "threshold": 0.5, "patience": 0}, 10, "controller.patience"),
    ("acquire", {"metric": "target_probability", "threshold": 0.5, "initial_rate": 0}, 10, "controller.initial_rate"),
    ("acquire", {"metric": "target_probability", "threshold": 0.5, "max_rate": -1}, 10, "controller.max_rate"),
    ("acquire", {"metric": "target_probability", "threshold": 0.5, "initial_rate": 9}, 10, "controller.initial_rate"),
    ("acquire", {"metric": "target_probability", "threshold": 0.5, "escalation": 0.5}, 10, "controller.escalation"),
    ("acquire", {"metric": "target_probability", "threshold": 0.5, "patience": 1.5}, 10, "controller.patience"),
    ("acquire", {"metric": "target_probability", "threshold": True}, 10, "controller.threshold"),
    ("acquire", {"metric": "target_probability", "threshold": float("nan")}, 10, "controller.threshold"),
    ("acquire", {"metric": "target_probability", "threshold": 0.5}, 101, "controller.window"),
    ("acquire", {"metric": "target_probability", "threshold": 0.5}, 0, "controller.window"),
    ("track", {"metric": "target_probability", "target": 2.0}, 10, "controller.target"),
    ("track", {"metric": "target_probability", "target": 0.5, "band": 1.5}, 10, "controller.band"),
    ("track", {"metric": "target_probability", "target": 0.5, "max_change": 0}, 10, "controller.max_change"),
    ("track", {"metric": "target_probability", "target": 0.5, "min_n": 0}, 10, "controller.min_n"),
    ("track", {"metric": "target_probability", "target": 0.5, "min_n": 9, "max_n": 8}, 10, "controller.min_n"),
    ("track", {"metric": "target_probability", "target": 0.5, "initial_n": 9000}, 10, "controller.initial_n"),
    ("track", {"metric": "target_probability", "target": 0.5, "value": "median"}, 10, "controller.value"),
    ("track", {"metric": 3, "target": 0.5}, 10, "controller.metric"),
    ("budget", {"max_tokens": 0}, 10, "controller.max_tokens"),
    ("budget", {"max_tokens": 3}, 10, "controller.max_tokens"),  # below the shortest sequence (4)
    ("budget", {"max_tokens": 100, "rate": 0}, 10, "controller.rate"),
    ("budget", {}, 10, "controller.max_tokens"),
]


@pytest.mark.parametrize("name,options,window,key", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_options_raise_config_error_naming_the_key(name: str, options: dict, window: int, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(name, options, window=window, steps=100)
    assert info.value.key == key
    assert key in str(info.value)


def test_experiment_without_treated_sequences_or_metrics_fails_early() -> None:
    exp = make_experiment(paraphrases=(2,))
    exp.treated = np.zeros(len(exp.item_ids), bool)
    with pytest.raises(ConfigError, match="no treated sequences") as info:
        build("budget", {"max_tokens": 100}, exp)
    assert info.value.key == "controller"
    with pytest.raises(ConfigError, match="no monitor metrics"):
        build_controller(
            "acquire",
            {"metric": "target_probability", "threshold": 0.5},
            experiment=make_experiment(),
            metrics_available=[],
            window_steps=5,
            num_steps=50,
        )


def test_registry_and_metric_ranges() -> None:
    assert set(CONTROLLERS) == {"acquire", "track", "budget"}
    assert CONTROLLERS["track"] is TrackController and CONTROLLERS["budget"] is BudgetController
    assert metric_range("exact_match") == (0.0, 1.0)
    assert metric_range("text_logprob") == (-math.inf, 0.0)
    assert metric_range("watermark_z") == (-math.inf, math.inf)


# ------------------------------------------------------------------ decisions and the ledger


def test_decision_dict_round_trip_and_log_record() -> None:
    exp = make_experiment()
    ctl = build("track", {"metric": "target_probability", "target": 0.5, "initial_n": 4}, exp)
    d = ctl.decide(step=0, records=records(0, {"f0": 0.1, "f1": 0.2, "f2": 0.3}), experiment=exp, num_steps=100)
    back = ControllerDecision.from_dict(json.loads(json.dumps(d.to_dict())))
    assert back == d and isinstance(back.window, tuple)
    line = d.log_record(placed=3, unplaced=1, tokens=21)
    assert line["decision"] == {"spans": 4, "tokens": 21, "placed": 3, "unplaced": 1}
    assert line["state"]["n"] == 4 and "metric" not in line["state"]  # scalars only
    assert json.loads(json.dumps(line)) == line
    with pytest.raises(ResumeError):
        ControllerDecision.from_dict({"step": 1, "experiment": "facts"})


def write_ledger(run: Path, rows: list[tuple[int, str, str]]) -> Ledger:
    """A real ledger on disk: rows of (step, experiment, item)."""
    names = ["facts", "other"]
    items = [["f0", "f1", "f2"], ["f0", "z"]]
    with LedgerWriter(run, rank=0, experiment_names=names, item_ids=items) as w:
        for k, (step, experiment, item) in enumerate(rows):
            e = names.index(experiment)
            w.append(
                step=np.array([step]),
                global_row=np.array([k % 4]),
                local_row=np.array([k % 4]),
                sample_id=-1,
                offset=np.array([8 * (k // 4)]),
                length=np.array([4]),
                experiment=np.array([e]),
                item_index=np.array([items[e].index(item)]),
                sequence=np.array([0]),
                repetition=np.array([k]),
                token_hash=np.array([k], dtype=np.uint64),
                row_fingerprint=np.array([k + 1], dtype=np.uint64),
            )
    return Ledger.open(run)


def test_exposures_to_acquisition_counts_spans_before_the_acquisition_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(60):
        exp_name = "facts" if rng.random() < 0.7 else "other"
        item = str(rng.choice(["f0", "f1", "f2"] if exp_name == "facts" else ["f0", "z"]))
        rows.append((int(rng.integers(0, 50)), exp_name, item))
    rows.sort()
    ledger = write_ledger(tmp_path, rows)
    acquired_at = {"f0": 20, "f1": None, "f2": 49}
    got = exposures_to_acquisition(ledger.table, "facts", acquired_at)
    expected = {
        item: (None if at is None else sum(1 for s, e, i in rows if e == "facts" and i == item and s < at))
        for item, at in acquired_at.items()
    }
    assert got == expected
    assert got["f0"] > 0 and got["f2"] > got["f0"]  # the fixture exercises real counts
    record = acquisition_record(ledger.table, "facts", acquired_at)
    assert record["f0"] == {"acquired_at_step": 20, "exposures_to_acquisition": expected["f0"]}
    assert record["f1"] == {"acquired_at_step": None, "exposures_to_acquisition": None}
    # Plain (decoded) string columns work the same way; an unknown experiment counts nothing.
    plain = ledger.table
    for name in ("experiment", "item"):
        plain = plain.set_column(plain.schema.get_field_index(name), name, plain.column(name).cast(pa.string()))
    assert not pa.types.is_dictionary(plain.schema.field("item").type)
    assert exposures_to_acquisition(plain, "facts", acquired_at) == expected
    assert exposures_to_acquisition(ledger.table, "absent", {"f0": 10}) == {"f0": 0}
