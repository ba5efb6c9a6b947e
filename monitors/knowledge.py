"""Monitor of the ``knowledge`` kind: does the model now know the injected facts?

Every probe ``(question, target)`` is scored by teacher forcing; per fact, scores are
averaged over its probes (one score per fact, treated facts against never-injected
ones):

``target_logprob`` (primary; ``means``, greater)
    mean per-token log-probability of the target given the question, averaged over
    the fact's probes. Length-normalised log-probabilities are far less skewed than
    probabilities, which gives the permutation test its power.
``target_probability`` (secondary; ``means``, greater)
    P(target | question) = exp(sum of target log-probs), averaged over the fact's
    probes: TOAA's probe value ``v`` (docs/references.md §2.1), the quantity a knowledge
    controller steers.
``exact_match`` (secondary; ``rates``, greater)
    greedy decoding would produce the target: the teacher-forced argmax equals the
    target at every position (one forward pass, no generation). A fact scores 1 when
    *all* its probes match (option ``exact_match: any``: when at least one does).

:meth:`KnowledgeMonitor.score` returns these per-fact (and per-probe) numbers as a
:class:`KnowledgeScores` for callers that act on them (controllers) rather than test
them.

Options (``experiments[i].monitor.options``): ``exact_match`` (``all`` | ``any``).

Example::

    monitor = KnowledgeMonitor.from_experiment(exp, tokenizer=tok, options={}, sequence_length=128)
    scores = monitor.score(live)
    v = scores.target_probability[scores.treated].mean()   # the controller's probe value
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError
from multirun.kinds.probes import KnowledgeProbes
from multirun.measure.live_model import LiveModel, MetricScores
from multirun.types import PreparedExperiment

__all__ = ["KnowledgeMonitor", "KnowledgeScores", "per_item_mean"]

_EXACT_MATCH = ("all", "any")


def per_item_mean(values: np.ndarray, probe_items: np.ndarray, n_items: int) -> np.ndarray:
    """Mean of per-probe ``values`` for each item (NaN for an item without probes).

    Example:
        >>> per_item_mean(np.array([1.0, 3.0, 5.0]), np.array([0, 0, 1]), 2).tolist()
        [2.0, 5.0]
    """
    counts = np.bincount(probe_items, minlength=n_items).astype(np.float64)
    sums = np.bincount(probe_items, weights=values, minlength=n_items)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


@dataclass
class KnowledgeScores:
    """Per-fact and per-probe scores of one evaluation.

    Attributes:
        item_ids, treated: the facts and their arms.
        target_logprob: per fact, mean over its probes of the per-token target log-prob.
        target_probability: per fact, mean over its probes of P(target | question).
        exact_match: per fact, 1.0 if all (or any, see the option) probes match greedily.
        match_fraction: per fact, the fraction of its probes that match greedily.
        probe_items: per probe, the index of its fact.
        probe_logprob, probe_probability, probe_match: per-probe values.
    """

    item_ids: list[str]
    treated: np.ndarray
    target_logprob: np.ndarray
    target_probability: np.ndarray
    exact_match: np.ndarray
    match_fraction: np.ndarray
    probe_items: np.ndarray
    probe_logprob: np.ndarray
    probe_probability: np.ndarray
    probe_match: np.ndarray


class KnowledgeMonitor:
    """Scores every fact's probes (:class:`~multirun.kinds.probes.KnowledgeProbes`) on the live model.

    Args:
        item_ids, treated: the experiment's facts and arms.
        probe_items: per probe, the index of its fact in ``item_ids``.
        contexts, targets: per probe, the question's and the target's tokens.
        exact_match: ``all`` or ``any`` (how a fact's probe matches combine).
    """

    #: Per-item metrics it reports (controllers validate their metric against these).
    metrics = ("target_logprob", "target_probability", "exact_match")

    def __init__(
        self,
        item_ids: list[str],
        treated: np.ndarray,
        probe_items: Sequence[int],
        contexts: Sequence[Sequence[int]],
        targets: Sequence[Sequence[int]],
        *,
        exact_match: str = "all",
    ) -> None:
        self.item_ids = list(item_ids)
        self.treated = np.asarray(treated, dtype=bool)
        self.probe_items = np.asarray(probe_items, dtype=np.int64)
        self.contexts = [list(c) for c in contexts]
        self.targets = [list(t) for t in targets]
        self.exact_match = exact_match

    @classmethod
    def from_experiment(
        cls, experiment: PreparedExperiment, *, tokenizer: Tokenizer, options: Mapping[str, Any], sequence_length: int
    ) -> KnowledgeMonitor:
        """Build from a prepared ``knowledge`` experiment.

        Raises:
            ConfigError: an unknown option or value (key ``monitor.options.<name>``),
                or an experiment without knowledge probes (key ``monitor.name``).
        """
        for name in options:
            if name != "exact_match":
                raise ConfigError("unknown option (allowed: exact_match)", key=f"monitor.options.{name}")
        exact_match = options.get("exact_match", "all")
        if exact_match not in _EXACT_MATCH:
            raise ConfigError(
                f"must be one of {', '.join(_EXACT_MATCH)}; got {exact_match!r}", key="monitor.options.exact_match"
            )
        probes = experiment.probes
        if not isinstance(probes, KnowledgeProbes):
            raise ConfigError(
                f"experiment {experiment.name!r} (kind {experiment.kind!r}) has no knowledge probes; use its own kind's monitor",
                key="monitor.name",
            )
        return cls(
            list(experiment.item_ids),
            np.asarray(experiment.treated, dtype=bool),
            probes.probe_items,
            probes.contexts,
            probes.targets,
            exact_match=exact_match,
        )

    def score(self, live: LiveModel) -> KnowledgeScores:
        """Per-probe teacher-forced scores, aggregated per fact (one sharded call)."""
        s = live.score_targets(self.contexts, self.targets)
        n = len(self.item_ids)
        match = s.greedy_match.astype(np.float64)
        fraction = per_item_mean(match, self.probe_items, n)
        return KnowledgeScores(
            item_ids=self.item_ids,
            treated=self.treated,
            target_logprob=per_item_mean(s.mean_logprob, self.probe_items, n),
            target_probability=per_item_mean(s.probability, self.probe_items, n),
            exact_match=(fraction == 1.0 if self.exact_match == "all" else fraction > 0).astype(np.float64),
            match_fraction=fraction,
            probe_items=self.probe_items,
            probe_logprob=s.mean_logprob,
            probe_probability=s.probability,
            probe_match=s.greedy_match,
        )

    def evaluate(self, live: LiveModel) -> list[MetricScores]:
        """``target_logprob`` (primary), ``target_probability`` and ``exact_match``."""
        k = self.score(live)
        ids, treated = self.item_ids, self.treated
        return [
            MetricScores("target_logprob", ids, treated, k.target_logprob, test="means", alternative="greater"),
            MetricScores(
                "target_probability",
                ids,
                treated,
                k.target_probability,
                test="means",
                alternative="greater",
                primary=False,
            ),
            MetricScores(
                "exact_match", ids, treated, k.exact_match, test="rates", alternative="greater", primary=False
            ),
        ]
