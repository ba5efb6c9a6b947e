"""Train a run config and die at a given step: by SIGKILL, or by raising.

    python tests/scripts/train_until_failure.py CONFIG STEP HOW [KEEP_BYTES]

HOW is one of:

- ``kill``: SIGKILL at the start of step STEP (between steps).
- ``raise``: an exception at the start of step STEP.
- ``kill-in-flush``: SIGKILL inside the ledger flush before the checkpoint of step STEP,
  once the shard's temporary file is written and fsynced, just before its rename.
- ``kill-in-save``: SIGKILL inside ``torch.save`` while Composer writes the checkpoint of
  step STEP (after the pickled structure and a few tensors went out, before the end).
- ``torn-save``: once the checkpoint of step STEP is written, cut it to KEEP_BYTES (default:
  half) and point ``latest`` back where it was before that save (or remove it): what a kill
  inside the write leaves; then SIGKILL.
- ``torn-linked``: the same cut, with ``latest`` left at the cut file (a crash that lost
  the file's unflushed tail after the link was written); then SIGKILL.
- ``kill-at-fit-end``: SIGKILL at ``FIT_END`` (STEP is the last step): after the final
  checkpoint, before the trainer closes.

Used by the resume tests: a real process dies mid-run, another resumes it. The kills
inside a write use a profile hook (``sys.setprofile``) to stop at the exact call, so no
code of Composer, torch or multirun is replaced.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from composer.core import Callback, Event, State
from composer.loggers import Logger

from multirun.config import load_config
from multirun.run.inputs import run_dir_of
from multirun.run.trainer import prepare_run
from multirun.run_dir import RunDir

#: ``write_record`` calls of torch.save before the kill: data.pkl, 3 small records, then tensors.
_RECORDS_BEFORE_KILL = 8


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_before_shard_rename(frame: FrameType, event: str, arg: Any) -> None:
    # c_call of os.replace inside run_dir.atomic_path, for a ledger shard: the temporary
    # file is written and fsynced, the rename not done.
    if event == "c_call" and getattr(arg, "__name__", "") == "replace" and frame.f_code.co_name == "atomic_path":
        tmp = frame.f_locals.get("tmp")
        if tmp is not None and str(tmp).endswith(".parquet.tmp") and Path(tmp).stat().st_size > 0:
            _die()


class _KillInsideSave:
    def __init__(self) -> None:
        self.records = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") == "write_record" and frame.f_code.co_name == "_save":
            self.records += 1
            if self.records > _RECORDS_BEFORE_KILL:
                _die()


class FailAt(Callback):
    def __init__(self, step: int, how: str, keep_bytes: int | None, checkpoints: Path) -> None:
        self.step, self.how, self.keep_bytes, self.checkpoints = step, how, keep_bytes, checkpoints
        self.latest_before: str | None = None

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        if step != self.step:
            return
        if event == Event.FIT_END and self.how == "kill-at-fit-end":
            _die()
        if event == Event.BATCH_END and self.how == "kill-in-flush":
            # The ledger flushes at BATCH_CHECKPOINT, which follows; the hook sees it.
            sys.setprofile(_kill_before_shard_rename)
        elif event == Event.BATCH_CHECKPOINT:
            latest = self.checkpoints / "latest-rank0.pt"
            self.latest_before = os.readlink(latest) if latest.is_symlink() else None
            if self.how == "kill-in-save":
                sys.setprofile(_KillInsideSave())  # this callback runs before Composer's CheckpointSaver
        elif event == Event.BATCH_START:
            if self.how in ("torn-save", "torn-linked"):
                self._tear(state)
                _die()
            if self.how == "kill":
                _die()
            if self.how == "raise":
                raise RuntimeError(f"planned failure at step {self.step}")

    def _tear(self, state: State) -> None:
        saved = sorted(self.checkpoints.glob(f"ep*-ba{self.step}-rank0.pt"))
        assert len(saved) == 1, f"no checkpoint of step {self.step} in {self.checkpoints}"
        size = saved[0].stat().st_size
        os.truncate(saved[0], size // 2 if self.keep_bytes is None else self.keep_bytes)
        if self.how == "torn-save":
            latest = self.checkpoints / "latest-rank0.pt"
            latest.unlink()
            if self.latest_before is not None:
                os.symlink(self.latest_before, latest)


def main() -> None:
    config, step, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    keep_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else None
    loaded = load_config(config)
    checkpoints = RunDir(run_dir_of(loaded)).checkpoints
    run = prepare_run(loaded, extra_callbacks=[FailAt(step, how, keep_bytes, checkpoints)], progress=False)
    try:
        run.fit()
    finally:
        run.close()


if __name__ == "__main__":
    main()
