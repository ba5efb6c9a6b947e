"""Typed evaluation records: their metrics.jsonl form is the established one (same keys,
same order, same values), parsing a line gives the record back, and nothing but the JSON
boundary knows the run-level sentinel."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from multirun.measure.records import (
    EffectRecord,
    EvaluationRecord,
    FailureRecord,
    ItemScore,
    RunMetricRecord,
    effect_records,
    record_from_json,
    records_from_json,
)
from multirun.measure.stats import compare_means, compare_rates, holm_adjust
from multirun.run_dir import append_jsonl, read_jsonl

EFFECT_KEYS = [
    "step",
    "when",
    "experiment",
    "monitor",
    "group",
    "primary",
    "metric",
    "test",
    "alternative",
    "n_treated",
    "n_control",
    "treated_mean",
    "control_mean",
    "effect",
    "ci_low",
    "ci_high",
    "ci_level",
    "p_value",
    "p_holm",
    "ci_method",
    "exact",
]


def _effect(**kw: object) -> EffectRecord:
    result = compare_means(
        np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.5, 1.0]), metric="text_logprob", n_resamples=200, seed=0
    )
    fields: dict[str, object] = {
        "step": 20,
        "when": "interval",
        "experiment": "facts",
        "monitor": "knowledge",
        "group": None,
        "primary": True,
        "effect": holm_adjust([result])[0],
        "items": ItemScore.of(["f0", "c0", "c1"], np.array([True, False, False]), np.array([-1.5, np.nan, -3.0])),
    }
    fields.update(kw)
    return EffectRecord(**fields)  # type: ignore[arg-type]


def test_effect_record_json_is_the_metrics_jsonl_layout() -> None:
    record = _effect()
    line = record.to_json()
    assert list(line) == EFFECT_KEYS + ["items"]
    assert line["items"] == [["f0", True, -1.5], ["c0", False, None], ["c1", False, -3.0]]
    assert line["p_holm"] == record.effect.p_holm and line["p_value"] == record.effect.p_value
    assert all(type(line[k]) is float for k in ("treated_mean", "effect", "p_value", "p_holm"))
    # Group records carry no per-item scores, and no "items" key.
    group = _effect(group="x4", primary=False, items=None, effect=replace(record.effect, p_holm=None))
    assert list(group.to_json()) == EFFECT_KEYS and group.to_json()["p_holm"] is None


def test_every_record_round_trips_through_a_jsonl_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    empty = compare_rates(0, 0, 1, 4, metric="exact_match")  # NaN effect, CI and p-value
    records: list[EvaluationRecord] = [
        RunMetricRecord(step=20, when="interval", metric="heldout_loss", value=3.25),
        _effect(),
        _effect(group="x1", primary=False, items=None),
        _effect(experiment="quiz", effect=holm_adjust([empty])[0]),  # a primary metric whose test could not run
        FailureRecord(
            step=20, when="interval", experiment="canaries", monitor="memorization", error="RuntimeError('x')"
        ),
    ]
    append_jsonl(tmp_path / "metrics.jsonl", [r.to_json() for r in records])  # strict JSON: NaN is written as null
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert lines[0] == {"step": 20, "when": "interval", "experiment": "_run", "metric": "heldout_loss", "value": 3.25}
    assert lines[3]["p_value"] is None and lines[3]["p_holm"] is None and lines[3]["effect"] is None
    back = records_from_json(lines)
    assert [type(r) for r in back] == [type(r) for r in records]
    assert [r.to_json() for r in back] == lines
    assert math.isnan(back[3].effect.p_value)  # type: ignore[union-attr]
    assert back[0] == records[0] and back[4] == records[4]
    assert [r.experiment for r in effect_records(back)] == ["facts", "facts", "quiz"]
    assert back[1].item_scores() == {"f0": -1.5, "c1": -3.0}  # type: ignore[union-attr]


def test_a_summary_effect_without_items_parses() -> None:
    line = {k: v for k, v in _effect().to_json().items() if k != "items"}
    record = record_from_json(json.loads(json.dumps(line)))
    assert isinstance(record, EffectRecord) and record.items is None and record.item_scores() == {}
    assert record.to_json() == line


@pytest.mark.parametrize(
    "line",
    [
        {"step": 1, "when": "interval", "experiment": "facts", "monitor": "knowledge", "metric": "m"},  # no statistics
        {"step": 1, "when": "interval", "experiment": "_run", "metric": "heldout_loss"},  # no value
        {"step": 1, "experiment": "facts", "monitor": "knowledge", "error": "x"},  # no when
        ["not", "a", "record"],
    ],
)
def test_malformed_lines_are_errors(line: object) -> None:
    with pytest.raises(ValueError):
        record_from_json(line)  # type: ignore[arg-type]
