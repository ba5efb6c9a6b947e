"""The ``forgetting`` monitor: the loss of each replaced batch at every evaluation (the forgetting curve).

For experiments placed ``whole: row`` or ``whole: batch`` (docs/placement.md). Each item is
scored on the row it fills (its EOS-wrapped tokens fitted to the sequence length, exactly as
injected, :func:`multirun.kinds.rows.fit_row`): metric ``row_loss`` (primary), the mean
per-token loss (negative log-probability) of the row after its first token, treated items
against never-injected control items (permutation test, lower when injected). With
``whole: batch`` every treated item is in the group of the first step whose batch it filled
(``step 120``), so ``metrics.jsonl`` holds one record per replaced batch per evaluation: the
batch's mean loss against the same controls, i.e. that batch's forgetting curve over the
evaluations after its step. A new monitor rather than an option of ``documents``: it scores
the row as trained (not the item's text) and groups by batch, which ``documents`` does not
know about; any kind whose probes carry token ``sequences`` can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError
from multirun.kinds.rows import fit_row
from multirun.measure.live_model import LiveModel, MetricScores
from multirun.types import PreparedExperiment

__all__ = ["ForgettingMonitor"]


class ForgettingMonitor:
    """Scores every item's whole row by teacher forcing; groups treated items by replaced batch."""

    metrics = ("row_loss",)

    def __init__(
        self, item_ids: list[str], treated: np.ndarray, rows: list[list[int]], groups: list[str] | None
    ) -> None:
        self.item_ids, self.treated, self.groups = item_ids, treated, groups
        self.contexts = [row[:1] for row in rows]
        self.targets = [row[1:] for row in rows]

    @classmethod
    def from_experiment(
        cls, experiment: PreparedExperiment, *, tokenizer: Tokenizer, options: Mapping[str, Any], sequence_length: int
    ) -> ForgettingMonitor:
        for name in options:
            raise ConfigError("the forgetting monitor takes no options", key=f"monitor.options.{name}")
        if experiment.placement.whole is None:
            raise ConfigError(
                f"experiment {experiment.name!r}: the forgetting monitor scores whole rows; "
                "place it with placement.whole: row or batch",
                key="monitor.name",
            )
        sequences = getattr(experiment.probes, "sequences", None)
        if sequences is None:
            raise ConfigError(f"experiment {experiment.name!r} has no sequences to score", key="monitor.name")
        rows = [fit_row(seq, sequence_length).tolist() for seq in sequences]
        batch_of = experiment.metadata.get("batch_of_item")
        groups = None
        if batch_of:
            groups = [
                f"step {batch_of[i]}" if t and i in batch_of else "control"
                for i, t in zip(experiment.item_ids, experiment.treated)
            ]
        return cls(list(experiment.item_ids), np.asarray(experiment.treated), rows, groups)

    def evaluate(self, live: LiveModel) -> list[MetricScores]:
        scores = live.score_targets(self.contexts, self.targets)
        return [
            MetricScores(
                "row_loss",
                self.item_ids,
                self.treated,
                -np.asarray(scores.mean_logprob, dtype=np.float64),
                test="means",
                alternative="less",
                groups=self.groups,
            )
        ]
