"""Determinism (invariant 1): same inputs give the same ledger; the seed and only the seed moves spans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from multirun.config import load_config
from multirun.data.mds import PreparedDataset
from multirun.data.tokenizers import ByteTokenizer
from multirun.ledger import Ledger
from multirun.plan.run_plan import build_run_plan
from multirun.run.inputs import run_geometry
from multirun.run.trainer import prepare_run
from tests.helpers_payload import documents, write_payload
from tests.support import make_dataset, make_payloads, placements, run_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return make_dataset(tmp_path_factory.mktemp("determinism") / "mds", samples=120)


def _train(config: Path) -> Ledger:
    run = prepare_run(load_config(config), progress=False)
    run.fit()
    run.close()
    return Ledger.open(run.run_dir)


def test_same_seed_gives_identical_ledgers_and_another_seed_does_not(tmp_path: Path, dataset: PreparedDataset) -> None:
    first = _train(run_config(tmp_path, dataset, steps=16, save_interval=None, name="a"))
    again = _train(run_config(tmp_path, dataset, steps=16, save_interval=None, name="b"))
    other = _train(run_config(tmp_path, dataset, steps=16, save_interval=None, name="c", seed=6))
    assert len(first) > 0
    assert placements(first.table) == placements(again.table)
    assert first.table.drop_columns(["item", "experiment", "arm"]).equals(
        again.table.drop_columns(["item", "experiment", "arm"])
    )
    assert placements(first.table) != placements(other.table)


def _plan(config: Path, dataset: PreparedDataset):  # type: ignore[no-untyped-def]
    loaded = load_config(config)
    return build_run_plan(loaded, tokenizer=ByteTokenizer(), geometry=run_geometry(loaded, dataset))


def _spans_of(plan, name: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    index = plan.experiment_names.index(name)
    spans = plan.spans.take(plan.spans.experiment == index)
    return np.stack([spans.step, spans.row, spans.offset, spans.length, spans.sequence, spans.repetition])


def test_appending_an_experiment_leaves_the_others_spans_unchanged(tmp_path: Path, dataset: PreparedDataset) -> None:
    payloads = make_payloads(tmp_path / "payloads")
    extra = write_payload(
        tmp_path / "extra", documents(20, prefix="extra", text="extra payload {i} " * 3), name="extra"
    )
    base = [
        {"name": "canaries", "payload": str(payloads["canaries"]), "repetitions": 3},
        {"name": "facts", "payload": str(payloads["facts"]), "repetitions": 2},
    ]
    # Dense enough that the new experiment competes for the same rows and steps.
    grown = [*base, {"name": "extra", "payload": str(extra), "repetitions": 2}]
    before = _plan(run_config(tmp_path, dataset, steps=20, experiments=base, name="base"), dataset)
    after = _plan(run_config(tmp_path, dataset, steps=20, experiments=grown, name="grown"), dataset)
    assert len(after.spans) > len(before.spans)
    for name in ("canaries", "facts"):
        np.testing.assert_array_equal(_spans_of(before, name), _spans_of(after, name))
