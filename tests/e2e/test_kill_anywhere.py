"""Kill anywhere (issue 16): a run killed between steps, inside a checkpoint write or inside
a ledger flush, and relaunched with the plain ``multirun train CONFIG``, ends exactly as a
run that never stopped: losses, monitor records, controller decisions, summary and ledger.

One run directory is killed at one moment after another (each relaunch dies at the next),
so the moments compound as they would on a flaky cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from multirun.data.mds import PreparedDataset
from multirun.ledger import Ledger
from multirun.run_dir import read_jsonl
from tests.e2e.test_control import _controlled_config
from tests.e2e.test_resume import _untimed
from tests.support import REPO, make_dataset, placements, read_json, run_cli

pytestmark = pytest.mark.e2e

STEPS = 24  # checkpoints at 8, 16 and 24; monitors and the acquire controller every 4 steps
KEEP = 2
#: One intra-op thread: six short trainings on a busy machine run far faster (tests/conftest.py).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return make_dataset(tmp_path_factory.mktemp("kill") / "mds", samples=90)


def _config(tmp: Path, dataset: PreparedDataset, name: str) -> Path:
    """The controlled run of tests/e2e/test_control.py, keeping the newest 2 checkpoints."""
    config = _controlled_config(tmp, dataset, name=name)
    doc = yaml.safe_load(config.read_text())
    doc["train"]["save_num_checkpoints_to_keep"] = KEEP
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, dataset: PreparedDataset) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    done = run_cli(["train", str(_config(tmp, dataset, "straight")), "--no-progress"], cwd=tmp, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "straight"


def _die(config: Path, step: int, how: str, *extra: str) -> subprocess.CompletedProcess:
    """Train ``config`` in a new process that dies at ``step`` as ``how`` says (tests/scripts/train_until_failure.py)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's multirun
    script = REPO / "tests" / "scripts" / "train_until_failure.py"
    return subprocess.run(
        [sys.executable, str(script), str(config), str(step), how, *extra],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _checkpoints(run_dir: Path) -> dict[str, str]:
    """The checkpoint folder: name -> size, or -> target for a link."""
    folder = run_dir / "checkpoints"
    return {
        p.name: (f"-> {os.readlink(p)}" if p.is_symlink() else str(p.stat().st_size))
        for p in sorted(folder.iterdir())
        if p.is_symlink() or p.is_file()
    }


def test_killed_anywhere_resumes_to_the_uninterrupted_run(
    tmp_path: Path, dataset: PreparedDataset, uninterrupted: Path
) -> None:
    config = _config(tmp_path, dataset, "killed")
    run_dir = tmp_path / "killed"
    folder = run_dir / "checkpoints"

    # 1. Killed inside the first checkpoint write (the case): a 0-byte file, no latest link.
    died = _die(config, 8, "torn-save", "0")
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert _checkpoints(run_dir) == {"ep0-ba8-rank0.pt": "0"}

    # 2. The relaunch moves it aside and starts over from step 0; it is killed inside the
    # ledger flush before the step-16 checkpoint: the shard's temporary file is written,
    # not renamed, and the checkpoint is not written.
    died = _die(config, 16, "kill-in-flush")
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert "discarded/ep0-ba8-rank0.pt" in died.stderr and "step 0 (no complete checkpoint left)" in died.stderr
    assert list((run_dir / "ledger").glob("rank-*/*.parquet.tmp"))
    listing = _checkpoints(run_dir)
    assert set(listing) == {"ep0-ba8-rank0.pt", "latest-rank0.pt"}
    assert listing["latest-rank0.pt"] == "-> ep0-ba8-rank0.pt"
    assert (folder / "discarded" / "ep0-ba8-rank0.pt").stat().st_size == 0  # kept, never deleted

    # 3. Resumed from step 8; killed by SIGKILL inside torch.save of the step-16 checkpoint:
    # a torn file, latest still at step 8.
    died = _die(config, 16, "kill-in-save")
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    torn = next(folder.glob("ep*-ba16-rank0.pt"))
    assert _checkpoints(run_dir)["latest-rank0.pt"] == "-> ep0-ba8-rank0.pt"

    # 4. Resumed from step 8 again (the torn file moved aside); the step-16 checkpoint is
    # written and linked, then loses its tail (a crash before the page cache reached disk).
    died = _die(config, 16, "torn-linked")
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert f"{torn.name} (" in died.stderr and f"discarded/{torn.name}" in died.stderr
    assert _checkpoints(run_dir)["latest-rank0.pt"] == f"-> {torn.name}"

    # 5. The plain command: the torn, linked checkpoint is moved aside, latest points at
    # step 8 again, and the run finishes.
    resumed = run_cli(["train", str(config), "--no-progress"], cwd=tmp_path, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"latest-rank0.pt -> ep0-ba8-rank0.pt (was {torn.name})" in resumed.stderr
    assert sorted(p.name for p in (folder / "discarded").iterdir()) == sorted(
        ["ep0-ba8-rank0.pt", torn.name, f"{torn.name}.1"]
    )

    # Exactly the uninterrupted run.
    straight = uninterrupted
    for log in ("training.jsonl", "metrics.jsonl", "controller.jsonl"):
        assert read_jsonl(run_dir / log) == read_jsonl(straight / log), log
    assert len(read_jsonl(run_dir / "controller.jsonl")) == STEPS // 4 + 1
    assert _untimed(read_json(run_dir / "summary.json")) == _untimed(read_json(straight / "summary.json"))
    assert read_json(run_dir / "acquisition.json") == read_json(straight / "acquisition.json")
    ledger = Ledger.open(run_dir)
    ledger.check_integrity()
    assert placements(ledger.table) == placements(Ledger.open(straight).table)
    assert not list((run_dir / "ledger").glob("rank-*/*.tmp"))

    # Rotation held across the resumes: the newest KEEP checkpoints of the whole folder
    # (Composer alone would also keep step 8, saved by an earlier process).
    kept = {name: size for name, size in _checkpoints(run_dir).items() if name.startswith("ep")}
    assert sorted(kept, key=lambda n: int(n.split("-ba")[1].split("-")[0])) == [
        torn.name,
        next(folder.glob("ep*-ba24-rank0.pt")).name,
    ]
    assert _checkpoints(run_dir)["latest-rank0.pt"].endswith("-ba24-rank0.pt")
