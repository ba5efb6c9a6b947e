"""Callbacks for llm-foundry runs under test, registered in llm-foundry's callback registry.

A training YAML names this file in ``code_paths``; llm-foundry imports it before it
builds the callbacks, so these names can then be used under ``callbacks:``:

- ``foundry_capture_original`` and ``foundry_capture_trained`` (``out: DIR``): save
  each step's host batch at ``AFTER_DATALOADER`` to ``DIR/rank{r}/step{t:06d}.pt``.
  Callbacks run in the order of the YAML's ``callbacks:`` mapping, so the one placed
  before ``multirun`` sees the rows as llm-foundry's collator made them and the one
  after it the rows the model trains on. They clone: multirun overwrites in place.
- ``foundry_kill_once`` (``step: N``, ``marker: FILE``): SIGKILL this process at the
  start of step ``N`` unless ``FILE`` exists (it is created first), so the same command
  run again resumes and finishes instead of dying at the same step.

Used by ``tests/integration/test_llmfoundry_train.py``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from llmfoundry.registry import callbacks


class CaptureBatches(Callback):
    """Save every step's host batch (tensors cloned, per-row lists copied) to ``out``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def after_dataloader(self, state: State, logger: Logger) -> None:
        batch: Any = state.batch
        saved = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else list(v) for k, v in batch.items()}
        folder = self.out / f"rank{dist.get_global_rank()}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step{int(state.timestamp.batch):06d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(saved, tmp)
        os.replace(tmp, path)  # a kill mid-write never leaves half a file


class KillOnce(Callback):
    """SIGKILL at ``BATCH_START`` of ``step``, once: a crash no ``finally`` can clean up after."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = int(step)
        self.marker = Path(marker)

    def batch_start(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.step and not self.marker.exists():
            self.marker.write_text(f"killed at step {self.step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


callbacks.register("foundry_capture_original", func=CaptureBatches)
callbacks.register("foundry_capture_trained", func=CaptureBatches)
callbacks.register("foundry_kill_once", func=KillOnce)
