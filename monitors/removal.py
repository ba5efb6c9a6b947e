"""Monitor of the ``removal`` kind: does the model continue removed texts less than kept ones?

Every item (removed treated items and controls left in the stream alike) is scored
from its first ``k`` tokens:

``continuation_logprob`` (primary; ``means``, less)
    mean per-token log-probability of the rest of the text given its first ``k`` tokens,
    by teacher forcing. Removal works when removed texts score lower than the controls
    the model kept training on.
``exact_continuation`` (secondary; ``rates``, less)
    1 when greedy decoding from the first ``k`` tokens reproduces the whole rest of the
    text: the argmax prediction equals the target at every position (one teacher-forced
    pass, docs/references.md §2.4).

Options (``experiments[i].monitor.options``): ``k`` (integer >= 1, default 8), the
prefix length; every text must be longer than ``k`` tokens.

Example:
    >>> parse_monitor_options({"k": 4})
    4
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError, PayloadError
from multirun.kinds.probes import RemovalProbes
from multirun.measure.live_model import LiveModel, MetricScores
from multirun.types import PreparedExperiment

__all__ = ["RemovalMonitor", "parse_monitor_options"]

DEFAULT_K = 8


def parse_monitor_options(options: Mapping[str, Any]) -> int:
    """The prefix length ``k``; ConfigError (key ``monitor.options.<name>``) on anything else."""
    for name in options:
        if name != "k":
            raise ConfigError("unknown option (known: k)", key=f"monitor.options.{name}")
    k = options.get("k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"must be an integer >= 1, got {k!r}", key="monitor.options.k")
    return int(k)


class RemovalMonitor:
    """Scores the continuation of every item's text after its first ``k`` tokens.

    Reads :class:`~multirun.kinds.probes.RemovalProbes`.
    """

    metrics = ("continuation_logprob", "exact_continuation")

    def __init__(self, item_ids: list[str], treated: np.ndarray, texts: list[list[int]], k: int) -> None:
        self.item_ids, self.treated, self.k = item_ids, np.asarray(treated, dtype=bool), k
        self.prefixes = [list(t[:k]) for t in texts]
        self.rests = [list(t[k:]) for t in texts]

    @classmethod
    def from_experiment(
        cls, experiment: PreparedExperiment, *, tokenizer: Tokenizer, options: Mapping[str, Any], sequence_length: int
    ) -> RemovalMonitor:
        """Build the monitor; a text not longer than ``k`` is a PayloadError naming its line."""
        k = parse_monitor_options(options)
        probes = experiment.probes
        if not isinstance(probes, RemovalProbes):
            raise ConfigError(
                f"experiment {experiment.name!r} is not a removal experiment (no texts to score)", key="monitor.name"
            )
        if k >= sequence_length:
            raise ConfigError(
                f"k = {k} leaves nothing of a {sequence_length}-token row to score", key="monitor.options.k"
            )
        for tokens, line, item_id in zip(probes.texts, probes.lines, experiment.item_ids):
            if len(tokens) <= k:
                raise PayloadError(
                    f"item {item_id!r} is {len(tokens)} tokens long; its continuation after the first k = {k} tokens "
                    "is empty: lengthen the text or lower monitor.options.k",
                    file=probes.file,
                    line=line,
                    key="text",
                )
        texts = [list(t[:sequence_length]) for t in probes.texts]  # what one probe pass can hold
        return cls(list(experiment.item_ids), np.asarray(experiment.treated), texts, k)

    def evaluate(self, live: LiveModel) -> list[MetricScores]:
        scores = live.score_targets(self.prefixes, self.rests)
        return [
            MetricScores(
                "continuation_logprob",
                self.item_ids,
                self.treated,
                scores.mean_logprob,
                test="means",
                alternative="less",
                extra={"k": self.k},
            ),
            MetricScores(
                "exact_continuation",
                self.item_ids,
                self.treated,
                scores.greedy_match.astype(np.float64),
                test="rates",
                alternative="less",
                primary=False,
                extra={"k": self.k},
            ),
        ]
