"""W&B, offline: `multirun train` logs every step's loss to a local W&B run (no network, no account)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multirun.cli import main
from multirun.run_dir import read_jsonl
from tests.support import make_dataset, run_config

pytestmark = pytest.mark.e2e


def _logged_losses(folder: Path) -> list[float]:
    """``loss/train/total`` of every history record in the offline run's ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(path))
    losses = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "loss/train/total" in items:
                losses.append(items["loss/train/total"])
    return losses


def test_wandb_offline_logs_the_losses_of_a_fresh_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread: None
) -> None:
    # A fresh run with autoresume: Composer asks each logger for a checkpoint to resume;
    # the W&B logger must answer "none" without calling the W&B API.
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    config = run_config(tmp_path, make_dataset(tmp_path / "mds", samples=32), steps=3, experiments=[], name="wb")
    wandb = f"{{project: multirun-test, init_kwargs: {{mode: offline, dir: {tmp_path}}}}}"
    assert main(["train", str(config), "--no-progress", "--set", f"train.loggers={{wandb: {wandb}}}"]) == 0
    trained = [r["loss"] for r in read_jsonl(tmp_path / "wb" / "training.jsonl")]
    assert len(trained) == 3
    assert _logged_losses(tmp_path) == pytest.approx(trained, abs=1e-6)
