"""Whether a training dataset gives every world size the same samples at each step.

Global rows (docs/architecture.md, invariant 3) are the same on 1 and N processes only
when the set of samples of each global step is. Streaming guarantees that for a fixed
global batch size and a pinned ``num_canonical_nodes`` (its "elastic determinism");
for other datasets multirun cannot tell, and says so.

Example:
    >>> data_order(object()).world_size_independent is None
    True
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from streaming import StreamingDataset

from multirun.errors import InputError

if TYPE_CHECKING:
    from multirun.config import DataConfig


@dataclass(frozen=True)
class DataOrder:
    """What multirun knows about the dataset's order across world sizes.

    Attributes:
        world_size_independent: True when every world size gets the same samples at each
            step, False when it depends on the node count, None when multirun cannot tell.
        reason: one sentence a researcher can act on.
    """

    world_size_independent: bool | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"world_size_independent": self.world_size_independent, "reason": self.reason}


def data_order(dataset: object) -> DataOrder:
    """Inspect a training dataset (``state.dataloader.dataset``) before its first batch."""
    if isinstance(dataset, StreamingDataset):
        nodes = dataset.num_canonical_nodes
        if nodes is None:
            return DataOrder(
                False,
                "num_canonical_nodes is not pinned: Streaming derives it from the number of nodes, so runs on "
                "different node counts train on different samples at each step (pin it, e.g. llm-foundry's "
                "train_loader.dataset.num_canonical_nodes, to compare runs across node counts)",
            )
        return DataOrder(
            True,
            f"a StreamingDataset with num_canonical_nodes={nodes}: every world size with the same global batch "
            "size trains on the same samples at each step",
        )
    return DataOrder(
        None,
        f"{type(dataset).__name__} is not a StreamingDataset: multirun cannot tell whether every world size "
        "trains on the same samples at each step, so the global rows may differ between world sizes",
    )


def read_training_steps(
    path: str | os.PathLike[str],
    data: DataConfig,
    *,
    global_batch_size: int,
    epoch: int,
    first_step_in_epoch: int,
    steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``steps`` consecutive global steps of one epoch, as the run's Trainer drew them.

    A Streaming dataset with the run's shuffle, seed and ``num_canonical_nodes``, in one
    process, the global batch as its batch size, resumed at the first step's first sample
    (as ``multirun inspect`` reads a step, :mod:`multirun.batch_view`); each step's rows in global-row order
    (:func:`multirun.inject.batch.global_rows`).

    Returns:
        ``(tokens [steps, batch, length], sample_ids [steps, batch])``, int64.

    Raises:
        InputError: naming the dataset: the epoch ends before the last step's batch is whole.
    """
    from multirun.data.mds import IdStreamingDataset, build_dataloader
    from multirun.inject.batch import LocalRows, global_rows, row_fingerprints

    batch = global_batch_size
    stream = cast(
        IdStreamingDataset,
        build_dataloader(
            path,
            batch_size=batch,
            shuffle=data.shuffle,
            shuffle_seed=data.shuffle_seed,
            num_canonical_nodes=data.num_canonical_nodes,
        ).dataset,
    )
    stream.load_state_dict(
        {
            "epoch": epoch,
            "sample_in_epoch": first_step_in_epoch * batch,
            "num_canonical_nodes": data.num_canonical_nodes,
            "shuffle_seed": data.shuffle_seed,
            "initial_physical_nodes": 1,
        }
    )
    iterator = iter(stream)
    try:
        samples = list(itertools.islice(iterator, batch * steps))
    finally:
        iterator.close()  # type: ignore[attr-defined]  # StreamingDataset.__iter__ is a generator
        # Its prefetch threads stop at the epoch's end or when told; tell them now (Streaming
        # itself does so when the next epoch starts) rather than leave them polling.
        pending = getattr(stream, "_iterator", None)
        if pending is not None:
            pending.exit()
    if len(samples) != batch * steps:
        raise InputError(
            f"steps {first_step_in_epoch}..{first_step_in_epoch + steps - 1} of epoch {epoch}: the dataset gave "
            f"{len(samples)} samples, {steps} global batches of {batch} need {batch * steps}",
            file=os.fspath(path),
        )
    tokens = np.stack([np.asarray(s["input_ids"], dtype=np.int64) for s in samples]).reshape(steps, batch, -1)
    ids = np.array([int(s["sample_id"]) for s in samples], dtype=np.int64).reshape(steps, batch)
    for k in range(steps):
        local = LocalRows(sample_id=ids[k], fingerprint=row_fingerprints(tokens[k]))
        order = np.argsort(global_rows(local, rank=0, gathered_keys=None).global_row)
        tokens[k], ids[k] = tokens[k][order], ids[k][order]
    return tokens, ids
