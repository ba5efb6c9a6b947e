"""The run directory: where each of its files lives, and the one way files are written there.

A kill at any moment leaves every file whole. Documents (JSON, YAML, CSV, ledger shards)
are written through :func:`atomic_path`: a temporary file beside the target, fsynced,
renamed over it, and the directory fsynced, so the old or the new file is there, never
half of one. JSON-lines logs (metrics, training loss, decisions) are appended and
fsynced; a kill can leave at most a torn last line, which :func:`read_jsonl` skips, and
:func:`truncate_jsonl` drops the records after a resumed step.

Example:
    >>> RunDir("runs/demo").metrics.as_posix()
    'runs/demo/metrics.jsonl'
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory (docs/architecture.md, "The run directory")."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def resolved_config(self) -> Path:
        """The config after defaults, substitution and overrides (``multirun interact`` reloads it)."""
        return self.root / "resolved_config.yaml"

    @property
    def manifest(self) -> Path:
        """Plan fingerprint, geometry, payload fingerprints and planned spans."""
        return self.root / "manifest.json"

    @property
    def arms(self) -> Path:
        """Treated and control item ids of every experiment."""
        return self.root / "arms.json"

    @property
    def ledger(self) -> Path:
        """The ledger's Parquet shards, one folder per rank."""
        return self.root / "ledger"

    @property
    def training_log(self) -> Path:
        """Training loss per step."""
        return self.root / "training.jsonl"

    @property
    def metrics(self) -> Path:
        """Every monitor evaluation's records."""
        return self.root / "metrics.jsonl"

    @property
    def controller_log(self) -> Path:
        """Every controller decision."""
        return self.root / "controller.jsonl"

    @property
    def acquisition(self) -> Path:
        """Acquire controllers: the step and exposures at which each item was acquired."""
        return self.root / "acquisition.json"

    @property
    def interaction_trigger(self) -> Path:
        """When, and from which checkpoint, the interaction tests start."""
        return self.root / "interaction_trigger.json"

    @property
    def llmfoundry_config(self) -> Path:
        """The llm-foundry training config of a run trained through llm-foundry (as it logged it)."""
        return self.root / "llmfoundry.yaml"

    @property
    def summary(self) -> Path:
        """Written at fit end; its presence marks a finished run."""
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        """Composer's checkpoints (``save_folder``)."""
        return self.root / "checkpoints"

    @property
    def latest_checkpoint(self) -> Path:
        """Composer's link to rank 0's newest checkpoint."""
        return self.checkpoints / "latest-rank0.pt"

    @property
    def report(self) -> Path:
        """``multirun report``'s default output folder."""
        return self.root / "report"

    @property
    def interaction(self) -> Path:
        """``multirun interact``'s default output folder."""
        return self.root / "interaction"

    @property
    def evaluations(self) -> Path:
        """``multirun evaluate``'s folder: one ``<name>/`` (``metrics.jsonl``, ``summary.json``) per evaluation."""
        return self.root / "evaluations"

    @property
    def interaction_matrix(self) -> Path:
        return self.interaction / MATRIX_JSON


#: The interaction matrix's files, in whatever folder ``multirun interact`` writes to.
MATRIX_JSON = "matrix.json"
MATRIX_CSV = "matrix.csv"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on success it replaces ``path`` durably.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("whole")
        >>> target.read_text()
        'whole'
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) so that a kill leaves the old file or the new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON (sorted keys, NaN as null) so that a kill leaves the old file or the new one."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=plain))


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (through a fresh descriptor: whoever wrote it may be native code)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks inside ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records durably."""
    lines = [json.dumps(r, allow_nan=False, default=plain) + "\n" for r in records]
    if not lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records (a torn last line of a killed run is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Atomically keep only the complete records for which ``keep`` is true."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if keep(r)]
    write_text_atomic(path, "".join(json.dumps(r, allow_nan=False, default=plain) + "\n" for r in kept))


def plain(value: Any) -> Any:
    """JSON form of numpy scalars; NaN and infinities become null."""
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
