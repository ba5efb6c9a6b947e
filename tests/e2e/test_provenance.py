"""Exact provenance (invariant 2) with the real Composer trainer and a real Streaming dataset.

A capture callback placed after multirun's records the batches the model trained on.
The ledger must reconstruct every injected token bit for bit, and every other token
must equal the original data, over more than one epoch and with microbatches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from multirun.config import load_config
from multirun.data.mds import build_dataloader
from multirun.ledger import Ledger, token_hash
from multirun.run.trainer import TrainingRun, prepare_run
from tests.support import CaptureBatches, as_numpy, make_dataset, run_config

pytestmark = pytest.mark.e2e

STEPS = 30
BATCH = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainingRun, CaptureBatches]:
    tmp = tmp_path_factory.mktemp("provenance")
    dataset = make_dataset(tmp / "mds", samples=100)
    config = run_config(tmp, dataset, steps=STEPS, global_batch_size=BATCH, microbatch=3)
    capture = CaptureBatches()
    run = prepare_run(load_config(config), extra_callbacks=[capture], progress=False)
    run.fit()
    run.close()
    return run, capture


def test_run_covers_more_than_one_epoch(trained: tuple[TrainingRun, CaptureBatches]) -> None:
    run, capture = trained
    assert run.dataset.num_samples < STEPS * BATCH
    seen = np.concatenate([as_numpy(b["sample_id"]) for b in capture.batches.values()])
    assert len(seen) > len(np.unique(seen))  # samples were drawn again in a later epoch


def test_every_planned_span_was_trained_on_and_recorded(trained: tuple[TrainingRun, CaptureBatches]) -> None:
    run, _ = trained
    ledger = Ledger.open(run.run_dir)
    ledger.check_integrity()
    spans = run.plan.spans
    planned = sorted(zip(spans.step.tolist(), spans.row.tolist(), spans.offset.tolist()))
    recorded = sorted(zip(*(ledger.table.column(c).to_pylist() for c in ("step", "global_row", "offset"))))
    assert len(planned) >= 30
    assert recorded == planned


def test_ledger_reconstructs_injected_tokens_and_nothing_else_changed(
    trained: tuple[TrainingRun, CaptureBatches],
) -> None:
    run, capture = trained
    rows = Ledger.open(run.run_dir).table.to_pylist()
    experiments = {e.name: e for e in run.plan.experiments}
    injected = {step: np.zeros(tuple(b["input_ids"].shape), dtype=bool) for step, b in capture.batches.items()}

    for row in rows:
        batch = capture.batches[row["step"]]
        local, start, end = row["local_row"], row["offset"], row["offset"] + row["length"]
        assert int(batch["sample_id"][local]) == row["sample_id"]
        trained_tokens = as_numpy(batch["input_ids"][local, start:end])
        experiment = experiments[row["experiment"]]
        expected = experiment.sequence_tokens(row["sequence"])
        np.testing.assert_array_equal(trained_tokens, expected)
        np.testing.assert_array_equal(as_numpy(batch["labels"][local, start:end]), expected)
        assert token_hash(trained_tokens) == row["token_hash"]
        item = experiment.item_ids[int(experiment.seq_items[row["sequence"]])]
        assert row["item"] == item and row["arm"] == "treated"
        assert experiment.treated[experiment.item_ids.index(item)]
        injected[row["step"]][local, start:end] = True

    source = build_dataloader(run.dataset.path, batch_size=1, shuffle=False).dataset
    for row in rows:  # each span names the original row it overwrote by its content
        original_row = as_numpy(source.get_item(row["sample_id"])["input_ids"])
        assert row["row_fingerprint"] == token_hash(original_row)
    for step, batch in capture.batches.items():
        original = np.stack([as_numpy(source.get_item(int(i))["input_ids"]) for i in batch["sample_id"]])
        trained_ids = as_numpy(batch["input_ids"])
        untouched = ~injected[step]
        np.testing.assert_array_equal(trained_ids[untouched], original[untouched])
        np.testing.assert_array_equal(as_numpy(batch["labels"])[untouched], original[untouched])


def test_microbatches_carry_the_rewritten_tokens(trained: tuple[TrainingRun, CaptureBatches]) -> None:
    _, capture = trained
    for step, batch in capture.batches.items():
        micro = capture.microbatches[step]
        assert len(micro) == 3  # 8 rows in microbatches of 3
        np.testing.assert_array_equal(np.concatenate([as_numpy(m) for m in micro]), as_numpy(batch["input_ids"]))


def test_control_items_are_never_injected(trained: tuple[TrainingRun, CaptureBatches]) -> None:
    run, _ = trained
    table = Ledger.open(run.run_dir).table
    for experiment in run.plan.experiments:
        controls = {i for i, t in zip(experiment.item_ids, experiment.treated) if not t}
        items = {r["item"] for r in table.to_pylist() if r["experiment"] == experiment.name}
        assert items and not (items & controls)


def test_run_directory_records_config_manifest_arms_and_summary(trained: tuple[TrainingRun, CaptureBatches]) -> None:
    import json

    run, _ = trained
    run_dir: Path = run.run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    arms = json.loads((run_dir / "arms.json").read_text())
    assert (run_dir / "resolved_config.yaml").is_file()
    assert manifest["plan_fingerprint"] == run.plan.fingerprint == summary["plan_fingerprint"]
    assert summary["steps_trained"] == STEPS
    assert {e["experiment"]: e["spans"] for e in summary["experiments"]} == {
        e["name"]: e["planned_spans"] for e in manifest["experiments"]
    }
    for experiment in run.plan.experiments:
        assert len(arms[experiment.name]["control"]) == int((~experiment.treated).sum())
    assert any((run_dir / "checkpoints").glob("*.pt"))
