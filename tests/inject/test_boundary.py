"""Boundary placement at injection (docs/placement.md; invariant 2 with shifted rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from multirun.config import load_config
from multirun.data.tokenizers import ByteTokenizer
from multirun.inject.batch import DerivedKeys, SequenceIdRule
from multirun.inject.boundary import boundary_experiments, boundary_offset, insert_at_boundaries, inserted_row
from multirun.inject.step import InjectionLog, StepSchedule
from multirun.ledger import token_hash
from multirun.plan.run_plan import RunPlan, build_run_plan
from multirun.types import BatchGeometry
from tests.helpers_payload import documents, minimal_config, write_config, write_payload

EOS = ByteTokenizer().eos_token_id
B, L = 8, 48


@pytest.mark.parametrize(
    ("row", "planned", "length", "expected"),
    [
        ([1, 2, EOS, 3, 4, 5, EOS, 6], 1, 2, 3),  # the first boundary at or after the plan
        ([1, 2, EOS, 3, 4, 5, EOS, 6], 3, 2, 3),  # a boundary at the plan itself
        ([1, 2, EOS, 3, 4, 5, EOS, 6], 4, 2, 3),  # after 4: 7 leaves no room for 2 tokens, so the last before
        ([1, 2, EOS, 3, 4, 5, EOS, 6], 4, 1, 7),  # one token fits after the second EOS
        ([1, 2, 3, 4, 5, 6, 7, 8], 5, 3, 0),  # no EOS: row start
        ([1, 2, 3, 4, 5, 6, 7, EOS], 2, 3, 0),  # an EOS in the last column is no room at all
    ],
)
def test_boundary_rule(row: list[int], planned: int, length: int, expected: int) -> None:
    assert boundary_offset(np.array(row), planned, length, EOS) == expected


def boundary_plan(tmp_path: Path, *, extra: dict | None = None) -> RunPlan:
    payload = write_payload(tmp_path / "p", documents(12, text="needle {i}"), name="p")
    experiments = {"ins": {"payload": str(payload), "placement": {"mode": "steps", "steps": [0, 1], "at": "boundary"}}}
    experiments.update(extra or {})
    doc = minimal_config(**experiments)
    doc["data"] = {"sequence_length": L}
    doc["injection"] = {"max_modified_fraction": 0.2}
    loaded = load_config(write_config(tmp_path / "run.yaml", doc))
    return build_run_plan(loaded, tokenizer=ByteTokenizer(), geometry=BatchGeometry(B, L, 4))


def natural_rows(seed: int) -> np.ndarray:
    """Rows of documents of random lengths separated by EOS, as packed pretraining rows are."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(97, 123, size=(B, L)).astype(np.int64)
    for r in range(B):
        rows[r, np.sort(rng.choice(L, size=3, replace=False))] = EOS
    return rows


def test_inserted_spans_start_at_boundaries_and_shift_the_original_row(tmp_path: Path) -> None:
    plan = boundary_plan(tmp_path, extra={"plain": {"payload": str(tmp_path / "p"), "repetitions": 2}})
    boundary = boundary_experiments(plan)
    assert boundary is not None and boundary.tolist() == [True, False]
    schedule, log = StepSchedule(plan), InjectionLog(plan)
    rule = SequenceIdRule(EOS)
    derived = DerivedKeys(rule)
    seen = 0
    for step in range(4):
        original = natural_rows(step)
        batch = {
            "input_ids": torch.from_numpy(original.copy()),
            "labels": torch.from_numpy(original.copy()),
            "sequence_id": rule.of(torch.from_numpy(original.copy())),
        }
        work = schedule.at(step, np.arange(B), every_row_here=True)
        if not len(work):
            continue
        work = insert_at_boundaries(work, batch["input_ids"].numpy(), boundary, EOS)
        log.record(work, sample_ids=np.full(len(work), -1), row_fingerprints=np.zeros(len(work), np.uint64))
        work.write(batch, derived=derived)  # as the callback writes it: the spans' runs, then the tails'
        trained = batch["input_ids"].numpy()
        expected = original.copy()
        spans = work.spans
        for k in range(len(spans)):
            r, p, n = int(work.local_rows[k]), int(spans.offset[k]), int(spans.length[k])
            payload = plan.experiments[int(spans.experiment[k])].sequence_tokens(int(spans.sequence[k]))
            if boundary[int(spans.experiment[k])]:
                seen += 1
                assert p == 0 or original[r, p - 1] == EOS  # right after an EOS, or at row start
                expected[r] = inserted_row(original[r], payload, p)
                # the rest of the row is the original's, in order, shifted by the payload's length
                np.testing.assert_array_equal(trained[r, p + n :], original[r, p : L - n])
                np.testing.assert_array_equal(trained[r, :p], original[r, :p])
            else:
                expected[r, p : p + n] = payload
        np.testing.assert_array_equal(trained, expected)
        np.testing.assert_array_equal(batch["labels"].numpy(), expected)
        np.testing.assert_array_equal(batch["sequence_id"].numpy(), rule.of(torch.from_numpy(expected)).numpy())
    assert seen == 6  # the 6 treated items of 12, one row each
    columns = log.drain()
    assert columns is not None
    ins = columns["experiment"] == 0
    assert int(ins.sum()) == 6
    # The ledger's hashes are the payload's, and its offsets the actual positions.
    for e, s, h in zip(columns["experiment"], columns["sequence"], columns["token_hash"]):
        assert token_hash(plan.experiments[int(e)].sequence_tokens(int(s))) == int(h)
