"""Runs over time: a finished run is extended, never silently re-run or shortened.

The rule (multirun/run/continuation.py): an extension keeps the static schedule of the
run's first duration, so every span of the steps already trained stays where it was,
and the added steps get no static spans.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from multirun.data.mds import PreparedDataset
from multirun.ledger import Ledger
from multirun.run_dir import read_jsonl
from tests.support import make_dataset, placements, read_json, run_cli, run_config

pytestmark = pytest.mark.e2e

STEPS, LONGER = 16, 24


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished 16-step run: (its config, its run directory)."""
    tmp = tmp_path_factory.mktemp("extension")
    dataset: PreparedDataset = make_dataset(tmp / "mds", samples=90)
    config = run_config(tmp, dataset, steps=STEPS, save_interval="8ba", name="short")
    done = run_cli(["train", str(config), "--no-progress"], cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return config, tmp / "short"


def _extend(config: Path, run_dir: Path, copy: Path) -> Path:
    shutil.copytree(run_dir, copy)
    longer = run_cli(
        ["train", str(config), "--no-progress", "--run-dir", str(copy), "--set", f"train.max_duration={LONGER}ba"],
        cwd=config.parent,
    )
    assert longer.returncode == 0, longer.stderr[-3000:]
    return copy


def test_rerunning_a_finished_run_says_so(finished: tuple[Path, Path]) -> None:
    config, _ = finished
    again = run_cli(["train", str(config), "--no-progress"], cwd=config.parent)
    output = again.stdout + again.stderr
    assert again.returncode == 2
    assert "has trained 16 steps and max_duration is 16 steps: nothing to train" in output
    assert "Traceback" not in output


def test_a_shorter_duration_is_refused(finished: tuple[Path, Path], tmp_path: Path) -> None:
    config, run_dir = finished
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    # Back to the step-8 checkpoint (as if killed before the final one): a 12-step run would
    # drop steps planned up to 16.
    latest = copy / "checkpoints" / "latest-rank0.pt"
    latest.unlink()
    for final in (copy / "checkpoints").glob("ep*-ba16-rank0.pt"):
        final.unlink()
    latest.symlink_to("ep0-ba8-rank0.pt")
    shorter = run_cli(
        ["train", str(config), "--no-progress", "--run-dir", str(copy), "--set", "train.max_duration=12ba"],
        cwd=config.parent,
    )
    assert shorter.returncode == 2
    assert "launched for 16" in shorter.stdout + shorter.stderr


def test_an_extension_keeps_every_span_and_is_deterministic(finished: tuple[Path, Path], tmp_path: Path) -> None:
    config, run_dir = finished
    before = Ledger.open(run_dir)
    first = _extend(config, run_dir, tmp_path / "first")
    second = _extend(config, run_dir, tmp_path / "second")

    after = Ledger.open(first)
    after.check_integrity()
    # Static experiments only: the added steps get no spans, the old ones keep theirs.
    assert placements(after.table) == placements(before.table)
    assert max(after.table.column("step").to_pylist()) < STEPS
    manifest = read_json(first / "manifest.json")
    assert manifest["plan_fingerprint"] == read_json(run_dir / "manifest.json")["plan_fingerprint"]
    assert (manifest["static_steps"], manifest["durations"], manifest["geometry"]["num_steps"]) == (
        STEPS,
        [STEPS, LONGER],
        LONGER,
    )
    assert read_json(first / "summary.json")["steps_trained"] == LONGER
    losses = [r["loss"] for r in read_jsonl(first / "training.jsonl")]
    assert len(losses) == LONGER
    assert losses[:STEPS] == [r["loss"] for r in read_jsonl(run_dir / "training.jsonl")]

    # The same extension twice trains the same.
    assert placements(Ledger.open(second).table) == placements(after.table)
    assert [r["loss"] for r in read_jsonl(second / "training.jsonl")] == losses
    evaluated = [r for r in read_jsonl(first / "metrics.jsonl") if r.get("step") == LONGER]
    assert evaluated, "monitors run at the end of the extension"

    # The run reads back over its whole length: a step with spans, a step of the extension.
    for step in (int(before.table.column("step")[0].as_py()), LONGER - 1):
        shown = run_cli(["inspect", str(first), "--step", str(step)], cwd=tmp_path)
        assert shown.returncode == 0, shown.stdout[-2000:] + shown.stderr[-2000:]
    exported = run_cli(["export", str(first)], cwd=tmp_path)
    assert exported.returncode == 0, exported.stdout[-2000:] + exported.stderr[-2000:]
