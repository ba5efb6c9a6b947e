"""Whole-row and whole-batch placement (docs/placement.md; invariant 5 for reserved rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multirun.config import load_config
from multirun.control.controllers.decision import ControllerDecision
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError, PlacementError
from multirun.kinds.rows import batch_assignment, fit_row
from multirun.plan.dynamic import DynamicSchedule
from multirun.plan.run_plan import build_run_plan
from multirun.plan.static import Occupancy, occupancy_of, plan_static
from multirun.types import BatchGeometry, Placement, PreparedExperiment
from tests.helpers_payload import documents, minimal_config, write_config, write_payload

GEO = BatchGeometry(global_batch_size=4, sequence_length=16, num_steps=20)


def experiment(name: str, lengths: list[int], reps: list[float], placement: Placement) -> PreparedExperiment:
    n = len(lengths)
    pool = np.concatenate([np.full(length, 100 + s, np.int32) for s, length in enumerate(lengths)])
    return PreparedExperiment(
        name=name,
        kind="documents",
        item_ids=[f"{name}-{i}" for i in range(n)],
        treated=np.ones(n, bool),
        token_pool=pool,
        seq_offsets=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
        seq_lengths=np.array(lengths, np.int32),
        seq_items=np.arange(n, dtype=np.int32),
        seq_repetitions=np.array(reps, np.float64),
        placement=placement,
        fingerprint=name,
    )


def test_fit_row_repeats_and_cuts_to_the_sequence_length() -> None:
    assert fit_row([1, 2, 3], 8).tolist() == [1, 2, 3, 1, 2, 3, 1, 2]
    assert fit_row(list(range(20)), 16).tolist() == list(range(16))


def test_whole_batches_fill_every_row_of_each_listed_step_beyond_the_cap() -> None:
    batch = experiment("fc", [16] * 8, [1.0] * 8, Placement("steps", 3, 8, (7, 3), whole="batch"))
    scattered = experiment("canaries", [5] * 30, [1.0] * 30, Placement("uniform", 0, 20))
    plan = plan_static([batch, scattered], GEO, seed=1, max_modified_fraction=0.25)  # cap 16 tokens per step
    spans = plan.spans
    fc = spans.take(spans.experiment == 0)
    assert list(zip(fc.step.tolist(), fc.row.tolist())) == [(s, r) for s in (3, 7) for r in range(4)]
    assert set(fc.offset.tolist()) == {0} and set(fc.length.tolist()) == {16}
    assert fc.sequence.tolist() == list(range(8))  # payload order: batch j holds sequences 4j..4j+3
    other = spans.take(spans.experiment == 1)
    assert len(other) == 30 and not np.isin(other.step, [3, 7]).any()  # whole batches take no other span
    per_step = np.bincount(other.step, weights=other.length, minlength=20)
    assert per_step.max() <= plan.cap_tokens  # the cap still holds for scattered spans


def test_whole_batch_assignment_is_repetition_major() -> None:
    a = batch_assignment(np.array([2.0, 2.0]), [1, 4], rows=2)
    assert a.step.tolist() == [1, 1, 4, 4] and a.sequence.tolist() == [0, 1, 0, 1]
    assert a.repetition.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="3 spans"):
        batch_assignment(np.array([1.0, 1.0, 1.0]), [1, 4], rows=2)
    with pytest.raises(ValueError, match="whole-number"):
        batch_assignment(np.array([1.5, 2.5]), [1, 4], rows=2)


def test_whole_rows_reserve_their_rows_and_plans_are_deterministic() -> None:
    rows = experiment("rows", [16] * 10, [2.0] * 10, Placement("uniform", 0, 20, whole="row"))
    scattered = experiment("canaries", [4] * 60, [1.0] * 60, Placement("uniform", 0, 20))
    a = plan_static([rows, scattered], GEO, seed=3, max_modified_fraction=0.25)
    b = plan_static([rows, scattered], GEO, seed=3, max_modified_fraction=0.25)
    for name in ("step", "row", "offset", "sequence", "repetition", "experiment"):
        np.testing.assert_array_equal(getattr(a.spans, name), getattr(b.spans, name))
    whole = a.spans.take(a.spans.experiment == 0)
    assert len(whole) == 20 and set(whole.offset.tolist()) == {0}
    cells = set(zip(whole.step.tolist(), whole.row.tolist()))
    assert len(cells) == 20  # one span per row
    other = a.spans.take(a.spans.experiment == 1)
    assert not cells & set(zip(other.step.tolist(), other.row.tolist()))
    assert sorted(whole.repetition.tolist()) == [0] * 10 + [1] * 10


def test_controllers_never_enter_reserved_rows() -> None:
    batch = experiment("fc", [16] * 8, [1.0] * 8, Placement("steps", 0, 3, (0, 1), whole="batch"))
    boundary = experiment("b", [6] * 6, [1.0] * 6, Placement("steps", 2, 5, (2, 3, 4), at="boundary"))
    ctl = experiment("ctl", [3] * 4, [0.0] * 4, Placement("uniform", 0, 20))
    plan = plan_static([batch, boundary, ctl], GEO, seed=0, max_modified_fraction=0.25)
    with pytest.raises(PlacementError):  # the plain rebuild counts whole rows against the cap
        Occupancy.from_spans(plan.spans, GEO, 0.25)
    occupancy_of(plan.spans, [batch, boundary, ctl], GEO, 0.25)  # the row-aware one holds them
    schedule = DynamicSchedule([batch, boundary, ctl], plan.spans, GEO, max_modified_fraction=0.25, seed=0)
    ids = ctl.item_ids
    decision = ControllerDecision(
        0, "ctl", "budget", (0, 6), dict.fromkeys(ids, 5), {i: [k] * 5 for k, i in enumerate(ids)}
    )
    spans, _ = schedule.apply(decision, warn=False)
    assert len(spans) > 0
    reserved = set(zip(plan.spans.step.tolist(), plan.spans.row.tolist()))
    assert not reserved & set(zip(spans.step.tolist(), spans.row.tolist()))


def test_boundary_spans_get_one_row_each_and_count_against_the_cap() -> None:
    boundary = experiment("b", [6] * 12, [1.0] * 12, Placement("steps", 0, 3, (0, 1, 2), at="boundary"))
    plan = plan_static([boundary], GEO, seed=2, max_modified_fraction=0.8, on_unplaceable="warn")
    spans = plan.spans
    assert len(set(zip(spans.step.tolist(), spans.row.tolist()))) == len(spans) == 12
    assert (spans.offset + spans.length <= 16).all()
    with pytest.warns(UserWarning, match="no cap"):
        tight = plan_static([boundary], GEO, seed=2, max_modified_fraction=0.2, on_unplaceable="warn")  # 12 tokens
    assert tight.unplaced["b"] == 6  # two 6-token spans fit each of the three steps


def _config(tmp_path: Path, **placement: Any) -> Path:
    payload = write_payload(tmp_path / "p", documents(8), name="p")
    doc = minimal_config(fc={"payload": str(payload), "placement": placement, "control_fraction": 0.5})
    doc["data"] = {"sequence_length": 32}
    return write_config(tmp_path / "run.yaml", doc)


def test_whole_batch_needs_exactly_rows_times_steps_spans(tmp_path: Path) -> None:
    loaded = load_config(_config(tmp_path, mode="steps", steps=[5, 9, 12], whole="batch"))
    geo = BatchGeometry(global_batch_size=4, sequence_length=32, num_steps=100)
    with pytest.raises(ConfigError, match=r"3 step\(s\) x 4 rows = 12 rows, but the experiment has 4 spans") as e:
        build_run_plan(loaded, tokenizer=ByteTokenizer(), geometry=geo)
    assert e.value.key == "experiments[0].placement.steps"
    ok = load_config(_config(tmp_path, mode="steps", steps=[5], whole="batch"))
    plan = build_run_plan(ok, tokenizer=ByteTokenizer(), geometry=geo)
    assert plan.spans.step.tolist() == [5] * 4 and set(plan.spans.length.tolist()) == {32}
    manifest = plan.manifest()["experiments"][0]
    assert manifest["placement"]["whole"] == "batch" and manifest["cap_exempt_tokens"] == 128


@pytest.mark.parametrize(
    ("placement", "key", "message"),
    [
        ({"whole": "batch"}, "placement.whole", "needs mode: steps"),
        ({"whole": "row", "at": "boundary"}, "placement.at", "replaces the row entirely"),
        ({"whole": "rows"}, "placement.whole", "row"),
    ],
)
def test_bad_row_placements_fail_before_training(tmp_path: Path, placement: dict, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        load_config(_config(tmp_path, **placement))
    assert e.value.key == f"experiments[0].{key}"
    assert e.value.line is not None


def test_interaction_arms_keep_row_placements(tmp_path: Path) -> None:
    from multirun.config import InteractionConfig
    from multirun.interaction.arms import interaction_plan

    loaded = load_config(_config(tmp_path, mode="steps", steps=[5], whole="batch"))
    geo = BatchGeometry(global_batch_size=4, sequence_length=32, num_steps=100)
    settings = InteractionConfig(steps=10, intensity=0.2)
    plan = interaction_plan(
        loaded, tokenizer=ByteTokenizer(), geometry=geo, start_step=50, settings=settings, participants=["fc"]
    )
    assert plan.experiments[0].placement.whole == "row"
    spans = plan.spans
    assert len(spans) > 0 and set(spans.length.tolist()) == {32} and set(spans.offset.tolist()) == {0}
    assert ((spans.step >= 50) & (spans.step < 60)).all()
