"""Checkpoint folder hygiene on real ``torch.save`` files (no training): what a kill while
saving leaves is moved aside, ``latest`` points at the newest complete checkpoint."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

from multirun.run.checkpoints import checkpoint_files, is_complete_checkpoint, tidy_checkpoints


def _save(folder: Path, batch: int, *, epoch: int = 0, rank: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ep{epoch}-ba{batch}-rank{rank}.pt"
    torch.save({"state": {"weights": torch.arange(4096, dtype=torch.float32) * batch}}, path)
    return path


def _link(folder: Path, target: str, rank: int = 0) -> None:
    os.symlink(target, folder / f"latest-rank{rank}.pt")


def _cut(path: Path, keep: int | None = None) -> None:
    os.truncate(path, path.stat().st_size // 2 if keep is None else keep)


def test_complete_only_when_written_to_the_end(tmp_path: Path) -> None:
    path = _save(tmp_path, 8)
    assert is_complete_checkpoint(path)
    size = path.stat().st_size
    for keep in (0, 10, size // 2, size - 1):
        cut = tmp_path / f"cut-{keep}.pt"
        cut.write_bytes(path.read_bytes()[:keep])
        assert not is_complete_checkpoint(cut), keep
    other = tmp_path / "other.pt"
    with zipfile.ZipFile(other, "w") as archive:  # a whole zip, but not a torch.save archive
        archive.writestr("notes.txt", "hello")
    assert not is_complete_checkpoint(other)
    assert not is_complete_checkpoint(tmp_path / "missing.pt")


def test_torn_newest_with_latest_at_it_falls_back_to_the_previous(tmp_path: Path) -> None:
    _save(tmp_path, 8)
    torn = _save(tmp_path, 16, epoch=1)
    _cut(torn)
    _link(tmp_path, torn.name)
    tidy = tidy_checkpoints(tmp_path)
    assert tidy.resume_from == 8
    assert [(a.name, b.relative_to(tmp_path).as_posix()) for a, b in tidy.discarded] == [
        (torn.name, f"discarded/{torn.name}")
    ]
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba8-rank0.pt"
    assert [f.batch for f in checkpoint_files(tmp_path)] == [8]
    message = tidy.message(tmp_path)
    assert message is not None and torn.name in message and "step 8" in message
    # A second kill at the same save: the name is taken in discarded/, nothing is overwritten.
    _cut(_save(tmp_path, 16, epoch=1))
    again = tidy_checkpoints(tmp_path)
    assert [b.name for _, b in again.discarded] == [f"{torn.name}.1"]
    assert again.relinked == []  # latest already at step 8
    assert tidy_checkpoints(tmp_path).message(tmp_path) is None  # idempotent


def test_first_checkpoint_torn_leaves_a_fresh_start(tmp_path: Path) -> None:
    _cut(_save(tmp_path, 8), keep=0)
    _link(tmp_path, "ep0-ba8-rank0.pt", rank=1)  # a dangling link of another rank
    tidy = tidy_checkpoints(tmp_path)
    assert tidy.resume_from is None
    assert checkpoint_files(tmp_path) == []
    assert not (tmp_path / "latest-rank1.pt").is_symlink()
    assert (tmp_path / "discarded" / "ep0-ba8-rank0.pt").stat().st_size == 0


def test_complete_newer_checkpoint_with_stale_latest_is_linked(tmp_path: Path) -> None:
    # Killed after the file was written but before Composer moved the link.
    _save(tmp_path, 8)
    _save(tmp_path, 16, epoch=1)
    _link(tmp_path, "ep0-ba8-rank0.pt")
    _link(tmp_path, "ep0-ba8-rank1.pt", rank=1)  # Composer links every rank, rank 0 alone saves
    tidy = tidy_checkpoints(tmp_path)
    assert tidy.discarded == [] and tidy.resume_from == 16
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep1-ba16-rank0.pt"
    assert os.readlink(tmp_path / "latest-rank1.pt") == "ep1-ba16-rank1.pt"


def test_sharded_checkpoints_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "ep0-ba8").mkdir()
    torn = _save(tmp_path, 16)
    _cut(torn)
    tidy = tidy_checkpoints(tmp_path)
    assert tidy.skipped and tidy.discarded == [] and torn.exists()
