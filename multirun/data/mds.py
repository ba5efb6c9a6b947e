"""Training data: text -> fixed-length token rows in MDS, and a dataloader that keeps row identity.

The pretraining stream is a MosaicML Streaming (MDS) dataset with one column,
``tokens`` (``ndarray:int32``), one fixed-length sequence per sample. Beside its
``index.json`` lies ``multirun_dataset.json``, which records how the rows were made
(sequence length, tokenizer name and fingerprint, sources fingerprint) and is
written last, so its presence marks a complete dataset.

:class:`IdStreamingDataset` adds the global sample index to every sample so that
the callback knows which stored row each batch row is (docs/architecture.md, invariant 3).

Example::

    from multirun.data.tokenizers import ByteTokenizer
    info = prepare_dataset(["notes/"], "data/mds", ByteTokenizer(), 128)
    loader = build_dataloader(info.path, batch_size=8)
    next(iter(loader))["sample_id"].shape   # torch.Size([8])
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from streaming import MDSWriter, StreamingDataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from multirun.data.tokenizers import Tokenizer
from multirun.errors import InputError

INFO_FILE = "multirun_dataset.json"
HELDOUT_DIR = "heldout"  # the held-out split of `prepare --heldout-fraction`, inside the dataset
FORMAT_VERSION = 1
TOKENS_COLUMN = "tokens"
_COLUMNS = {TOKENS_COLUMN: "ndarray:int32"}

# Directories of the standard library that are not used for the demo corpus: installed
# third-party code, the (huge, partly non-UTF-8) test suites, and IDLE.
_DEMO_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
# Temporary build directories older than this are leftovers of crashed builds.
_STALE_BUILD_SECONDS = 24 * 3600


@dataclass
class PreparedDataset:
    """A token dataset written by :func:`prepare_dataset`.

    Attributes:
        path: the dataset directory (holds ``index.json`` and ``multirun_dataset.json``).
        num_samples: number of rows.
        sequence_length: tokens per row.
        tokenizer: the tokenizer's ``name``.
        fingerprint: xxh64 of the sequence length and every row's tokens, in order:
            equal fingerprints mean the model sees identical data.
        metadata: the full content of ``multirun_dataset.json``.
    """

    path: Path
    num_samples: int
    sequence_length: int
    tokenizer: str
    fingerprint: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def tokenizer_fingerprint(self) -> str:
        """Fingerprint of the tokenizer that produced the rows."""
        return str(self.metadata.get("tokenizer_fingerprint", ""))

    @property
    def heldout_path(self) -> Path | None:
        """The held-out split written beside the rows (``prepare --heldout-fraction``), or None.

        Recorded relative to the dataset (``heldout``: ``{"path": "heldout", ...}``), so the
        dataset can move as a whole.
        """
        heldout = self.metadata.get("heldout")
        if not isinstance(heldout, dict) or not isinstance(heldout.get("path"), str):
            return None
        return self.path / heldout["path"]


# --------------------------------------------------------------------------- preparation


def _collect_files(sources: Iterable[str | os.PathLike[str]], suffixes: Sequence[str] | None) -> list[tuple[Path, str]]:
    """Source files in order, each with the name used in the sources fingerprint.

    Files named directly are always taken; directories are walked recursively in
    sorted order, keeping files whose suffix is in ``suffixes`` (all when ``None``).
    Names are relative to the directory given, so the same tree at another
    location fingerprints the same.
    """
    wanted = None if suffixes is None else {s if s.startswith(".") else f".{s}" for s in suffixes}
    out: list[tuple[Path, str]] = []
    for src in sources:
        root = Path(src).expanduser()
        if root.is_file():
            out.append((root, root.name))
        elif root.is_dir():
            found: list[tuple[tuple[str, ...], Path]] = []
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in filenames:
                    p = Path(dirpath, name)
                    if (wanted is None or p.suffix in wanted) and p.is_file():
                        found.append((p.relative_to(root).parts, p))
            # Sort on path parts (not os.walk's order) so the order is a pure function of the names.
            out.extend((p, "/".join(parts)) for parts, p in sorted(found))
        else:
            raise InputError("source does not exist", file=root, key="sources")
    return out


class _RowSink:
    """Cuts a token stream into rows of ``length`` and writes each full row to MDS."""

    def __init__(self, writer: MDSWriter, length: int) -> None:
        self.writer = writer
        self.length = length
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.num_rows = 0
        self.hash = xxhash.xxh64(f"multirun-mds/v{FORMAT_VERSION}/L={length}/".encode())

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_len += len(tokens)
        if self.pending_len < self.length:
            return
        stream = np.concatenate(self.pending)
        n = len(stream) // self.length
        rows = stream[: n * self.length].reshape(n, self.length)
        for row in rows:
            self.writer.write({TOKENS_COLUMN: row})
        # Fixed little-endian layout: the fingerprint must not depend on the machine.
        self.hash.update(rows.astype("<i4", copy=False).tobytes())
        self.num_rows += n
        rest = stream[n * self.length :]
        self.pending = [rest] if len(rest) else []
        self.pending_len = len(rest)


def prepare_dataset(
    sources: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    tokenizer: Tokenizer,
    sequence_length: int,
    *,
    max_bytes: int | None = None,
    compression: str | None = None,
    progress: bool = True,
    suffixes: Sequence[str] | None = None,
    skip_invalid: bool = False,
    size_limit: int | str | None = None,
    heldout_fraction: float = 0.0,
) -> PreparedDataset:
    """Tokenize text files into an MDS dataset of fixed-length rows.

    Each file is one document. Documents are tokenized, followed by EOS,
    concatenated in order and cut into rows of exactly ``sequence_length`` tokens;
    the incomplete tail is dropped. Empty files are skipped.

    With ``heldout_fraction`` F > 0, whole documents go to a held-out split: a document
    is held out when the xxh64 of its name (its path relative to the source directory
    given, as in the sources fingerprint) falls in the lowest F of the hash range, so the
    split depends on the names only (not on order, machine or the other files) and no
    held-out text is in the training rows. The split is a second dataset of the same
    format in ``out_dir/heldout`` (its own ``multirun_dataset.json``), recorded in the
    training dataset's info (``heldout``, :attr:`PreparedDataset.heldout_path`); a run
    config with ``data.source: mds`` and no ``data.heldout_path`` takes its held-out
    loss from it. ``max_bytes`` then bounds the training split, and the held-out split
    gets the proportional ``max_bytes * F / (1 - F)``.

    Args:
        sources: files and/or directories (walked recursively in sorted order).
        out_dir: output directory; must not exist or be empty.
        tokenizer: turns text into ids (see :mod:`multirun.tokenizers`).
        sequence_length: tokens per row.
        max_bytes: stop after this many bytes of source text; the document that
            crosses the budget is cut at a character boundary.
        compression: MDS shard compression (e.g. ``"zstd"``), ``None`` for none.
        progress: show a progress bar over files.
        suffixes: with directories, keep only files with these suffixes
            (``[".py", ".txt"]``); ``None`` keeps all files.
        skip_invalid: skip files that are not valid UTF-8 (counted and listed in
            ``multirun_dataset.json``) instead of failing.
        size_limit: MDS shard size limit in bytes (Streaming's default when ``None``).
        heldout_fraction: the share of documents held out, in ``[0, 1)``.

    Returns:
        The dataset's :class:`PreparedDataset` (the training split).

    Raises:
        InputError: a source is missing, unreadable or not UTF-8 (naming the file),
            ``out_dir`` is not empty, or the sources (or either split) yield less than one row.

    Example::

        prepare_dataset(["corpus/"], "mds/", ByteTokenizer(), 256, suffixes=[".txt"])
    """
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be positive, got {sequence_length}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    if not 0 <= heldout_fraction < 1:
        raise InputError(f"must be in [0, 1), got {heldout_fraction}", key="heldout_fraction")
    source_list = [str(s) for s in sources]
    files = _collect_files(source_list, suffixes)
    heldout_files = [f for f in files if is_heldout_document(f[1], heldout_fraction)]
    if heldout_fraction > 0:
        files = [f for f in files if not is_heldout_document(f[1], heldout_fraction)]
        if not heldout_files or not files:
            raise InputError(
                f"a held-out fraction of {heldout_fraction} puts {len(heldout_files)} of "
                f"{len(heldout_files) + len(files)} documents in the held-out split: documents are held out whole, "
                "so both splits need at least one (split the corpus into more files, or change the fraction)",
                key="heldout_fraction",
            )
    out = Path(out_dir).expanduser()
    created = not out.exists()
    if not created and (not out.is_dir() or any(out.iterdir())):
        raise InputError("output directory exists and is not empty; choose another or delete it", file=out)
    out.mkdir(parents=True, exist_ok=True)

    settings: dict[str, Any] = dict(
        compression=compression, progress=progress, suffixes=suffixes, skip_invalid=skip_invalid, size_limit=size_limit
    )
    try:
        info = _write_dataset(files, source_list, out, tokenizer, sequence_length, max_bytes=max_bytes, **settings)
        if heldout_files:
            # Written after the training shards (MDSWriter wants an empty folder), before the
            # training info that marks the whole dataset complete.
            budget = None if max_bytes is None else math.ceil(max_bytes * heldout_fraction / (1 - heldout_fraction))
            try:
                held = _write_dataset(
                    heldout_files,
                    source_list,
                    out / HELDOUT_DIR,
                    tokenizer,
                    sequence_length,
                    max_bytes=budget,
                    **settings,
                )
            except InputError as err:
                raise InputError(f"the held-out split: {err.message}", key="heldout_fraction") from err
            _write_info(out / HELDOUT_DIR, held | {"heldout_of": ".."})
            info["heldout"] = {
                "path": HELDOUT_DIR,
                "fraction": heldout_fraction,
                "rule": "xxh64(document name) / 2**64 < fraction",
                "num_documents": held["num_documents"],
                "num_samples": held["num_samples"],
                "fingerprint": held["fingerprint"],
            }
        _write_info(out, info)
        return _info_to_dataset(out, info)
    except BaseException:
        # Remove only what this call wrote: the directory was absent or empty before.
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


def _write_dataset(
    files: list[tuple[Path, str]],
    source_list: list[str],
    out: Path,
    tokenizer: Tokenizer,
    sequence_length: int,
    *,
    max_bytes: int | None,
    compression: str | None,
    progress: bool,
    suffixes: Sequence[str] | None,
    skip_invalid: bool,
    size_limit: int | str | None,
) -> dict[str, Any]:
    """Write the MDS shards of ``files``; returns the dataset info (not yet written)."""
    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    src_hash = xxhash.xxh64()
    used_bytes = 0
    num_documents = 0
    skipped_invalid: list[str] = []
    skipped_empty = 0
    truncated = False
    writer_kwargs: dict[str, Any] = {"out": str(out), "columns": _COLUMNS, "compression": compression}
    if size_limit is not None:
        writer_kwargs["size_limit"] = size_limit

    with MDSWriter(**writer_kwargs) as writer:
        sink = _RowSink(writer, sequence_length)
        for path, rel in tqdm(files, desc="tokenizing", unit="file", disable=None if progress else True):
            if truncated or (max_bytes is not None and used_bytes >= max_bytes):
                break  # the byte budget is spent
            try:
                raw = path.read_bytes()
            except OSError as err:
                raise InputError(f"cannot read source file: {err.strerror or err}", file=path) from err
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                if skip_invalid:
                    skipped_invalid.append(str(path))
                    continue
                raise InputError(
                    f"not valid UTF-8 (byte {err.start}: {err.reason}); convert it or pass skip_invalid=True", file=path
                ) from err
            if max_bytes is not None and len(raw) > max_bytes - used_bytes:
                raw = raw[: max_bytes - used_bytes]
                # The file is valid UTF-8, so "ignore" only drops a character split by the cut.
                text = raw.decode("utf-8", errors="ignore")
                raw = text.encode("utf-8")  # count and hash only the bytes kept
                truncated = True
            if not text:
                skipped_empty += 1
                continue
            used_bytes += len(raw)
            num_documents += 1
            src_hash.update(f"{rel}\0{len(raw)}\0".encode())
            src_hash.update(raw)
            ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
            sink.add(np.concatenate([ids, eos]))

    if sink.num_rows == 0:
        raise InputError(
            f"the sources give {sink.pending_len} tokens, fewer than one sequence of {sequence_length}",
            key="sources",
        )
    info = {
        "format_version": FORMAT_VERSION,
        "sequence_length": sequence_length,
        "num_samples": sink.num_rows,
        "fingerprint": sink.hash.hexdigest(),
        "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "column": TOKENS_COLUMN,
        "compression": compression,
        "sources": source_list,
        "suffixes": None if suffixes is None else list(suffixes),
        "sources_fingerprint": src_hash.hexdigest(),
        "num_documents": num_documents,
        "num_source_bytes": used_bytes,
        "max_bytes": max_bytes,
        "truncated_last_document": truncated,
        "dropped_tail_tokens": sink.pending_len,
        "skipped_empty": skipped_empty,
        "skipped_invalid": skipped_invalid,
    }
    return info


def _write_info(out: Path, info: dict[str, Any]) -> None:
    # Written last and atomically: its presence means the shards are complete.
    tmp = out / f".{INFO_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / INFO_FILE)


def is_heldout_document(name: str, fraction: float) -> bool:
    """Whether the document ``name`` belongs to the held-out split of ``fraction``.

    ``xxh64(name) / 2**64 < fraction``: a pure function of the name, so a document's
    split never depends on the other documents, their order or the machine.

    Example:
        >>> is_heldout_document("a.txt", 0.0), is_heldout_document("a.txt", 0.999999)
        (False, True)
    """
    return fraction > 0 and xxhash.xxh64_intdigest(name.encode("utf-8")) < fraction * 2.0**64


def _info_to_dataset(path: Path, info: dict[str, Any]) -> PreparedDataset:
    return PreparedDataset(
        path=path,
        num_samples=int(info["num_samples"]),
        sequence_length=int(info["sequence_length"]),
        tokenizer=str(info["tokenizer"]),
        fingerprint=str(info["fingerprint"]),
        metadata=info,
    )


_REQUIRED_INFO: dict[str, type] = {
    "format_version": int,
    "sequence_length": int,
    "num_samples": int,
    "fingerprint": str,
    "tokenizer": str,
    "tokenizer_fingerprint": str,
    "sources_fingerprint": str,
}


def read_dataset_info(path: str | os.PathLike[str]) -> PreparedDataset:
    """Read a dataset's ``multirun_dataset.json``.

    Args:
        path: the dataset directory (or the JSON file itself).

    Raises:
        InputError: the file is absent, not JSON, or misses/mistypes a key (naming
            the file and the key), or the MDS ``index.json`` beside it is missing.
    """
    p = Path(path).expanduser()
    info_file = p if p.name == INFO_FILE else p / INFO_FILE
    directory = info_file.parent
    if not info_file.is_file():
        raise InputError(
            "not a multirun dataset (no multirun_dataset.json; build one with multirun.data.mds.prepare_dataset)",
            file=info_file,
        )
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        line = getattr(err, "lineno", None)
        raise InputError(f"unreadable dataset info: {err}", file=info_file, line=line) from err
    if not isinstance(info, dict):
        raise InputError("dataset info must be a JSON object", file=info_file)
    for key, typ in _REQUIRED_INFO.items():
        value = info.get(key)
        # bool is an int subclass; a boolean sequence_length is a broken file, not a length.
        if not isinstance(value, typ) or isinstance(value, bool):
            raise InputError(f"missing or not a {typ.__name__} (got {value!r})", file=info_file, key=key)
    if info["format_version"] != FORMAT_VERSION:
        raise InputError(
            f"unsupported format_version {info['format_version']} (expected {FORMAT_VERSION})",
            file=info_file,
            key="format_version",
        )
    if info["sequence_length"] < 1 or info["num_samples"] < 1:
        raise InputError("sequence_length and num_samples must be positive", file=info_file, key="num_samples")
    if not (directory / "index.json").is_file():
        raise InputError("MDS index.json is missing beside the dataset info", file=directory / "index.json")
    return _info_to_dataset(directory, info)


# --------------------------------------------------------------------------- loading


class IdStreamingDataset(StreamingDataset):
    """A StreamingDataset of token rows whose samples carry their global sample index.

    ``get_item(i)`` returns ``{"input_ids": LongTensor[L], "sample_id": i}``. ``i``
    indexes the dataset's global sample space, the same on every rank and at any
    world size, so a batch row can always be traced to its stored row. Epoch
    padding may repeat an id within an epoch; consumers key on occurrence.

    Takes StreamingDataset's keyword arguments (``local``, ``batch_size``, ...).
    """

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        sample = super().get_item(sample_id, retry)
        tokens = sample[TOKENS_COLUMN]
        return {"input_ids": torch.from_numpy(np.asarray(tokens, dtype=np.int64)), "sample_id": int(sample_id)}


def collate_lm_batch(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into a causal-LM batch.

    Returns:
        ``input_ids`` (B, L) int64; ``labels``, a copy of ``input_ids`` (the model
        shifts them); ``attention_mask`` (B, L) of ones (rows are packed, never
        padded); ``sample_id`` (B,) int64.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    rows = [torch.as_tensor(s["input_ids"], dtype=torch.long) for s in samples]
    lengths = {int(r.shape[-1]) for r in rows}
    if len(lengths) != 1 or any(r.dim() != 1 for r in rows):
        raise ValueError(f"samples must be 1-D rows of one length, got lengths {sorted(lengths)}")
    input_ids = torch.stack(rows)
    return {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "attention_mask": torch.ones_like(input_ids),
        "sample_id": torch.tensor([int(s["sample_id"]) for s in samples], dtype=torch.long),
    }


def _check_mds_dir(directory: Path) -> None:
    index = directory / "index.json"
    if not index.is_file():
        raise InputError("not an MDS dataset (index.json is missing)", file=index)
    try:
        shards = json.loads(index.read_text(encoding="utf-8"))["shards"]
        columns = {name for shard in shards for name in shard["column_names"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"unreadable MDS index: {err}", file=index) from err
    if TOKENS_COLUMN not in columns:
        raise InputError(f"MDS dataset has no {TOKENS_COLUMN!r} column (columns: {sorted(columns)})", file=index)


def _is_multi_rank() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _new_dataset(**kwargs: Any) -> IdStreamingDataset:
    """Construct the dataset, retrying a lost race for a shared-memory prefix.

    Streaming keeps each dataset's state in shared memory named by a small integer
    prefix; it picks the first prefix that has neither shared memory nor a filelock
    in the temp dir, then creates it. Several datasets over one directory in one
    process are fine (each gets its own prefix, and with ``remote=None`` local
    directories may be shared). Two processes constructing at the same moment can
    pick the same prefix, and the loser gets ``FileExistsError``; picking again then
    succeeds. We deliberately do not call ``clean_stale_shared_memory()``: it
    unlinks the shared memory of live datasets too, including other jobs'.

    Under several ranks the prefix search is a collective (barriers), so one rank
    retrying alone would desynchronise them: there the error is raised.
    """
    attempts = 1 if _is_multi_rank() else 6
    for attempt in range(attempts):
        try:
            return IdStreamingDataset(**kwargs)
        except FileExistsError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.02 * (attempt + 1))
    raise AssertionError("unreachable")


def build_dataloader(
    path: str | os.PathLike[str],
    *,
    batch_size: int,
    shuffle: bool = True,
    shuffle_seed: int = 9176,
    num_canonical_nodes: int = 1,
    num_workers: int = 0,
    drop_last: bool = True,
) -> DataLoader:
    """A DataLoader of causal-LM batches (see :func:`collate_lm_batch`) over an MDS token dataset.

    Args:
        path: a local MDS directory with a ``tokens`` column (as written by
            :func:`prepare_dataset`).
        batch_size: samples per batch **per rank**; Streaming partitions by it, so
            the dataset and the DataLoader get the same value.
        shuffle, shuffle_seed: Streaming's shuffle (``py1e``) and its seed.
        num_canonical_nodes: pinned (never left to default to the physical node
            count) so the global sample order is the same at any world size.
        num_workers: DataLoader worker processes.
        drop_last: drop the last incomplete batch.

    Raises:
        InputError: ``path`` is not an MDS dataset with a ``tokens`` column.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_canonical_nodes < 1:
        raise ValueError(f"num_canonical_nodes must be positive, got {num_canonical_nodes}")
    # Absolute and resolved: Streaming registers local dirs by their string.
    local = Path(path).expanduser().resolve()
    _check_mds_dir(local)
    dataset = _new_dataset(
        local=str(local),
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_seed=shuffle_seed,
        num_canonical_nodes=num_canonical_nodes,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_lm_batch,
        num_workers=num_workers,
        drop_last=drop_last,
    )


# --------------------------------------------------------------------------- demo corpus


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def demo_corpus_sources() -> list[Path]:
    """The running interpreter's standard-library ``.py`` files, in sorted order.

    Real, human-written text that every machine has. Skips ``site-packages``
    (third-party code), the ``test``/``tests`` suites and ``idlelib``.
    """
    root = _stdlib_dir()
    found: list[tuple[tuple[str, ...], Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place: site-packages can be large and must not even be walked.
        dirnames[:] = sorted(d for d in dirnames if d not in _DEMO_EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath, name)
                if p.is_file():
                    found.append((p.relative_to(root).parts, p))
    return [p for _, p in sorted(found)]


def _default_cache_dir() -> Path:
    env = os.environ.get("MULTIRUN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "multirun"


def _demo_key(sources: list[Path], tokenizer: Tokenizer, sequence_length: int, max_bytes: int) -> str:
    root = _stdlib_dir()
    key = {
        "format_version": FORMAT_VERSION,
        "python": [sys.implementation.name, platform.python_version()],
        "sources": [[p.relative_to(root).as_posix(), p.stat().st_size] for p in sources],
        "max_bytes": max_bytes,
        "tokenizer": tokenizer.fingerprint(),
        "sequence_length": sequence_length,
    }
    return xxhash.xxh64(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _remove_stale_builds(cache_dir: Path) -> None:
    now = time.time()
    for p in cache_dir.glob(".demo-*.tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_BUILD_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def build_demo_dataset(
    tokenizer: Tokenizer,
    sequence_length: int,
    *,
    max_bytes: int = 4_000_000,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> PreparedDataset:
    """The demo dataset (standard-library source as text), built once and cached.

    The cache entry is named by a fingerprint of the Python version, the source
    files and their sizes, ``max_bytes``, the tokenizer fingerprint and
    ``sequence_length``; a second call finds it and returns without rebuilding.
    A build goes to a temporary directory that is renamed into place, so
    processes racing to build it never see a partial dataset.

    Args:
        tokenizer: the run's tokenizer.
        sequence_length: tokens per row.
        max_bytes: bytes of source text to use (a prefix of the sorted files).
        cache_dir: where datasets are cached; default ``$MULTIRUN_CACHE`` or
            ``~/.cache/multirun``.
        progress: show a progress bar while building.
    """
    sources = demo_corpus_sources()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    final = cache / f"demo-L{sequence_length}-{_demo_key(sources, tokenizer, sequence_length, max_bytes)}"
    if final.exists():
        try:
            return read_dataset_info(final)
        except InputError:
            # Complete builds are renamed in whole, so an invalid entry was damaged
            # after the fact: move it out of the way and rebuild.
            broken = final.with_name(f".{final.name}.tmp-broken-{os.getpid()}")
            with contextlib.suppress(OSError):  # a concurrent process already moved it
                os.replace(final, broken)
            shutil.rmtree(broken, ignore_errors=True)

    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    try:
        prepare_dataset(
            sources, tmp, tokenizer, sequence_length, max_bytes=max_bytes, progress=progress, skip_invalid=True
        )
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process renamed its finished build into place first; use it.
            if not (final / INFO_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_dataset_info(final)


def demo_heldout_rows(tokenizer: Tokenizer, sequence_length: int, *, count: int, train_max_bytes: int) -> np.ndarray:
    """``count`` rows of held-out text for the demo: stdlib files the demo never trains on.

    Training takes a prefix of the sorted sources (``train_max_bytes``); held-out rows
    come from the other end of the list, so the two never share a file.
    """
    sources = demo_corpus_sources()
    used, first_free = 0, len(sources)
    for index, path in enumerate(sources):
        if used >= train_max_bytes:
            first_free = index
            break
        used += path.stat().st_size
    tokens: list[int] = []
    needed = count * sequence_length
    for path in reversed(sources[first_free:]):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        tokens.extend(tokenizer.encode(text))
        tokens.append(tokenizer.eos_token_id)
        if len(tokens) >= needed:
            break
    if len(tokens) < needed:
        raise InputError(
            f"the standard library has too little text beyond the demo's {train_max_bytes} training bytes "
            f"for {count} held-out rows",
            key="data.demo_max_bytes",
        )
    return np.asarray(tokens[:needed], dtype=np.int64).reshape(count, sequence_length)


DEMO_HELDOUT_ROWS = 2048  # rows of the demo's held-out MDS split (replay items name them by index)


def build_demo_heldout_dataset(
    tokenizer: Tokenizer,
    sequence_length: int,
    *,
    train_max_bytes: int,
    rows: int = DEMO_HELDOUT_ROWS,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The demo's held-out text as an MDS dataset (cached): row ``i`` is row ``i`` of
    :func:`demo_heldout_rows`, so the held-out loss's rows are its first rows.

    For kinds that read held-out rows by sample index (``replay``) from a demo run. Built
    once per key (as :func:`build_demo_dataset`), in a temporary folder renamed into place.

    Raises:
        InputError: keyed ``data.demo_max_bytes``, when the standard library holds too little
            text beyond the demo's training bytes.
    """
    sources = demo_corpus_sources()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    key = _demo_key(sources, tokenizer, sequence_length, train_max_bytes)
    final = cache / f"demo-heldout-L{sequence_length}-R{rows}-{key}"
    if (final / "index.json").is_file():
        return final
    table = demo_heldout_rows(tokenizer, sequence_length, count=rows, train_max_bytes=train_max_bytes)
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    try:
        with MDSWriter(out=str(tmp / "data"), columns=_COLUMNS) as writer:
            for row in table.astype(np.int32):
                writer.write({TOKENS_COLUMN: row})
        try:
            os.replace(tmp / "data", final)  # index.json is written last: a whole dataset or none
        except OSError:
            if not (final / "index.json").is_file():  # else another process's build came first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_rows(path: str | os.PathLike[str], count: int, sequence_length: int | None = None) -> np.ndarray:
    """The first ``count`` token rows of an MDS dataset (e.g. a held-out split), as int64.

    Reads multirun's datasets (:func:`prepare_dataset`, checked through their
    ``multirun_dataset.json``) and llm-foundry's pretokenized ones (``llmfoundry data_prep
    convert_text_to_mds`` or ``convert_dataset_hf`` with ``--concat-tokens``): a ``tokens``
    column of ``ndarray`` (llm-foundry 0.22 writes ``ndarray:int32``) or of ``bytes`` (older
    converters), which are read as int64, llm-foundry's default ``token_encoding_type``.

    Args:
        path: the dataset directory (holds ``index.json``).
        count: rows to read, from the first.
        sequence_length: cut each row to this many tokens, as llm-foundry's
            ``StreamingTextDataset`` cuts rows to ``max_seq_len``; None keeps rows whole.

    Raises:
        InputError: naming the path: no MDS index, no ``tokens`` column (or one of another
            encoding), fewer than ``count`` rows, or a row shorter than ``sequence_length``.
    """
    directory = Path(path).expanduser()
    if (directory / INFO_FILE).is_file():
        directory = read_dataset_info(directory).path  # ours: the metadata must be whole, too
    encoding = _tokens_encoding(directory)
    samples = _stored_samples(directory, count)
    if len(samples) < count:
        raise InputError(f"the dataset has {len(samples)} rows, {count} requested", file=directory)
    rows = []
    for i, sample in enumerate(samples):
        stored = sample[TOKENS_COLUMN]
        if encoding == "bytes":
            if len(stored) % 8:
                raise InputError(
                    f"row {i} of the bytes column {TOKENS_COLUMN!r} has {len(stored)} bytes, not a whole number "
                    "of int64 tokens (llm-foundry's default token_encoding_type)",
                    file=directory,
                )
            tokens = np.frombuffer(stored, dtype=np.int64)
        else:
            tokens = np.asarray(stored).reshape(-1)
        if sequence_length is not None:
            if len(tokens) < sequence_length:
                raise InputError(
                    f"row {i} has {len(tokens)} tokens, fewer than the sequence length {sequence_length}",
                    file=directory,
                )
            tokens = tokens[:sequence_length]
        rows.append(tokens.astype(np.int64))
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise InputError(f"rows of different lengths {lengths}; give the sequence length to cut them", file=directory)
    return np.stack(rows) if rows else np.zeros((0, sequence_length or 0), dtype=np.int64)


def count_rows(path: str | os.PathLike[str]) -> int:
    """The number of rows of an MDS dataset (from its ``index.json``; nothing else is read)."""
    directory = Path(path).expanduser()
    if (directory / INFO_FILE).is_file():
        directory = read_dataset_info(directory).path
    _tokens_encoding(directory)  # an MDS index with token rows, else an InputError naming it
    shards = json.loads((directory / "index.json").read_text(encoding="utf-8"))["shards"]
    return int(sum(int(info["samples"]) for info in shards))


def read_rows_at(path: str | os.PathLike[str], indices: Sequence[int]) -> dict[int, np.ndarray]:
    """The token rows at sample ``indices`` of an MDS dataset, as int64, keyed by index.

    Only the shards that hold a wanted row are opened, one at a time, by Streaming's shard
    readers, so memory is bounded by the rows asked for (compressed shards are decompressed into
    a temporary folder, never beside the data).
    Datasets as :func:`read_rows` reads them.

    Raises:
        InputError: naming the path: not a token dataset, or an index outside ``[0, rows)``.
    """
    directory = Path(path).expanduser()
    if (directory / INFO_FILE).is_file():
        directory = read_dataset_info(directory).path
    encoding = _tokens_encoding(directory)
    wanted = sorted({int(i) for i in indices})
    total = count_rows(directory)
    outside = [i for i in wanted if not 0 <= i < total]
    if outside:
        raise InputError(f"sample indices {outside[:5]} are outside the dataset's {total} rows", file=directory)
    out: dict[int, np.ndarray] = {}
    for index, sample in _stored_samples_at(directory, wanted):
        stored = sample[TOKENS_COLUMN]
        if encoding == "bytes":
            tokens = np.frombuffer(stored[: len(stored) - len(stored) % 8], dtype=np.int64)
        else:
            tokens = np.asarray(stored).reshape(-1)
        out[index] = tokens.astype(np.int64)
    return out


def _stored_samples_at(directory: Path, wanted: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(index, sample)`` for each sorted index in ``wanted``, shard by shard (see :func:`_stored_samples`)."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    shards = json.loads((directory / "index.json").read_text(encoding="utf-8"))["shards"]
    position, first = 0, 0
    with tempfile.TemporaryDirectory(prefix="multirun-mds-") as scratch:
        for info in shards:
            end = first + int(info["samples"])
            local = []
            while position < len(wanted) and wanted[position] < end:
                local.append(wanted[position])
                position += 1
            if local:
                reader: Any = reader_from_json(str(directory), None, info)
                if not (directory / reader.raw_data.basename).is_file() and reader.zip_data is not None:
                    raw = decompress(reader.compression, (directory / reader.zip_data.basename).read_bytes())
                    (Path(scratch) / reader.raw_data.basename).write_bytes(raw)
                    reader = reader_from_json(scratch, None, info)
                for index in local:
                    yield index, reader.get_item(index - first)
            first = end
            if position >= len(wanted):
                break


def _stored_samples(directory: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` samples as stored, read by Streaming's shard readers.

    Not through a ``StreamingDataset``: each one takes shared memory that Streaming keeps
    open for the life of the process (and every later dataset opens its predecessors'
    while it looks for a free prefix), so a long process that reads held-out rows again
    and again (``multirun evaluate``, the test suite) would run out of file descriptors.
    Compressed shards are decompressed into a temporary folder, never beside the data.
    """
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    shards = json.loads((directory / "index.json").read_text(encoding="utf-8"))["shards"]
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="multirun-mds-") as scratch:
        for info in shards:
            if len(samples) >= count:
                break
            # MDS, JSON and CSV shards are JointReaders: one raw file, and a zip one when compressed.
            reader: Any = reader_from_json(str(directory), None, info)
            if not (directory / reader.raw_data.basename).is_file() and reader.zip_data is not None:
                raw = decompress(reader.compression, (directory / reader.zip_data.basename).read_bytes())
                (Path(scratch) / reader.raw_data.basename).write_bytes(raw)
                reader = reader_from_json(scratch, None, info)
            for index in range(min(reader.samples, count - len(samples))):
                samples.append(reader.get_item(index))
    return samples


def _tokens_encoding(directory: Path) -> str:
    """The MDS encoding of the ``tokens`` column: ``ndarray:<dtype>`` or ``bytes``."""
    index = directory / "index.json"
    if not index.is_file():
        raise InputError("not an MDS dataset (index.json is missing)", file=index)
    try:
        shards = json.loads(index.read_text(encoding="utf-8"))["shards"]
        encodings = {
            name: encoding
            for shard in shards
            for name, encoding in zip(shard["column_names"], shard["column_encodings"])
        }
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"unreadable MDS index: {err}", file=index) from err
    encoding = encodings.get(TOKENS_COLUMN)
    if encoding is None:
        hint = (
            " (a 'text' column holds untokenized text: tokenize it with llm-foundry's converter and "
            "--concat-tokens, or with `multirun prepare`)"
            if "text" in encodings
            else ""
        )
        raise InputError(
            f"no token rows: neither multirun's nor llm-foundry's {TOKENS_COLUMN!r} column "
            f"(columns: {sorted(encodings)}){hint}",
            file=directory,
        )
    if encoding != "bytes" and not encoding.startswith("ndarray"):
        raise InputError(
            f"the {TOKENS_COLUMN!r} column is encoded as {encoding!r}; expected ndarray (multirun, llm-foundry 0.22) "
            "or bytes (older llm-foundry converters)",
            file=directory,
        )
    return str(encoding)
