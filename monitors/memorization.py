"""Monitor of the ``memorization`` kind: likelihood, extraction and exposure of verbatim texts.

Metrics (treated items against never-injected controls):

``text_logprob`` (primary; ``means``, greater)
    mean per-token log-probability of the item's text given the context it had in
    training (the leading EOS; without EOS wrapping, the text's first token). One
    teacher-forced pass per item.
``exact_match`` (secondary; ``rates``, greater)
    k-prefix -> k-suffix extraction: 1 when greedy decoding from the k-token prefix
    reproduces the next k tokens exactly. Computed by teacher forcing: greedy exact
    match holds exactly when the argmax prediction equals the target at every suffix
    position (docs/references.md §2.4), so one pass suffices. With ``anchor: end`` (default)
    the suffix is the text's last k tokens and the prefix the k tokens before them;
    with ``anchor: start`` the prefix is the text's first k tokens (after the leading
    EOS, which was trained on too) and the suffix the next k.
``exposure`` (secondary; ``means``, greater)
    Secret Sharer exposure (Carlini et al. 2019, docs/references.md §2.5) against the
    never-injected controls as the reference set R:
    ``exposure(x) = log2 |candidates| - log2 rank(x)``, where the candidates are x
    and the n_c - 1 references of R other than one left-out control, and the rank is
    1 + the number of references with a lower perplexity (ties count 1/2). A
    control's own exposure is computed leave-one-out: its references are the other
    n_c - 1 controls. A treated item's exposure is averaged over the n_c ways of
    leaving one control out, so that treated items and controls are ranked among
    equally many candidates (n_c) and have the same expected exposure when nothing
    was memorised. The maximum is log2 n_c. Derived from ``text_logprob`` (the
    perplexity is exp(-mean log-prob)), no extra forward pass.

Options (``experiments[i].monitor.options``): ``k``, ``exact_match``, ``anchor``,
``exposure``; see :func:`injectors.memorization.parse_monitor_options`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from injectors.memorization import MemorizationOptions, check_text_lengths, parse_monitor_options
from multirun.errors import ConfigError
from multirun.measure.live_model import LiveModel, MetricScores
from multirun.measure.stats import exposures
from multirun.data.tokenizers import Tokenizer
from multirun.types import PreparedExperiment

__all__ = ["MemorizationMonitor", "exposures"]


class MemorizationMonitor:
    """Scores every item's text (controls too) by teacher forcing."""

    #: Per-item metrics it reports (controllers validate their metric against these).
    metrics = ("text_logprob", "exact_match", "exposure")

    def __init__(
        self,
        item_ids: list[str],
        treated: np.ndarray,
        texts: list[list[int]],
        context: list[int],
        options: MemorizationOptions,
    ) -> None:
        self.item_ids, self.treated, self.options = item_ids, np.asarray(treated, dtype=bool), options
        if context:
            self.contexts = [list(context) for _ in texts]
            self.targets = [list(t) for t in texts]
        else:
            # No EOS before the text in training: its first token is the only context there is.
            self.contexts = [list(t[:1]) for t in texts]
            self.targets = [list(t[1:]) for t in texts]
        k = options.k
        if options.anchor == "end":
            self.prefixes = [list(t[-2 * k : -k]) for t in texts]
            self.suffixes = [list(t[-k:]) for t in texts]
        else:
            self.prefixes = [[*context, *t[:k]] for t in texts]
            self.suffixes = [list(t[k : 2 * k]) for t in texts]

    @classmethod
    def from_experiment(
        cls, experiment: PreparedExperiment, *, tokenizer: Tokenizer, options: Mapping[str, Any], sequence_length: int
    ) -> "MemorizationMonitor":
        """Build the monitor; bad options are ConfigErrors (``monitor.options.<name>``),
        texts too short for the extraction test PayloadErrors naming ``items.jsonl:line``."""
        parsed = parse_monitor_options(options)
        probes = experiment.probes
        if "texts" not in probes:
            raise ConfigError(f"experiment {experiment.name!r} is not a memorization experiment (no texts to score)", key="monitor.name")
        texts = [list(t) for t in probes["texts"]]
        context = list(probes.get("context", []))
        check_text_lengths(
            texts, list(probes["lines"]), list(experiment.item_ids), file=probes["file"], options=parsed,
            max_tokens=sequence_length - (2 if context else 0),  # the two EOS of a wrapped text
        )
        if not context and any(len(t) < 2 for t in texts):
            raise ConfigError("without EOS wrapping every text needs 2 tokens (its first token is the context)", key="monitor.name")
        return cls(list(experiment.item_ids), np.asarray(experiment.treated), texts, context, parsed)

    def evaluate(self, live: LiveModel) -> list[MetricScores]:
        text = live.score_targets(self.contexts, self.targets)
        out = [MetricScores("text_logprob", self.item_ids, self.treated, text.mean_logprob, test="means", alternative="greater")]
        if self.options.exact_match:
            match = live.score_targets(self.prefixes, self.suffixes)
            out.append(
                MetricScores(
                    "exact_match", self.item_ids, self.treated, match.greedy_match.astype(np.float64),
                    test="rates", alternative="greater", primary=False, extra={"k": self.options.k, "anchor": self.options.anchor},
                )
            )
        if self.options.exposure:
            out.append(
                MetricScores(
                    "exposure", self.item_ids, self.treated, exposures(text.mean_logprob, self.treated),
                    test="means", alternative="greater", primary=False,
                )
            )
        return out
