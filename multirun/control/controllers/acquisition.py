"""Exposures to acquisition: how many spans of an item the model saw before it was acquired."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["acquisition_record", "exposures_to_acquisition"]


def _as_strings(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Dictionary-encoded ledger columns decoded to plain strings."""
    if pa.types.is_dictionary(column.type):
        return column.cast(pa.string())
    return column


def exposures_to_acquisition(
    ledger_table: pa.Table, experiment: str, acquired_at: Mapping[str, int | None]
) -> dict[str, int | None]:
    """Per item: spans of ``experiment``'s item in the ledger with ``step < acquired_at``.

    ``acquired_at`` is an item -> evaluation step map (``AcquireController.acquired_at``);
    an evaluation after ``s`` completed steps has seen exactly the spans of steps
    ``< s``. Items never acquired (None) map to None. ``ledger_table`` is a ledger
    table (``Ledger.open(run_dir).table``) with ``experiment``, ``item`` and ``step``
    columns, dictionary-encoded or plain.

    Example::

        exposures_to_acquisition(Ledger.open(run).table, "facts", {"f0": 200, "f1": None})
        # {'f0': 3, 'f1': None}
    """
    items = [k for k, v in acquired_at.items() if v is not None]
    out: dict[str, int | None] = {k: (0 if v is not None else None) for k, v in acquired_at.items()}
    if not items or ledger_table.num_rows == 0:
        return out
    mask = pc.equal(_as_strings(ledger_table.column("experiment")), pa.scalar(experiment, pa.string()))
    table = ledger_table.filter(mask)
    if table.num_rows == 0:
        return out
    # Position of each row's item among the acquired items (-1: not acquired / not asked for).
    key = pc.fill_null(pc.index_in(_as_strings(table.column("item")), value_set=pa.array(items, pa.string())), -1)
    idx = np.asarray(key.to_numpy(), dtype=np.int64)
    valid = idx >= 0
    steps = table.column("step").to_numpy().astype(np.int64)
    limits = np.array([int(acquired_at[i]) for i in items], dtype=np.int64)  # type: ignore[arg-type]
    before = valid & (steps < limits[np.maximum(idx, 0)])
    counts = np.bincount(idx[before], minlength=len(items))
    for k, item in enumerate(items):
        out[item] = int(counts[k])
    return out


def acquisition_record(
    ledger_table: pa.Table, experiment: str, acquired_at: Mapping[str, int | None]
) -> dict[str, dict[str, int | None]]:
    """The ``acquisition.json`` entry of one experiment, as the report reads it:
    item -> ``{"acquired_at_step", "exposures_to_acquisition"}``."""
    exposures = exposures_to_acquisition(ledger_table, experiment, acquired_at)
    return {
        item: {"acquired_at_step": None if step is None else int(step), "exposures_to_acquisition": exposures[item]}
        for item, step in acquired_at.items()
    }
