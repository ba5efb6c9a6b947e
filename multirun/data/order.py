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

from dataclasses import dataclass
from typing import Any

from streaming import StreamingDataset


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
