"""Checkpoint folder hygiene: a half-written checkpoint never blocks autoresume.

Composer writes a checkpoint straight to its final name (``ep{e}-ba{b}-rank{r}.pt``) and
then points ``latest-rank{r}.pt`` at it. A kill in between leaves a torn file, with the
link still at the previous checkpoint or missing (the first save); a crash that loses
unflushed pages can even leave the link at a torn file. Composer then refuses to start
(the torn file "may conflict with a future checkpoint") or fails loading it.

Before the Trainer is built, :func:`prepare_checkpoint_folder` (rank 0 decides, the other
ranks wait) checks every checkpoint file cheaply: a ``torch.save`` file is a zip archive
whose central directory is written last, so a file that :mod:`zipfile` opens, and that
lists ``data.pkl``, was written to its end (no tensor is read). Incomplete ones are moved
to ``checkpoints/discarded/`` (never deleted), the ``latest`` links are pointed at the
newest complete checkpoint, and a warning says what was discarded. Autoresume then loads
that checkpoint and multirun cuts its logs and ledger back to its step.

:class:`KeepNewestCheckpoints` makes Composer's ``save_num_checkpoints_to_keep`` count the
checkpoints earlier launches of the run left in the folder too (Composer rotates only what
it saved in its own process).

Only Composer's default monolithic names are handled; a sharded checkpoint (a folder per
step) is left as it is.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "ep0-ba8-rank0.pt").write_bytes(b"")  # a kill during the first save
    >>> tidy = tidy_checkpoints(folder)
    >>> [(src.name, dst.parent.name) for src, dst in tidy.discarded], tidy.resume_from
    ([('ep0-ba8-rank0.pt', 'discarded')], None)
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from multirun.run_dir import fsync_dir

#: Composer's default checkpoint and ``latest`` link names (``save_filename``, ``save_latest_filename``).
CHECKPOINT_NAME = re.compile(r"^ep(?P<epoch>\d+)-ba(?P<batch>\d+)-rank(?P<rank>\d+)\.pt$")
LATEST_NAME = re.compile(r"^latest-rank(?P<rank>\d+)\.pt$")
_SHARDED_NAME = re.compile(r"^ep\d+-ba\d+$")
DISCARDED = "discarded"


@dataclass(frozen=True)
class CheckpointFile:
    """One rank's monolithic checkpoint file in the folder."""

    path: Path
    epoch: int
    batch: int
    rank: int


@dataclass
class CheckpointTidy:
    """What :func:`tidy_checkpoints` found and did.

    Attributes:
        discarded: ``(incomplete file, where it was moved)`` pairs.
        relinked: the ``latest`` links that were re-pointed or removed.
        resume_from: the newest complete checkpoint step (None: none, a fresh start).
        skipped: why the folder was left alone (sharded checkpoints), else None.
    """

    discarded: list[tuple[Path, Path]] = field(default_factory=list)
    relinked: list[str] = field(default_factory=list)
    resume_from: int | None = None
    skipped: str | None = None

    def message(self, folder: Path) -> str | None:
        """The warning to print, or None when nothing was changed."""
        if not self.discarded and not self.relinked:
            return None
        moved = "; ".join(
            f"{src.name} ({_size(dst)} bytes) -> {dst.relative_to(folder)}" for src, dst in self.discarded
        )
        where = f"step {self.resume_from}" if self.resume_from is not None else "step 0 (no complete checkpoint left)"
        parts = [f"multirun: {folder}:"]
        if self.discarded:
            parts.append(f"moved incomplete checkpoints (a kill while saving) aside: {moved};")
        if self.relinked:
            parts.append(f"{', '.join(self.relinked)};")
        parts.append(f"autoresume continues from {where}")
        return " ".join(parts)


def is_complete_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a ``torch.save`` archive written to its end (no tensor is read).

    The zip central directory is written last and read first, so a truncated file fails
    to open; ``data.pkl`` (the pickled structure) must be listed.
    """
    try:
        if path.stat().st_size == 0:
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    return any(name == "data.pkl" or name.endswith("/data.pkl") for name in names)


def checkpoint_files(folder: Path) -> list[CheckpointFile]:
    """The monolithic checkpoint files (regular files with Composer's default name), oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and path.is_file() and not path.is_symlink():
            found.append(CheckpointFile(path, int(match["epoch"]), int(match["batch"]), int(match["rank"])))
    return sorted(found, key=lambda f: (f.batch, f.epoch, f.rank))


def tidy_checkpoints(folder: Path) -> CheckpointTidy:
    """Move incomplete checkpoints to ``discarded/``; point ``latest`` at the newest complete one.

    A step counts as complete when every rank file it has is complete. Runs in one
    process (rank 0); see :func:`prepare_checkpoint_folder`.
    """
    tidy = CheckpointTidy()
    if not folder.is_dir():
        return tidy
    sharded = [p.name for p in folder.iterdir() if p.is_dir() and _SHARDED_NAME.match(p.name)]
    latest0 = folder / "latest-rank0.pt"
    if sharded or (latest0.is_symlink() and latest0.is_dir()):
        tidy.skipped = "sharded checkpoints (folders) are left as they are"
        return tidy
    steps: dict[tuple[int, int], list[CheckpointFile]] = {}
    for f in checkpoint_files(folder):
        steps.setdefault((f.batch, f.epoch), []).append(f)
    complete = []
    for key, files in sorted(steps.items()):
        if all(is_complete_checkpoint(f.path) for f in files):
            complete.append(key)
        else:
            tidy.discarded.extend((f.path, _discard(folder, f.path)) for f in files)
    if tidy.discarded:
        fsync_dir(folder)
        fsync_dir(folder / DISCARDED)
    links = {int(m["rank"]): p for p in folder.iterdir() if (m := LATEST_NAME.match(p.name)) and p.is_symlink()}
    if complete:
        batch, epoch = complete[-1]
        tidy.resume_from = batch
        for rank in sorted({0, *links}):
            target = f"ep{epoch}-ba{batch}-rank{rank}.pt"
            link = folder / f"latest-rank{rank}.pt"
            if link.is_symlink() and os.readlink(link) == target:
                continue
            before = os.readlink(link) if link.is_symlink() else None
            _symlink_atomic(target, link)
            tidy.relinked.append(f"{link.name} -> {target} (was {before or 'missing'})")
    else:
        for link in links.values():
            before = os.readlink(link)
            link.unlink()
            tidy.relinked.append(f"removed {link.name} (-> {before})")
    if tidy.relinked:
        fsync_dir(folder)
    return tidy


def prepare_checkpoint_folder(folder: Path) -> CheckpointTidy:
    """:func:`tidy_checkpoints` on rank 0 while the other ranks wait; rank 0 warns what it did.

    Call before the Trainer is built (Composer's autoresume reads ``latest`` then).
    """
    answer: list[CheckpointTidy | OSError | None] = [None]
    if dist.get_global_rank() == 0:
        try:
            answer[0] = tidy_checkpoints(folder)
        except OSError as exc:  # the other ranks must not wait for an answer that never comes
            answer[0] = exc
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    result = answer[0]
    if isinstance(result, OSError):
        raise result
    assert result is not None
    message = result.message(folder)
    if message and dist.get_global_rank() == 0:
        warnings.warn(message, stacklevel=2)
    return result


class KeepNewestCheckpoints(Callback):
    """Make ``save_num_checkpoints_to_keep`` hold across resumes.

    Composer's :class:`~composer.callbacks.CheckpointSaver` deletes the oldest of the
    checkpoints *it* saved (its ``saved_checkpoints`` list). At ``FIT_START`` this hands it
    this rank's checkpoints already in ``folder`` (those of earlier launches, the resumed
    one included), oldest first, so its own rotation keeps the newest N of the whole folder.
    The newest (the one ``latest`` points at) is never among those removed when N >= 1.

    Args:
        folder: the checkpoint folder (the Trainer's ``save_folder``).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def fit_start(self, state: State, logger: Logger) -> None:
        if state.fsdp_sharded_state_dict_enabled:
            return  # sharded checkpoints are folders: Composer rotates those itself
        rank, step = dist.get_global_rank(), int(state.timestamp.batch)
        earlier = [str(f.path) for f in checkpoint_files(self.folder) if f.rank == rank and f.batch <= step]
        for saver in state.callbacks:
            if isinstance(saver, CheckpointSaver) and saver.num_checkpoints_to_keep >= 0 and self._saves_here(saver):
                known = {os.path.realpath(p) for p in saver.saved_checkpoints}
                saver.saved_checkpoints[:0] = [p for p in earlier if os.path.realpath(p) not in known]

    def _saves_here(self, saver: CheckpointSaver) -> bool:
        folder = Path(str(saver.folder))
        return folder.is_dir() and self.folder.is_dir() and os.path.samefile(folder, self.folder)


def _discard(folder: Path, path: Path) -> Path:
    """Move ``path`` into ``folder/discarded/`` under a name not yet taken there."""
    target_dir = folder / DISCARDED
    target_dir.mkdir(exist_ok=True)
    target = target_dir / path.name
    n = 0
    while target.exists() or target.is_symlink():
        n += 1
        target = target_dir / f"{path.name}.{n}"
    path.rename(target)
    return target


def _symlink_atomic(target: str, link: Path) -> None:
    """Point ``link`` at ``target`` (relative, as Composer writes it) in one rename."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _size(path: Path) -> Any:
    try:
        return path.stat().st_size
    except OSError:
        return "?"
