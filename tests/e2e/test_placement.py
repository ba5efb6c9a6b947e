"""Whole batches and boundary inserts through the real Composer Trainer and a Streaming dataset.

The forgetting-curve experiment (FC) replaces whole batches at listed steps; a canary
experiment is inserted at document boundaries. A capture callback records what the model
trained on; the ledger must reconstruct it exactly (invariant 2, with shifted rows), the
same config must give the same ledger (invariant 1), and the ``forgetting`` monitor must
record each replaced batch's loss at every evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from multirun.config import load_config
from multirun.data.mds import PreparedDataset, build_dataloader, prepare_dataset, read_dataset_info
from multirun.data.tokenizers import ByteTokenizer
from multirun.inject.boundary import inserted_row
from multirun.ledger import Ledger, token_hash
from multirun.run.trainer import TrainingRun, prepare_run
from multirun.run_dir import read_jsonl
from tests.helpers_payload import write_payload
from tests.support import SEQUENCE_LENGTH, CaptureBatches, as_numpy, make_payloads, placements, run_config

pytestmark = pytest.mark.e2e

STEPS, BATCH, EVERY = 16, 4, 2
FC_STEPS = [2, 3, 4, 5, 6, 7]  # 8 treated rows x 3 repetitions = 6 steps x 4 rows
EOS = ByteTokenizer().eos_token_id


def short_documents(out: Path) -> PreparedDataset:
    """An MDS dataset of short documents, so rows hold several EOS-separated documents."""
    texts = out / "texts"
    texts.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(240):
        words = rng.choice(["tide", "salt", "north", "reed", "ember", "loom", "quarry"], size=int(rng.integers(2, 9)))
        files.append(texts / f"doc{i:03d}.txt")
        files[-1].write_text(f"{i}: " + " ".join(words.tolist()), encoding="utf-8")
    return prepare_dataset(files, out / "mds", ByteTokenizer(), SEQUENCE_LENGTH, progress=False)


def _config(tmp: Path, dataset: PreparedDataset, name: str) -> Path:
    letters = np.random.default_rng(1).integers(97, 123, size=(16, 40))
    # Item-specific text (random letters): what the model learns of a treated row does not carry to the controls.
    fc_items = [{"id": f"fc-{i:02d}", "text": "".join(map(chr, row))} for i, row in enumerate(letters.tolist())]
    fc = write_payload(tmp / "fc", fc_items, name="fc")
    canaries = make_payloads(tmp / "payloads")["canaries"]
    experiments = [
        {
            "name": "fc",
            "payload": str(fc),
            "repetitions": 3,
            "placement": {"mode": "steps", "steps": FC_STEPS, "whole": "batch"},
            "monitor": {"name": "forgetting", "every": f"{EVERY}ba"},
        },
        {"name": "ins", "payload": str(canaries), "repetitions": 1, "placement": {"at": "boundary"}},
    ]
    return run_config(tmp, dataset, steps=STEPS, global_batch_size=BATCH, experiments=experiments, name=name)


def _train(tmp: Path, name: str) -> tuple[TrainingRun, CaptureBatches]:
    capture = CaptureBatches()
    dataset = read_dataset_info(tmp / "data" / "mds") if (tmp / "data").exists() else short_documents(tmp / "data")
    loaded = load_config(_config(tmp / name, dataset, name), ["train.lr=0.01", "model.n_layer=2", "model.n_embd=64"])
    run = prepare_run(loaded, extra_callbacks=[capture], progress=False)
    run.fit()
    run.close()
    return run, capture


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainingRun, CaptureBatches, Path]:
    tmp = tmp_path_factory.mktemp("placement")
    run, capture = _train(tmp, "a")
    return run, capture, tmp


def test_ledger_reconstructs_whole_batches_and_shifted_rows(trained: tuple[TrainingRun, CaptureBatches, Path]) -> None:
    run, capture, _ = trained
    L = run.plan.geometry.sequence_length
    rows = Ledger.open(run.run_dir).table.to_pylist()
    experiments = {e.name: e for e in run.plan.experiments}
    source = build_dataloader(run.dataset.path, batch_size=1, shuffle=False).dataset
    touched: dict[int, set[int]] = {step: set() for step in capture.batches}
    fc_cells, after_eos = set(), 0
    for row in rows:
        batch = capture.batches[row["step"]]
        local = row["local_row"]
        original = as_numpy(source.get_item(row["sample_id"])["input_ids"])
        assert row["row_fingerprint"] == token_hash(original)
        payload = experiments[row["experiment"]].sequence_tokens(row["sequence"])
        assert token_hash(payload) == row["token_hash"]
        trained_row = as_numpy(batch["input_ids"][local])
        offset, length = row["offset"], row["length"]
        if row["experiment"] == "fc":
            assert (offset, length) == (0, L)  # a whole row, exactly the payload
            np.testing.assert_array_equal(trained_row, payload)
            fc_cells.add((row["step"], row["global_row"]))
        else:
            assert offset == 0 or original[offset - 1] == EOS  # at a document boundary
            after_eos += offset > 0
            np.testing.assert_array_equal(trained_row, inserted_row(original, payload, offset))
            np.testing.assert_array_equal(trained_row[offset + length :], original[offset : L - length])
        np.testing.assert_array_equal(as_numpy(batch["labels"][local]), trained_row)
        touched[row["step"]].add(local)
    assert fc_cells == {(s, r) for s in FC_STEPS for r in range(BATCH)}  # every row of every listed step
    assert after_eos > 0  # some inserts moved past an EOS, not only to row start
    for step, batch in capture.batches.items():  # every other row is the data's own
        for local, sample in enumerate(as_numpy(batch["sample_id"]).tolist()):
            if local not in touched[step]:
                original = as_numpy(source.get_item(int(sample))["input_ids"])
                np.testing.assert_array_equal(as_numpy(batch["input_ids"][local]), original)


def test_same_config_gives_the_same_ledger(trained: tuple[TrainingRun, CaptureBatches, Path]) -> None:
    run, _, tmp = trained
    again, _ = _train(tmp, "b")
    first, second = placements(Ledger.open(run.run_dir).table), placements(Ledger.open(again.run_dir).table)
    assert len(first) > 24 and first == second


def test_forgetting_monitor_records_each_replaced_batch(trained: tuple[TrainingRun, CaptureBatches, Path]) -> None:
    run, _, _ = trained
    records = [r for r in read_jsonl(run.run_dir / "metrics.jsonl") if r["experiment"] == "fc"]
    curve: dict[str | None, dict[int, tuple[float, float]]] = {}
    for r in records:
        assert r["metric"] == "row_loss" and r["monitor"] == "forgetting"
        curve.setdefault(r["group"], {})[r["step"]] = (r["treated_mean"], r["control_mean"])
    assert set(curve) == {None, "step 2", "step 3"}  # the whole experiment, then each replaced batch
    for group in ("step 2", "step 3"):
        assert sorted(curve[group]) == list(range(0, STEPS + 1, EVERY))
        assert curve[group][STEPS][1] == curve[None][STEPS][1]  # the same never-injected controls
    after = FC_STEPS[-1] + 1
    gap = {g: {s: c - t for s, (t, c) in v.items()} for g, v in curve.items()}
    for label in [None, "step 2", "step 3"]:
        # Each replaced batch gains on the never-injected controls through its injection...
        assert gap[label][after] > gap[label][0] + 0.02
    # ...and, once injection stops, the gain peaks and then shrinks: the forgetting curve.
    peak = max(gap[None], key=gap[None].__getitem__)
    assert peak >= after and gap[None][STEPS] < gap[None][peak]


def test_inspect_shows_the_rows_the_model_saw(trained: tuple[TrainingRun, CaptureBatches, Path]) -> None:
    from multirun.batch_view import view_step

    run, capture, _ = trained
    ledger = Ledger.open(run.run_dir).table.to_pylist()
    for step in [min(r["step"] for r in ledger if r["experiment"] == "ins"), FC_STEPS[0]]:
        view = view_step(run.run_dir, step)
        batch = capture.batches[step]
        order = np.argsort(as_numpy(batch["sample_id"]), kind="stable")  # global rows by sample id
        trained_rows = as_numpy(batch["input_ids"])[order]
        for row in view.rows:
            np.testing.assert_array_equal(row.trained, trained_rows[row.global_row])


def test_report_draws_the_forgetting_curves(trained: tuple[TrainingRun, CaptureBatches, Path]) -> None:
    from multirun.report import build_document
    from multirun.report.document import Figure
    from multirun.report.rundata import load_run

    run, _, _ = trained
    document = build_document(load_run(run.run_dir))
    figures = {b.key: b for s in document.sections for b in s.blocks if isinstance(b, Figure)}
    assert "forgetting-fc" in figures and "forgetting-ins" not in figures
    assert figures["forgetting-fc"].png.startswith(b"\x89PNG")
