"""Monitor of the generic ``documents`` kind: how likely the model finds each item's text.

Metric ``text_logprob`` (primary): mean per-token log-probability of the item's text
given the leading EOS, treated items against never-injected controls (permutation
test of the difference of means, higher when injected); with probe ``groups``, each group
of treated items against all controls as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError
from multirun.kinds.probes import DocumentsProbes
from multirun.measure.live_model import LiveModel, MetricScores
from multirun.types import PreparedExperiment


class DocumentsMonitor:
    """Scores every item's text by teacher forcing.

    Reads :class:`~multirun.kinds.probes.DocumentsProbes` (``sequences``); any
    experiment whose probes have token ``sequences`` will do.
    """

    metrics = ("text_logprob",)

    def __init__(
        self, item_ids: list[str], treated: np.ndarray, sequences: list[list[int]], groups: list[str] | None = None
    ) -> None:
        self.item_ids, self.treated, self.groups = item_ids, treated, groups
        # Context: the first token (the EOS that opens a wrapped sequence); target: the rest.
        self.contexts = [seq[:1] for seq in sequences]
        self.targets = [seq[1:] for seq in sequences]

    @classmethod
    def from_experiment(
        cls, experiment: PreparedExperiment, *, tokenizer: Tokenizer, options: Mapping[str, Any], sequence_length: int
    ) -> DocumentsMonitor:
        for name in options:
            raise ConfigError("the documents monitor takes no options", key=f"monitor.options.{name}")
        # DocumentsProbes, or any kind's probes that carry token ``sequences`` (watermark's gaussian carriers).
        sequences = getattr(experiment.probes, "sequences", None)
        if sequences is None:
            raise ConfigError(f"experiment {experiment.name!r} has no sequences to score", key="monitor.name")
        wrapped = [list(s) if s and s[0] == tokenizer.eos_token_id else [tokenizer.eos_token_id, *s] for s in sequences]
        groups = experiment.probes.groups if isinstance(experiment.probes, DocumentsProbes) else None
        return cls(list(experiment.item_ids), np.asarray(experiment.treated), wrapped, groups)

    def evaluate(self, live: LiveModel) -> list[MetricScores]:
        scores = live.score_targets(self.contexts, self.targets)
        return [
            MetricScores(
                "text_logprob",
                self.item_ids,
                self.treated,
                scores.mean_logprob,
                test="means",
                alternative="greater",
                groups=self.groups,
            )
        ]
