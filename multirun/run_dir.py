"""The run directory: where each of its files lives, and the one way files are written there.

A kill at any moment leaves every file whole. Documents (JSON, YAML, CSV, ledger shards)
are written through :func:`atomic_path`: a temporary file beside the target, fsynced,
renamed over it, and the directory fsynced, so the old or the new file is there, never
half of one. JSON-lines logs (metrics, training loss, decisions) are appended and
fsynced; a kill can leave at most a torn last line, which :func:`read_jsonl` drops with
a :class:`TornLineWarning` naming it, and :func:`truncate_jsonl` drops the records after
a resumed step.

Every JSON-lines record ends with its own checksum, ``"_xxh64": "<16 hex digits>"``: the
xxh64 of the line as written with those digits reading ``0`` (:func:`jsonl_line`). Readers
verify and remove it, so a changed byte in any record, or a malformed line anywhere but at
the end, is a :class:`~multirun.errors.CorruptionError` naming the file and line rather
than a silently wrong or missing value. Logs without the field (runs written before it)
are read unverified; a log with it on some records and not on others is refused.

Example:
    >>> RunDir("runs/demo").metrics.as_posix()
    'runs/demo/metrics.jsonl'
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from multirun.errors import CorruptionError


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


#: The field each JSON-lines record carries last: its checksum (see :func:`jsonl_line`).
CHECKSUM_FIELD = "_xxh64"
_DIGITS = 16
_TAIL = len('"}')  # what follows the digits: the value's closing quote and the object's brace
# A checksum field whose name was damaged (same length, 16 hex digits): not an unchecked old record.
_DAMAGED_FIELD = re.compile(rf', "[^"]{{{len(CHECKSUM_FIELD)}}}": "[0-9a-f]{{{_DIGITS}}}"\}}\s*$')


class TornLineWarning(UserWarning):
    """A JSON-lines log ended in a torn line (a process killed while appending): it was dropped."""


def jsonl_line(record: dict[str, Any]) -> str:
    """One JSON-lines record with its checksum, newline included.

    The record's JSON (NaN and infinities refused; numpy scalars as :func:`plain`) gets a
    last field ``"_xxh64"``: the xxh64 of the whole line as written with the 16 digits
    reading ``0``. Human-readable, and any JSON reader sees one extra field.

    Example:
        >>> print(jsonl_line({"step": 3, "loss": 2.5}), end="")
        {"step": 3, "loss": 2.5, "_xxh64": "3d2a06fb1c601a0f"}
    """
    if CHECKSUM_FIELD in record:
        raise ValueError(f"a record may not carry the checksum field {CHECKSUM_FIELD!r} itself")
    text = json.dumps({**record, CHECKSUM_FIELD: "0" * _DIGITS}, allow_nan=False, default=plain)
    digest = xxhash.xxh64_hexdigest(text.encode("utf-8"))
    return f"{text[: -_DIGITS - _TAIL]}{digest}{text[-_TAIL:]}\n"


def _checksum_ok(line: str, recorded: Any) -> bool:
    if not isinstance(recorded, str) or len(recorded) != _DIGITS or not line.endswith(f'"{recorded}"}}'):
        return False
    zeroed = f"{line[: -_DIGITS - _TAIL]}{'0' * _DIGITS}{line[-_TAIL:]}"
    return xxhash.xxh64_hexdigest(zeroed.encode("utf-8")) == recorded


@dataclass(frozen=True)
class JsonlRecords:
    """The verified records of a JSON-lines log (:func:`read_jsonl_lines`)."""

    path: Path
    #: (1-based line number, parsed JSON value without its checksum field), blank lines left out.
    lines: list[tuple[int, Any]]
    #: the torn last line that was dropped (a writer killed mid-append), if any.
    torn_line: int | None = None

    @property
    def torn_message(self) -> str | None:
        """A sentence naming the dropped torn line, or None."""
        if self.torn_line is None:
            return None
        return (
            f"{self.path}:{self.torn_line}: torn last line dropped (a process was killed while appending it; "
            "the record it held is lost)"
        )


def read_jsonl_lines(path: Path) -> JsonlRecords:
    """Every record of a JSON-lines log, verified, with its line number.

    A last line that is not valid JSON and has no newline after it is what a writer killed
    mid-append leaves: it is dropped with a :class:`TornLineWarning` naming the file and
    line. A missing file reads as no records.

    Records without a checksum (written before records had one) are read unverified when
    no record of the file has one: a log is written whole by one multirun version, as a
    resume rewrites it (:func:`truncate_jsonl`).

    Raises:
        CorruptionError: naming the file and line: a line that is not valid JSON anywhere
            else (or ending in a newline), a record that fails its checksum, or one without
            a checksum in a file whose other records have one.
    """
    if not path.exists():
        return JsonlRecords(path, [])
    data = path.read_bytes()
    raw_lines = data.split(b"\n")
    complete = raw_lines[-1] == b""  # the file ends with a newline: no line is torn
    if complete:
        raw_lines.pop()
    last = max((i for i, raw in enumerate(raw_lines, start=1) if raw.strip()), default=0)
    out: list[tuple[int, Any]] = []
    checksummed = False
    unchecked: list[int] = []  # lines without a checksum
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            value = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if number == last and not complete:
                torn = JsonlRecords(path, out, torn_line=number)
                warnings.warn(str(torn.torn_message), TornLineWarning, stacklevel=2)
                return torn
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise CorruptionError(
                f"not valid JSON ({reason}) and not a torn last line: the file was damaged after it was written",
                file=path,
                line=number,
            ) from None
        if isinstance(value, dict) and CHECKSUM_FIELD in value:
            if not _checksum_ok(line.rstrip("\r"), value.pop(CHECKSUM_FIELD)):
                raise CorruptionError(
                    "the record does not match its checksum: the line changed after it was written",
                    file=path,
                    line=number,
                )
            checksummed = True
        elif _DAMAGED_FIELD.search(line):
            raise CorruptionError(
                f"the record ends like a checksum field whose name is not {CHECKSUM_FIELD!r}: the line changed "
                "after it was written",
                file=path,
                line=number,
            )
        else:
            unchecked.append(number)
        out.append((number, value))
        if checksummed and unchecked:
            # Logs are written whole by one multirun (a resume rewrites them): a record without
            # a checksum among records with one was changed, or appended by another program.
            raise CorruptionError(
                f"the record has no checksum ({CHECKSUM_FIELD}) although other records of the file have one: "
                "the line changed after it was written, or another program wrote it",
                file=path,
                line=unchecked[0],
            )
    return JsonlRecords(path, out)


def _drop_torn_tail(path: Path) -> None:
    """Cut a torn last line (no newline after it) off before appending after it, which would
    otherwise glue the next record to it and leave a damaged line in the middle of the log."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        end = size
        while end > 0:  # find the last newline, reading backwards a block at a time
            start = max(0, end - 65536)
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        warnings.warn(
            f"{path}: dropped a torn last line ({size - end} bytes, a process killed while appending it) "
            "before appending",
            TornLineWarning,
            stacklevel=3,
        )
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records durably, each with its checksum (:func:`jsonl_line`)."""
    lines = [jsonl_line(r) for r in records]
    if not lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records, verified and without their checksum field (see :func:`read_jsonl_lines`:
    a torn last line is dropped with a warning; damage anywhere is a CorruptionError).

    Raises:
        CorruptionError: as :func:`read_jsonl_lines`, or a line that is not a JSON object.
    """
    out = []
    for number, value in read_jsonl_lines(path).lines:
        if not isinstance(value, dict):
            raise CorruptionError("expected a JSON object", file=path, line=number)
        out.append(value)
    return out


def truncate_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Atomically keep only the complete records for which ``keep`` is true (a torn last
    line is dropped; every kept record is written with its checksum)."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if keep(r)]
    write_text_atomic(path, "".join(jsonl_line(r) for r in kept))


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
