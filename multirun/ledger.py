"""The provenance ledger: one Parquet row per injected span that was trained on.

Layout on disk::

    RUN_DIR/ledger/rank-00000/part-000000000000-000000000099.parquet
    RUN_DIR/ledger/rank-00001/part-000000000000-000000000099.parquet
    ...

Each rank writes only its own directory. Rows are buffered in memory as columnar
numpy chunks and written at checkpoints by :meth:`LedgerWriter.flush`; a flush is
atomic and durable (``*.parquet.tmp`` → fsync → ``os.replace`` → fsync of the
directory), so a process killed at any moment leaves only complete shards behind
(readers ignore ``*.tmp``). Every shard records an xxh64 of its own bytes in its
footer (key ``multirun.ledger.xxh64``), verified whenever it is read, so a changed
byte anywhere in it is a :class:`~multirun.errors.CorruptionError`, never a wrong
value. On resume from a checkpoint at batch ``k``,
:func:`truncate_ledger` removes every row with ``step >= k`` before training
repeats those steps. :class:`Ledger` reads all shards of all ranks back.

Example:
    >>> import tempfile, numpy as np
    >>> run = tempfile.mkdtemp()
    >>> w = LedgerWriter(run, rank=0, experiment_names=["canary"], item_ids=[["c0", "c1"]])
    >>> w.append(step=np.array([0, 0]), global_row=np.array([3, 5]), local_row=np.array([3, 5]),
    ...          sample_id=-1, offset=np.array([10, 0]), length=np.array([8, 8]),
    ...          experiment=np.array([0, 0]), item_index=np.array([1, 0]), sequence=np.array([1, 0]),
    ...          repetition=np.array([0, 0]), token_hash=np.array([token_hash([1, 2]), 7], dtype=np.uint64),
    ...          row_fingerprint=np.array([5, 6], dtype=np.uint64))
    >>> w.close()
    >>> led = Ledger.open(run)
    >>> len(led), led.exposures("canary")
    (2, {'c0': 1, 'c1': 1})
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import xxhash

from multirun.errors import CorruptionError, InputError, MultirunError
from multirun.run_dir import RunDir, atomic_path, fsync_dir

__all__ = [
    "ARMS",
    "FORMAT_VERSION",
    "REMOVALS",
    "SCHEMA",
    "Ledger",
    "LedgerIntegrityError",
    "LedgerWriter",
    "UncheckedShardWarning",
    "token_hash",
    "truncate_ledger",
    "verify_ledger",
    "verify_shard",
]

# 2: row_fingerprint, the overwritten row's content; 3: the xxh64 of the shard's bytes
FORMAT_VERSION = 3
_FIRST_CHECKSUMMED_VERSION = 3
_OLDEST_READABLE_VERSION = 2  # same columns as 3, without the checksum: read unverified, with a warning
ARMS: tuple[str, str] = ("treated", "control")
#: The removals ledger's folder inside the ledger directory (``ledger/removals/rank-NNNNN/``):
#: rows of the same format, one per span a ``removal`` experiment overwrote (docs/ledger.md).
REMOVALS = "removals"

_META_VERSION = b"multirun.ledger.format_version"
_META_EXPERIMENTS = b"multirun.ledger.experiments"
# The shard's xxh64, as 16 hex digits, in the Parquet footer's key-value metadata: the hash
# of the whole file as written with these 16 digits reading "0" (they cannot hash themselves).
_META_CHECKSUM = b"multirun.ledger.xxh64"
_CHECKSUM_PLACEHOLDER = b"0" * 16

_DICT = pa.dictionary(pa.int32(), pa.string())
_FIELDS: list[tuple[str, pa.DataType]] = [
    ("step", pa.int64()),
    ("rank", pa.int32()),
    ("global_row", pa.int32()),
    ("local_row", pa.int32()),
    ("sample_id", pa.int64()),
    ("offset", pa.int32()),
    ("length", pa.int32()),
    ("experiment", _DICT),
    ("item", _DICT),
    ("item_index", pa.int32()),
    ("sequence", pa.int32()),
    ("repetition", pa.int32()),
    ("arm", _DICT),
    ("token_hash", pa.uint64()),
    ("row_fingerprint", pa.uint64()),
]
#: Arrow schema of a ledger shard (without its metadata).
SCHEMA = pa.schema(_FIELDS)
_DICT_COLUMNS = ("experiment", "item", "arm")
_SORT_KEYS = [("step", "ascending"), ("global_row", "ascending"), ("offset", "ascending")]

# Numeric columns taken by ``LedgerWriter.append`` (name -> dtype on disk). ``experiment``
# is the experiment index here; it becomes the dictionary-encoded name on flush.
_APPEND_INT_COLUMNS: dict[str, type[np.signedinteger[Any]]] = {
    "step": np.int64,
    "global_row": np.int32,
    "local_row": np.int32,
    "sample_id": np.int64,
    "offset": np.int32,
    "length": np.int32,
    "experiment": np.int32,
    "item_index": np.int32,
    "sequence": np.int32,
    "repetition": np.int32,
}
_BUFFER_COLUMNS = (*_APPEND_INT_COLUMNS, "token_hash", "row_fingerprint", "arm")

# Sorted/small integer columns compress far better delta-encoded than plain+zstd;
# the hashes are random by construction, so plain is the only sensible choice.
_DELTA_COLUMNS = (
    "step",
    "rank",
    "global_row",
    "local_row",
    "sample_id",
    "offset",
    "length",
    "item_index",
    "sequence",
    "repetition",
)
_WRITE_OPTIONS: dict[str, Any] = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=list(_DICT_COLUMNS),
    column_encoding=dict.fromkeys(_DELTA_COLUMNS, "DELTA_BINARY_PACKED")
    | {"token_hash": "PLAIN", "row_fingerprint": "PLAIN"},
    write_statistics=True,
)

_SHARD_RE = re.compile(r"^part-(\d+)-(\d+)(?:\.(\d+))?\.parquet$")


class LedgerIntegrityError(MultirunError):
    """The ledger holds duplicate or overlapping spans."""


class UncheckedShardWarning(UserWarning):
    """A shard written before shards carried a checksum (format version 2) was read unverified."""


def token_hash(tokens: np.ndarray | Sequence[int]) -> int:
    """Fingerprint of a span's tokens: xxh64 (seed 0) of their int32 bytes.

    Every module that records or checks a span uses this one definition, so a
    span reconstructed from a training batch can be matched against the ledger.

    Example:
        >>> token_hash([1, 2, 3]) == token_hash(np.array([1, 2, 3], dtype=np.int64))
        True
    """
    return xxhash.xxh64_intdigest(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())


def _shard_metadata(experiments: Sequence[str]) -> dict[bytes, bytes]:
    return {
        _META_VERSION: str(FORMAT_VERSION).encode(),
        _META_EXPERIMENTS: json.dumps(list(experiments)).encode(),
    }


def _write_shard_atomic(table: pa.Table, final: Path) -> None:
    """Write ``table`` to ``final`` so that ``final`` is either absent or complete, with
    its checksum in the footer (see :func:`_verified_shard_bytes`).

    The file is built in memory, hashed with the checksum's 16 digits reading ``0``, and
    written with the digits filled in: one write, so shard and checksum are one atomic unit.
    """
    meta = dict(table.schema.metadata or {})
    meta[_META_VERSION] = str(FORMAT_VERSION).encode()  # a rewritten older shard is now checksummed
    meta.pop(_META_CHECKSUM, None)
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, **_WRITE_OPTIONS) as writer:
        writer.write_table(table)
        # Footer only (not in the ARROW:schema copy of the metadata): readers never see it in table.schema.
        writer.add_key_value_metadata({_META_CHECKSUM: _CHECKSUM_PLACEHOLDER})
    data = memoryview(sink.getvalue())
    at = _checksum_offset(data)
    if at is None:  # pragma: no cover - pyarrow wrote the footer in an unexpected form
        raise RuntimeError(f"could not place the ledger shard checksum in {final}")
    digest = xxhash.xxh64_hexdigest(data).encode()
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        f.write(data[:at])
        f.write(digest)
        f.write(data[at + len(_CHECKSUM_PLACEHOLDER) :])


def _footer(data: memoryview) -> tuple[int, int] | None:
    """(start, end) of a Parquet file's footer metadata, or None if the file has no valid tail."""
    if len(data) < 12 or bytes(data[:4]) != b"PAR1" or bytes(data[-4:]) != b"PAR1":
        return None
    length = int.from_bytes(data[-8:-4], "little")
    end = len(data) - 8
    return (end - length, end) if end - length >= 4 else None


def _checksum_offset(data: memoryview) -> int | None:
    """Offset of the checksum's 16 digits in a shard's bytes, None when it has none.

    In the footer (Thrift compact encoding), the key is followed by a field header and
    the value's length (16), then the digits.
    """
    footer = _footer(data)
    if footer is None:
        return None
    start, end = footer
    region = bytes(data[start:end])
    key_at = region.find(_META_CHECKSUM)
    if key_at < 0 or region.find(_META_CHECKSUM, key_at + 1) >= 0:
        return None
    value_at = key_at + len(_META_CHECKSUM) + 2
    if region[value_at - 1] != len(_CHECKSUM_PLACEHOLDER) or value_at + len(_CHECKSUM_PLACEHOLDER) > len(region):
        return None
    return start + value_at


def _verified_shard_bytes(path: Path) -> pa.Buffer:
    """A shard's bytes, checked against the checksum in its footer.

    Raises:
        CorruptionError: the file's bytes do not hash to the checksum it records, its
            Parquet tail is broken, or a shard of format version 3 or later records none.
        InputError: not a multirun ledger shard, or a format version this multirun cannot read.
    """
    try:
        data = memoryview(path.read_bytes())
    except OSError as exc:
        raise InputError(f"unreadable ledger shard: {exc}", file=path) from exc
    at = _checksum_offset(data)
    if at is not None:
        recorded = bytes(data[at : at + len(_CHECKSUM_PLACEHOLDER)])
        h = xxhash.xxh64(data[:at])
        h.update(_CHECKSUM_PLACEHOLDER)
        h.update(data[at + len(_CHECKSUM_PLACEHOLDER) :])
        if h.hexdigest().encode() != recorded:
            raise CorruptionError(
                f"corrupt ledger shard: its bytes hash to xxh64 {h.hexdigest()} but it was written with "
                f"{recorded.decode('ascii', 'replace')!r}: the file changed after it was written (disk or copy "
                "error, or an edit); restore it from a copy, or truncate the ledger before it and train those "
                "steps again",
                file=path,
            )
    buf = pa.py_buffer(data)
    if _footer(data) is None:
        raise CorruptionError("unreadable ledger shard (corrupt or not Parquet): no Parquet footer", file=path)
    try:
        schema = pq.read_schema(pa.BufferReader(buf))
    except (OSError, pa.ArrowException) as exc:
        raise CorruptionError(f"unreadable ledger shard (corrupt or not Parquet): {exc}", file=path) from exc
    version = _check_version(schema, path)
    if at is None:
        if version >= _FIRST_CHECKSUMMED_VERSION:
            raise CorruptionError(
                f"corrupt ledger shard: format version {version} records an xxh64 of its bytes, and its "
                "footer holds none (the file changed after it was written)",
                file=path,
            )
        warnings.warn(
            f"{path}: ledger shard of format version {version} (written before shards carried a checksum) "
            "read unverified",
            UncheckedShardWarning,
            stacklevel=3,
        )
    return buf


def _read_shard(path: Path) -> pa.Table:
    """A verified shard's rows (see :func:`_verified_shard_bytes`), its schema checked."""
    buf = _verified_shard_bytes(path)
    try:
        table = pq.read_table(pa.BufferReader(buf))
    except (OSError, pa.ArrowException) as exc:
        raise CorruptionError(f"unreadable ledger shard (corrupt or not Parquet): {exc}", file=path) from exc
    if not table.schema.remove_metadata().equals(SCHEMA):
        raise InputError(f"ledger shard schema differs from the expected one: {table.schema}", file=path)
    return table


def verify_shard(path: str | Path) -> None:
    """Check one shard's bytes against the checksum in its footer (what every reader does first).

    Raises:
        CorruptionError: naming the shard, when any of its bytes changed since it was written.
        InputError: not a ledger shard, or of a format version this multirun cannot read.
    """
    _verified_shard_bytes(Path(path))


def verify_ledger(run_dir: str | Path) -> list[Path]:
    """Check every committed shard's bytes against its checksum (:func:`verify_shard`);
    returns the shards checked.

    Raises:
        CorruptionError: naming the first shard whose bytes changed since it was written.
    """
    paths = _shard_paths(_ledger_root(Path(run_dir)))
    for path in paths:
        _verified_shard_bytes(path)
    return paths


def _free_shard_path(directory: Path, first_step: int, last_step: int, avoid: Path | None = None) -> Path:
    """``part-{first}-{last}.parquet``, or ``part-{first}-{last}.{n}.parquet`` if taken.

    A name collision means two flushes covered the same steps (e.g. a flush in the
    middle of a step); a suffix keeps both instead of silently replacing rows.
    """
    base = f"part-{first_step:012d}-{last_step:012d}"
    path = directory / f"{base}.parquet"
    n = 0
    while path.exists() and path != avoid:
        n += 1
        path = directory / f"{base}.{n}.parquet"
    return path


def _ledger_root(run_dir: Path) -> Path:
    """``run_dir/ledger``, or ``run_dir`` itself when it is a ledger directory."""
    root = RunDir(run_dir).ledger
    if not root.is_dir() and any(run_dir.glob("rank-*")):
        root = run_dir
    if not root.is_dir():
        raise InputError("no ledger directory (was this run started with multirun?)", file=root)
    return root


def _shard_paths(root: Path) -> list[Path]:
    """All committed shards under ``root`` (``*.tmp`` leftovers are not shards)."""
    return sorted(p for p in root.glob("rank-*/*.parquet") if p.is_file())


def _step_range(pf: pq.ParquetFile) -> tuple[int, int] | None:
    """(min, max) step of a shard from its row-group statistics; None if empty."""
    md = pf.metadata
    if md.num_rows == 0:
        return None
    col = pf.schema_arrow.get_field_index("step")
    lo: int | None = None
    hi: int | None = None
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        if rg.num_rows == 0:
            continue
        stats = rg.column(col).statistics
        if stats is None or not stats.has_min_max:
            # Statistics are always written by LedgerWriter; fall back for foreign files.
            steps = pf.read(columns=["step"]).column("step")
            return int(pc.min(steps).as_py()), int(pc.max(steps).as_py())
        lo = int(stats.min) if lo is None else min(lo, int(stats.min))
        hi = int(stats.max) if hi is None else max(hi, int(stats.max))
    return None if lo is None else (lo, hi)  # type: ignore[return-value]


def _check_version(schema: pa.Schema, path: Path) -> int:
    """The shard's format version; InputError if this multirun cannot read it."""
    meta = schema.metadata or {}
    raw = meta.get(_META_VERSION)
    if raw is None:
        raise InputError("not a multirun ledger shard (no format version in its metadata)", file=path)
    try:
        version = int(raw)
    except ValueError:
        raise CorruptionError(f"corrupt ledger shard: format version {raw!r} is not a number", file=path) from None
    if version > FORMAT_VERSION:
        raise InputError(
            f"ledger format version {version} is newer than this multirun understands ({FORMAT_VERSION})",
            file=path,
        )
    if version < _OLDEST_READABLE_VERSION:
        raise InputError(
            f"ledger format version {version} was written by an earlier multirun, before the overwritten rows' "
            f"fingerprints (version {_OLDEST_READABLE_VERSION}); read it with the multirun that wrote it",
            file=path,
        )
    return version


def _experiments_of(schema: pa.Schema) -> list[str]:
    raw = (schema.metadata or {}).get(_META_EXPERIMENTS)
    return list(json.loads(raw)) if raw else []


# --------------------------------------------------------------------------- writer


def _compact_dictionary(codes: np.ndarray, dictionary: np.ndarray) -> pa.DictionaryArray:
    """Dictionary array holding only the values ``codes`` uses.

    Parquet writes an Arrow dictionary verbatim, so passing the run's full item
    list (100k+ ids) would store it again in every shard. Linear time (no sort).
    """
    used = np.zeros(len(dictionary), dtype=bool)
    used[codes] = True
    remap = (np.cumsum(used, dtype=np.int32) - 1).astype(np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(remap[codes]), pa.array(dictionary[used], pa.string()))


class LedgerWriter:
    """Buffers one rank's span rows and writes them as atomic Parquet shards.

    Args:
        run_dir: the run directory; shards go to ``run_dir/ledger/rank-{rank:05d}/``.
        rank: this process's global rank.
        experiment_names: the run's experiments, in the order their indices refer to.
        item_ids: ``item_ids[e]`` is the item id list of experiment ``e``
            (``item_index`` in :meth:`append` indexes it).
        removals: write the removals ledger (``ledger/removals/rank-{rank:05d}/``) instead:
            the same format, one row per span a ``removal`` experiment overwrote.

    Usage: call :meth:`append` once per step with that step's spans (numpy arrays),
    :meth:`flush` at each checkpoint and :meth:`close` at the end. The writer is
    also a context manager (closing flushes).
    """

    def __init__(
        self,
        run_dir: str | Path,
        rank: int,
        experiment_names: Sequence[str],
        item_ids: Sequence[Sequence[str]],
        *,
        removals: bool = False,
    ) -> None:
        if len(experiment_names) != len(item_ids):
            raise ValueError(f"experiment_names has {len(experiment_names)} entries but item_ids has {len(item_ids)}")
        if len(set(experiment_names)) != len(experiment_names):
            raise ValueError(f"experiment names must be unique: {list(experiment_names)}")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.rank = int(rank)
        self.experiment_names = [str(n) for n in experiment_names]
        root = RunDir(run_dir).ledger
        self.directory = (root / REMOVALS if removals else root) / f"rank-{self.rank:05d}"
        self._make_dirs()

        self._n_items = np.array([len(ids) for ids in item_ids], dtype=np.int64)
        # Global item code of (e, i) = _item_lookup[_item_start[e] + i], into one
        # deduplicated dictionary of all ids, so flush is a pair of gathers.
        self._item_start = np.concatenate([[0], np.cumsum(self._n_items)[:-1]]).astype(np.int64)
        flat = np.array([str(i) for ids in item_ids for i in ids], dtype=object)
        if flat.size:
            uniq, inverse = np.unique(flat.astype(str), return_inverse=True)
            self._item_dictionary = uniq.astype(object)
            self._item_lookup = inverse.astype(np.int32).ravel()
        else:
            self._item_dictionary = np.empty(0, dtype=object)
            self._item_lookup = np.empty(0, dtype=np.int32)
        self._exp_dictionary = np.array(self.experiment_names, dtype=object)
        self._arm_dictionary = pa.array(list(ARMS), pa.string())
        self._metadata = _shard_metadata(self.experiment_names)

        self._chunks: list[tuple[np.ndarray, ...]] = []
        self._buffered = 0
        self._closed = False

    def _make_dirs(self) -> None:
        created = []
        parents = [self.directory.parent.parent, self.directory.parent, self.directory]
        if self.directory.parent.name == REMOVALS:
            parents.insert(0, self.directory.parent.parent.parent)
        for d in parents:
            if not d.exists():
                d.mkdir(parents=True, exist_ok=True)
                created.append(d)
        for d in created:  # make the new directory entries themselves durable
            fsync_dir(d.parent)
        # A *.tmp here is a flush that was killed before its rename: never a shard.
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)

    @property
    def buffered_rows(self) -> int:
        """Rows appended since the last flush."""
        return self._buffered

    def append(
        self,
        *,
        step: Any,
        global_row: Any,
        local_row: Any,
        sample_id: Any,
        offset: Any,
        length: Any,
        experiment: Any,
        item_index: Any,
        sequence: Any,
        repetition: Any,
        token_hash: Any,
        row_fingerprint: Any,
    ) -> None:
        """Buffer spans (vectorised: one call per step, no per-row Python work).

        All arguments are integer arrays of one common length; a scalar is
        broadcast (``step=t``, ``sample_id=-1`` when the dataset gives no ids).
        ``experiment`` is the experiment index, ``item_index`` the index into that
        experiment's ``item_ids``, ``token_hash`` uint64 (see :func:`token_hash`), and
        ``row_fingerprint`` the :func:`token_hash` of the whole original row the span overwrote.
        Every span is of a treated item (controls are never injected): ``arm`` is ``"treated"``.

        Arrays are copied, so callers may reuse their buffers.
        """
        if self._closed:
            raise RuntimeError("LedgerWriter.append after close()")
        values = dict(
            step=step,
            global_row=global_row,
            local_row=local_row,
            sample_id=sample_id,
            offset=offset,
            length=length,
            experiment=experiment,
            item_index=item_index,
            sequence=sequence,
            repetition=repetition,
        )
        arrays = {k: np.asarray(v) for k, v in values.items()}
        hashes = {"token_hash": np.asarray(token_hash), "row_fingerprint": np.asarray(row_fingerprint)}
        lengths = {k: a.shape[0] for k, a in (*arrays.items(), *hashes.items()) if a.ndim > 0}
        n = max(lengths.values()) if lengths else 1
        bad = {k: m for k, m in lengths.items() if m != n}
        if bad:
            raise ValueError(f"append: columns differ in length (expected {n}): {bad}")
        if any(a.ndim > 1 for a in (*arrays.values(), *hashes.values())):
            raise ValueError("append: every column must be 1-D or a scalar")
        if n == 0:
            return

        cols: dict[str, np.ndarray] = {}
        for name, dtype in _APPEND_INT_COLUMNS.items():
            a = arrays[name]
            if a.dtype.kind not in "iu":
                raise TypeError(f"append: column {name!r} must be integer, got dtype {a.dtype}")
            target = np.dtype(dtype).itemsize
            # Range-check only casts that could wrap silently (wider, or unsigned of equal width).
            if a.dtype.itemsize > target or (a.dtype.kind == "u" and a.dtype.itemsize >= target):
                info = np.iinfo(dtype)
                if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
                    raise ValueError(f"append: column {name!r} has values outside {np.dtype(dtype).name}")
            # Copy: the caller's arrays may be views of buffers it reuses.
            cols[name] = np.full(n, a, dtype=dtype) if a.ndim == 0 else a.astype(dtype, copy=True)
        for name, h in hashes.items():
            if h.dtype.kind not in "iu":
                raise TypeError(f"append: {name} must be an integer array (uint64), got dtype {h.dtype}")
            cols[name] = h.astype(np.uint64, copy=True) if h.ndim else np.full(n, h, dtype=np.uint64)
        cols["arm"] = np.zeros(n, dtype=np.int32)  # code of "treated" in ARMS
        self._validate(cols)
        self._chunks.append(tuple(cols[c] for c in _BUFFER_COLUMNS))
        self._buffered += n

    def _validate(self, cols: Mapping[str, np.ndarray]) -> None:
        exp, item = cols["experiment"], cols["item_index"]
        n_exp = len(self.experiment_names)
        if int(exp.min()) < 0 or int(exp.max()) >= n_exp:
            raise ValueError(f"append: experiment index out of range [0, {n_exp})")
        bad = (item < 0) | (item >= self._n_items[exp])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            e = int(exp[i])
            raise ValueError(
                f"append: item_index {int(item[i])} out of range for experiment "
                f"{self.experiment_names[e]!r} ({int(self._n_items[e])} items)"
            )
        if int(cols["length"].min()) <= 0:
            raise ValueError("append: span lengths must be positive")
        if int(cols["offset"].min()) < 0 or int(cols["step"].min()) < 0 or int(cols["global_row"].min()) < 0:
            raise ValueError("append: step, global_row and offset must be non-negative")

    def _build_table(self) -> pa.Table:
        c = {name: np.concatenate([chunk[i] for chunk in self._chunks]) for i, name in enumerate(_BUFFER_COLUMNS)}
        # Keep the concatenation: if the write fails, a retry doesn't redo it.
        self._chunks = [tuple(c[name] for name in _BUFFER_COLUMNS)]
        item_codes = self._item_lookup[self._item_start[c["experiment"]] + c["item_index"]]
        columns = {
            "step": c["step"],
            "rank": np.full(c["step"].shape[0], self.rank, dtype=np.int32),
            "global_row": c["global_row"],
            "local_row": c["local_row"],
            "sample_id": c["sample_id"],
            "offset": c["offset"],
            "length": c["length"],
            "experiment": _compact_dictionary(c["experiment"], self._exp_dictionary),
            "item": _compact_dictionary(item_codes, self._item_dictionary),
            "item_index": c["item_index"],
            "sequence": c["sequence"],
            "repetition": c["repetition"],
            "arm": pa.DictionaryArray.from_arrays(pa.array(c["arm"]), self._arm_dictionary),
            "token_hash": c["token_hash"],
            "row_fingerprint": c["row_fingerprint"],
        }
        arrays = [
            columns[f.name] if isinstance(columns[f.name], pa.Array) else pa.array(columns[f.name], f.type)
            for f in SCHEMA
        ]
        return pa.Table.from_arrays(arrays, schema=SCHEMA.with_metadata(self._metadata))

    def flush(self) -> int:
        """Write the buffered rows as one new shard; returns the rows written (0: no-op).

        Atomic and durable: when this returns, the shard survives a crash; if the
        process dies inside it, no partial shard is visible. On error the rows stay
        buffered, so a later flush can retry.
        """
        if self._buffered == 0:
            return 0
        table = self._build_table()
        steps = table.column("step")
        first, last = int(pc.min(steps).as_py()), int(pc.max(steps).as_py())
        _write_shard_atomic(table, _free_shard_path(self.directory, first, last))
        written = self._buffered
        self._chunks = []
        self._buffered = 0
        return written

    def close(self) -> None:
        """Flush what is buffered; further appends raise."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- truncate


def truncate_ledger(run_dir: str | Path, from_step: int, *, removals: bool = False) -> int:
    """Remove every row with ``step >= from_step`` from all ranks; returns rows removed.

    ``removals``: cut the removals ledger (``ledger/removals/``) instead.

    Call on rank 0 only, before a barrier, when resuming from a checkpoint whose
    ``timestamp.batch`` is ``from_step`` (those steps will be trained again). Shards
    entirely at/after ``from_step`` are deleted; a shard straddling it is rewritten
    atomically in place (rows < ``from_step`` kept) and then renamed to its new step
    range. Every step is atomic and the whole operation is idempotent, so a crash
    in the middle is repaired by calling it again. Leftover ``*.tmp`` files are
    removed. A run directory without a ledger yields 0.

    Raises:
        CorruptionError: a shard whose bytes do not match its checksum (then no shard is touched).
    """
    if from_step < 0:
        raise ValueError(f"from_step must be >= 0, got {from_step}")
    root = RunDir(run_dir).ledger
    if removals:
        root = root / REMOVALS
    if not root.is_dir():
        return 0
    removed = 0
    touched: set[Path] = set()
    for tmp in root.glob("rank-*/*.tmp"):
        tmp.unlink(missing_ok=True)
        touched.add(tmp.parent)
    paths = _shard_paths(root)
    # Every shard is verified before any is touched: a corrupt shard must neither steer what
    # is deleted (its step statistics) nor be rewritten under a fresh, valid checksum, and a
    # refusal leaves the ledger as it was. (A resume reads the ledger once more for this.)
    for path in paths:
        _verified_shard_bytes(path)
    for path in paths:
        buf = _verified_shard_bytes(path)
        try:
            pf = pq.ParquetFile(pa.BufferReader(buf))
            rng = _step_range(pf)
        except (OSError, pa.ArrowException) as exc:
            raise CorruptionError(f"unreadable ledger shard (corrupt or not Parquet): {exc}", file=path) from exc
        if rng is None or rng[1] < from_step:
            continue
        if rng[0] >= from_step:
            removed += pf.metadata.num_rows
            path.unlink()
            touched.add(path.parent)
            continue
        table = _read_shard(path)
        kept = table.filter(pc.less(table.column("step"), pa.scalar(from_step, pa.int64())))
        removed += table.num_rows - kept.num_rows
        # Rewrite under the same name first (atomic), then rename: at every instant
        # exactly one file holds these rows, so a crash can't duplicate or lose them.
        _write_shard_atomic(kept, path)
        new_path = _free_shard_path(path.parent, rng[0], int(pc.max(kept.column("step")).as_py()), avoid=path)
        if new_path != path:
            os.rename(path, new_path)
            fsync_dir(path.parent)
    for d in touched:
        fsync_dir(d)
    return removed


# --------------------------------------------------------------------------- reader

ExportFormat = Literal["parquet", "csv", "jsonl"]
_SUFFIX_FORMATS: dict[str, ExportFormat] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


def _empty_table() -> pa.Table:
    arrays = []
    for f in SCHEMA:
        if f.name in _DICT_COLUMNS:
            arrays.append(pa.DictionaryArray.from_arrays(pa.array([], pa.int32()), pa.array([], pa.string())))
        else:
            arrays.append(pa.array([], f.type))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _decoded(table: pa.Table) -> pa.Table:
    """Dictionary columns as plain strings (for CSV/JSON writers)."""
    for name in _DICT_COLUMNS:
        i = table.schema.get_field_index(name)
        table = table.set_column(i, pa.field(name, pa.string()), table.column(name).cast(pa.string()))
    return table


class Ledger:
    """All ranks' ledger rows of one run, read back into memory.

    ``table`` is sorted by ``(step, global_row, offset)``; its ``experiment``,
    ``item`` and ``arm`` columns share one dictionary each.

    Example::

        led = Ledger.open("runs/demo")
        led.query(experiment="canary", steps=(0, 100))
        led.summary(total_training_tokens=10_000_000)
    """

    def __init__(
        self,
        table: pa.Table,
        experiments: Sequence[str] = (),
        *,
        ranks: Sequence[int] = (),
        arms: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    ) -> None:
        self._np: dict[str, np.ndarray] = {}
        self._dicts: dict[str, list[str]] = {}
        table = table.replace_schema_metadata(None)
        if table.num_rows:
            table = table.unify_dictionaries().combine_chunks()
            table = table.sort_by(_SORT_KEYS).combine_chunks()
        self.table: pa.Table = table.replace_schema_metadata(_shard_metadata(list(experiments)))
        names = list(experiments)
        for n in self._dictionary("experiment"):
            if n not in names:
                names.append(n)
        #: experiments known to the ledger (from shard metadata), spans or not.
        self.experiments: list[str] = names
        #: ranks that wrote a ledger directory (spans or not), and those found in the rows.
        self.ranks: list[int] = sorted(set(ranks) | {int(r) for r in np.unique(self._col("rank"))})
        #: the run's arms (``arms.json``: experiment -> treated/control item ids), when known:
        #: controls are never injected, yet querying one is not a typo.
        self.arms: dict[str, dict[str, list[str]]] = {
            str(e): {str(arm): [str(i) for i in ids] for arm, ids in a.items()} for e, a in (arms or {}).items()
        }
        #: the shard files the rows were read from (:meth:`open`); :meth:`check_integrity` re-verifies them.
        self.shards: list[Path] = []

    @classmethod
    def open(cls, run_dir: str | Path) -> Ledger:
        """Read every committed shard under ``run_dir/ledger`` (``run_dir`` may also
        be the ledger directory itself). ``*.tmp`` files are ignored.

        Every shard is verified against its checksum before its rows are used; shards of
        format version 2 (before checksums) are read unverified with an
        :class:`UncheckedShardWarning`.

        Raises:
            CorruptionError: a shard whose bytes changed since it was written (naming it).
            InputError: no ledger directory, or a shard of another format.
        """
        root = _ledger_root(Path(run_dir))
        return cls._open_root(root, arms_path=root.parent / RunDir(".").arms.name)

    @classmethod
    def open_removals(cls, run_dir: str | Path) -> Ledger:
        """The removals ledger (``run_dir/ledger/removals``): one row per span a ``removal``
        experiment overwrote, in the ledger's format (docs/ledger.md, "Removals"); empty
        for a run without removals. Verified as :meth:`open` verifies the ledger."""
        root = _ledger_root(Path(run_dir))
        removals = root / REMOVALS
        if not removals.is_dir():
            return cls(_empty_table())
        return cls._open_root(removals, arms_path=root.parent / RunDir(".").arms.name)

    @classmethod
    def _open_root(cls, root: Path, *, arms_path: Path) -> Ledger:
        tables: list[pa.Table] = []
        experiments: list[str] = []
        paths = _shard_paths(root)
        for path in paths:
            t = _read_shard(path)
            for n in _experiments_of(t.schema):
                if n not in experiments:
                    experiments.append(n)
            tables.append(t.replace_schema_metadata(None))
        table = pa.concat_tables(tables) if tables else _empty_table()
        ranks = [int(d.name[5:]) for d in root.glob("rank-*") if d.is_dir() and d.name[5:].isdigit()]
        led = cls(table, experiments, ranks=ranks, arms=_read_arms(arms_path))
        led.shards = paths
        return led

    def __len__(self) -> int:
        return self.table.num_rows

    def __repr__(self) -> str:
        return f"Ledger({len(self)} spans, experiments={self.experiments})"

    # -- cached numpy views (the table is immutable after construction)
    def _col(self, name: str) -> np.ndarray:
        if name not in self._np:
            col = self.table.column(name)
            if name in _DICT_COLUMNS:
                arr = col.combine_chunks().indices if col.num_chunks else pa.array([], pa.int32())
                self._np[name] = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.int64)
            else:
                self._np[name] = col.to_numpy()
        return self._np[name]

    def _dictionary(self, name: str) -> list[str]:
        if name not in self._dicts:
            col = self.table.column(name)
            self._dicts[name] = col.chunk(0).dictionary.to_pylist() if col.num_chunks else []
        return self._dicts[name]

    def _code(self, column: str, value: str) -> int:
        try:
            return self._dictionary(column).index(value)
        except ValueError:
            return -1

    def _mask(
        self,
        experiment: str | None = None,
        item: str | None = None,
        steps: tuple[int, int] | None = None,
        rank: int | None = None,
    ) -> np.ndarray:
        mask = np.ones(len(self), dtype=bool)
        if experiment is not None:
            mask &= self._col("experiment") == self._code("experiment", experiment)
        if item is not None:
            mask &= self._col("item") == self._code("item", item)
        if steps is not None:
            lo, hi = steps
            step = self._col("step")
            mask &= (step >= lo) & (step < hi)
        if rank is not None:
            mask &= self._col("rank") == rank
        return mask

    def query(
        self,
        *,
        experiment: str | None = None,
        item: str | None = None,
        steps: tuple[int, int] | None = None,
        rank: int | None = None,
    ) -> pa.Table:
        """Rows matching every given filter (``steps`` is half-open ``[a, b)``).

        ``item`` alone matches that id in any experiment. A filter that cannot match
        by construction is an error rather than zero rows, so a typo is never read as
        "never injected".

        Raises:
            InputError: an experiment, item or rank the run does not have (the message
                lists those that exist), or a step range ``[a, b)`` with ``b <= a`` or
                ``a < 0`` (key ``--experiment``, ``--item``, ``--rank`` or ``--steps``).
        """
        self._check_filters(experiment, item, steps, rank)
        return self.table.filter(pa.array(self._mask(experiment, item, steps, rank)))

    def known_items(self, experiment: str | None = None) -> list[str]:
        """Item ids of ``experiment`` (every experiment when None): the run's arms, treated
        and control, when ``arms.json`` was found, plus every id in the rows."""
        names = self.experiments if experiment is None else [experiment]
        out = dict.fromkeys(i for n in names for ids in self.arms.get(n, {}).values() for i in ids)
        if len(self):
            items = self._dictionary("item")
            codes = self._col("item")[self._mask(experiment=experiment)]
            out |= dict.fromkeys(items[int(c)] for c in np.unique(codes))
        return list(out)

    def _check_filters(
        self, experiment: str | None, item: str | None, steps: tuple[int, int] | None, rank: int | None
    ) -> None:
        if experiment is not None and experiment not in self.experiments:
            raise InputError(
                f"unknown experiment {experiment!r}; the ledger has {_listing(self.experiments)}", key="--experiment"
            )
        if item is not None and item not in (known := self.known_items(experiment)):
            where = f"experiment {experiment!r}" if experiment is not None else "the run"
            raise InputError(f"unknown item {item!r}; {where} has {_listing(known)}", key="--item")
        if rank is not None and rank not in self.ranks:
            raise InputError(f"unknown rank {rank}; the ledger has ranks {_listing(self.ranks)}", key="--rank")
        if steps is not None:
            lo, hi = steps
            problem = "starts below 0" if lo < 0 else "is reversed" if hi < lo else "is empty" if hi == lo else ""
            if problem:
                raise InputError(
                    f"the step range [{lo}, {hi}) {problem}: give A:B with 0 <= A < B (half-open)", key="--steps"
                )

    def summary(self, total_training_tokens: int | None = None) -> list[dict]:
        """Per experiment: spans, tokens, share of training tokens, exposure figures.

        ``exposures_per_item`` (min/mean/max spans per item) is over the items that
        were exposed at least once; the ledger does not know unexposed items.
        Experiments known from the shards' metadata but without spans are listed
        with zero counts.
        """
        out = []
        exp_codes = self._col("experiment") if len(self) else np.empty(0, np.int64)
        dictionary = self._dictionary("experiment")
        for name in self.experiments:
            code = dictionary.index(name) if name in dictionary else -1
            mask = exp_codes == code
            n = int(mask.sum())
            row: dict[str, Any] = {"experiment": name, "spans": n}
            if n == 0:
                row |= {
                    "tokens": 0,
                    "share_of_training_tokens": 0.0 if total_training_tokens else None,
                    "items_exposed": 0,
                    "exposures_per_item": None,
                    "first_step": None,
                    "last_step": None,
                }
                out.append(row)
                continue
            tokens = int(self._col("length")[mask].sum(dtype=np.int64))
            counts = np.bincount(self._col("item_index")[mask])
            counts = counts[counts > 0]
            steps = self._col("step")[mask]
            row |= {
                "tokens": tokens,
                "share_of_training_tokens": tokens / total_training_tokens if total_training_tokens else None,
                "items_exposed": int(counts.size),
                "exposures_per_item": {
                    "min": int(counts.min()),
                    "mean": float(counts.mean()),
                    "max": int(counts.max()),
                },
                "first_step": int(steps.min()),
                "last_step": int(steps.max()),
            }
            out.append(row)
        return out

    def exposures(self, experiment: str) -> dict[str, int]:
        """Item id -> number of spans of that item in ``experiment`` (exposed items only).

        Raises KeyError for an experiment the ledger has never heard of.
        """
        if experiment not in self.experiments:
            raise KeyError(f"unknown experiment {experiment!r}; the ledger has {self.experiments}")
        mask = self._mask(experiment=experiment)
        items = self._dictionary("item")
        counts = np.bincount(self._col("item")[mask], minlength=len(items))
        return {items[i]: int(counts[i]) for i in np.flatnonzero(counts)}

    def export(self, path: str | Path, format: ExportFormat | None = None) -> Path:
        """Write the whole ledger as Parquet, CSV or JSON lines (see :func:`export_table`)."""
        return export_table(self.table, path, format)

    def check_integrity(self) -> None:
        """Raise :class:`LedgerIntegrityError` on duplicate ``(step, global_row, offset)``
        rows or on spans of one row that overlap, and :class:`~multirun.errors.CorruptionError`
        if a shard the rows were read from (:meth:`open`) no longer matches its checksum."""
        for path in self.shards:
            _verified_shard_bytes(path)
        n = len(self)
        if n < 2:
            return
        step, row = self._col("step"), self._col("global_row")
        off, length = self._col("offset").astype(np.int64), self._col("length").astype(np.int64)
        same_row = (step[1:] == step[:-1]) & (row[1:] == row[:-1])  # table is sorted
        dup = same_row & (off[1:] == off[:-1])
        overlap = same_row & ~dup & (off[:-1] + length[:-1] > off[1:])
        problems = []
        for label, flags in (("duplicate", dup), ("overlapping", overlap)):
            idx = np.flatnonzero(flags)
            if idx.size:
                ex = ", ".join(
                    f"(step={int(step[i + 1])}, global_row={int(row[i + 1])}, offsets {int(off[i])}+{int(length[i])} "
                    f"and {int(off[i + 1])})"
                    for i in idx[:3]
                )
                problems.append(f"{idx.size} {label} span(s), e.g. {ex}")
        if problems:
            raise LedgerIntegrityError("; ".join(problems))


_LISTED = 20  # names an error message lists before "... and N more"


def _listing(values: Sequence[Any]) -> str:
    """``a, b, c`` (at most :data:`_LISTED`, then how many more), or ``none``."""
    if not values:
        return "none"
    shown = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values[:_LISTED])
    return shown + (f" ... and {len(values) - _LISTED} more" if len(values) > _LISTED else "")


def _read_arms(path: Path) -> dict[str, dict[str, list[str]]] | None:
    """``arms.json`` beside the ledger, or None when absent or unreadable (the rows still work)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    return {
        str(name): {str(arm): [str(i) for i in ids] for arm, ids in arms.items() if isinstance(ids, list)}
        for name, arms in doc.items()
        if isinstance(arms, dict)
    }


def export_table(table: pa.Table, path: str | Path, format: ExportFormat | None = None) -> Path:
    """Write ledger rows (e.g. a :meth:`Ledger.query` result) as Parquet, CSV or JSON lines.

    The format is inferred from the suffix when not given. Dictionary columns become
    plain strings in CSV/JSONL; ``token_hash`` stays an unsigned 64-bit integer.
    """
    path = Path(path)
    if format is None:
        format = _SUFFIX_FORMATS.get(path.suffix.lower())
        if format is None:
            raise InputError(f"cannot infer export format from {path.name!r}; use .parquet, .csv or .jsonl", file=path)
    if format not in ("parquet", "csv", "jsonl"):
        raise InputError(f"unknown export format {format!r}", file=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "parquet":
        _write_shard_atomic(table, path)
    elif format == "csv":
        pacsv.write_csv(_decoded(table), path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for batch in _decoded(table).to_batches(max_chunksize=65536):
                f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in batch.to_pylist())
    return path
