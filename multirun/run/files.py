"""Append-only JSON-lines logs in the run directory (metrics, training loss, decisions).

Appends are flushed and fsynced; a kill can leave at most a torn last line, which
:func:`read_jsonl` skips. :func:`truncate_jsonl` drops records after a resumed step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np


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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, allow_nan=False, default=plain) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
