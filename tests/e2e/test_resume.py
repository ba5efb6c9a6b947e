"""Resume is exact (invariant 4): a run that dies and is resumed with autoresume
writes the same ledger as one that never stopped: no duplicate rows, no missing rows."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multirun.data.mds import PreparedDataset
from multirun.ledger import Ledger
from multirun.run_dir import read_jsonl
from tests.support import REPO, make_dataset, placements, read_json, run_cli, run_config

pytestmark = pytest.mark.e2e

STEPS = 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return make_dataset(tmp_path_factory.mktemp("resume") / "mds", samples=90)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, dataset: PreparedDataset) -> Path:
    """The run directory of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = run_config(tmp, dataset, steps=STEPS, save_interval="8ba", name="straight")
    done = run_cli(["train", str(config), "--no-progress"], cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "straight"


def _fail_at(config: Path, step: int, how: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "train_until_failure.py"), str(config), str(step), how],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("how", "step"),
    [
        ("kill", 13),  # SIGKILL after the step-8 checkpoint: the unflushed rows of steps 8..12 are lost
        ("raise", 19),  # an exception: rows up to step 18 are flushed on close, and cut back to 16 on resume
    ],
)
def test_resumed_run_writes_the_same_ledger(
    tmp_path: Path, dataset: PreparedDataset, uninterrupted: Path, how: str, step: int
) -> None:
    config = run_config(tmp_path, dataset, steps=STEPS, save_interval="8ba", name="resumed")
    died = _fail_at(config, step, how)
    if how == "kill":
        assert died.returncode == -signal.SIGKILL
    else:
        assert died.returncode != 0 and "planned failure" in died.stderr
    run_dir = tmp_path / "resumed"
    partial = Ledger.open(run_dir)
    assert 0 < len(partial) < len(Ledger.open(uninterrupted))
    assert not (run_dir / "summary.json").exists()

    resumed = run_cli(["train", str(config), "--no-progress"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ledger = Ledger.open(run_dir)
    ledger.check_integrity()
    assert placements(ledger.table) == placements(Ledger.open(uninterrupted).table)
    assert read_json(run_dir / "summary.json")["steps_trained"] == STEPS
    # Training itself is exact: the same losses bit for bit (dropout draws the same masks
    # after the resume), the same monitor records, the same summary but for wall times.
    straight = uninterrupted
    assert read_jsonl(run_dir / "training.jsonl") == read_jsonl(straight / "training.jsonl")
    assert read_jsonl(run_dir / "metrics.jsonl") == read_jsonl(straight / "metrics.jsonl")
    assert _untimed(read_json(run_dir / "summary.json")) == _untimed(read_json(straight / "summary.json"))


def test_a_run_killed_after_its_final_checkpoint_is_finished(
    tmp_path: Path, dataset: PreparedDataset, uninterrupted: Path
) -> None:
    # The fit-end evaluation and summary.json come before Composer's final checkpoint, so a
    # kill after that checkpoint leaves a finished run, which a relaunch recognises.
    config = run_config(tmp_path, dataset, steps=STEPS, save_interval="8ba", name="late")
    assert _fail_at(config, STEPS, "kill-at-fit-end").returncode == -signal.SIGKILL
    run_dir = tmp_path / "late"
    assert _untimed(read_json(run_dir / "summary.json")) == _untimed(read_json(uninterrupted / "summary.json"))
    assert read_jsonl(run_dir / "metrics.jsonl") == read_jsonl(uninterrupted / "metrics.jsonl")
    again = run_cli(["train", str(config), "--no-progress"], cwd=tmp_path)
    assert again.returncode == 2 and "nothing to train" in again.stdout + again.stderr


def _untimed(summary: dict) -> dict:
    # The plan fingerprint covers the payload paths, which differ between the two runs' folders.
    return {k: v for k, v in summary.items() if "seconds" not in k and k != "plan_fingerprint"}


def test_resume_with_other_experiments_is_refused(tmp_path: Path, dataset: PreparedDataset) -> None:
    config = run_config(tmp_path, dataset, steps=STEPS, save_interval="8ba", name="changed")
    died = _fail_at(config, 10, "kill")
    assert died.returncode == -signal.SIGKILL
    changed = run_cli(["train", str(config), "--no-progress", "--set", "experiments.0.repetitions=2"], cwd=tmp_path)
    assert changed.returncode != 0
    assert "other experiments" in changed.stdout + changed.stderr


def test_extending_an_interrupted_run_keeps_every_planned_span(
    tmp_path: Path, dataset: PreparedDataset, uninterrupted: Path
) -> None:
    # Planned for 24 steps, killed at 13, relaunched for 32: the static schedule stays the
    # 24-step one, for the steps trained before the kill and for those still ahead.
    config = run_config(tmp_path, dataset, steps=STEPS, save_interval="8ba", name="extended")
    assert _fail_at(config, 13, "kill").returncode == -signal.SIGKILL
    longer = run_cli(["train", str(config), "--no-progress", "--set", "train.max_duration=32ba"], cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    run_dir = tmp_path / "extended"
    ledger = Ledger.open(run_dir)
    ledger.check_integrity()
    assert placements(ledger.table) == placements(Ledger.open(uninterrupted).table)
    manifest = read_json(run_dir / "manifest.json")
    assert (manifest["static_steps"], manifest["durations"]) == (STEPS, [STEPS, 32])
    assert read_json(run_dir / "summary.json")["steps_trained"] == 32


def test_resume_under_a_planner_that_draws_other_spans_is_refused(tmp_path: Path, dataset: PreparedDataset) -> None:
    # The same config and payloads planned into other spans (as another multirun version's
    # planner would): the checkpoint's schedule fingerprint no longer matches.
    config = run_config(tmp_path, dataset, steps=STEPS, save_interval="8ba", name="replanned")
    assert _fail_at(config, 10, "kill").returncode == -signal.SIGKILL
    run_dir = tmp_path / "replanned"
    (checkpoint,) = (run_dir / "checkpoints").glob("ep*-ba8-rank0.pt")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    saved["state"]["callbacks"]["MultirunCallback"]["schedule_fingerprint"] = "0123456789abcdef"
    torch.save(saved, checkpoint)
    ledger_before = placements(Ledger.open(run_dir).table)

    again = run_cli(["train", str(config), "--no-progress"], cwd=tmp_path)
    assert again.returncode != 0
    assert "planned with other spans" in again.stdout + again.stderr
    assert placements(Ledger.open(run_dir).table) == ledger_before
