"""Monitor of the ``contamination`` kind: does the model prefer the gold answers it was shown?

Metrics (one score per question, treated = contaminated, controls = never injected;
with repetition groups every metric is also reported per group against all controls):

``answer_logprob`` (primary unless ``primary`` says otherwise; ``means``, greater)
    log-probability of the gold answer's tokens given the question prompt (the
    format up to ``{answer}``), by teacher forcing, length-normalised (see
    ``normalization``). The answer-likelihood measure of seen vs held-out questions.
``choice_accuracy`` (secondary; ``rates``, greater; only when the payload has choices)
    ranked classification as in OLMES / TOAA's BC experiment: every choice is scored
    like the answer, the highest-scoring choice is the prediction (the first one on a
    tie), and the item scores 1 if it is the gold answer.
``answer_margin`` (secondary; ``means``, greater; only when the payload has choices)
    the answer's score minus the mean score of the other choices: the continuous
    version of ranked classification. Scoring every choice under the same prompt
    cancels what makes a question easy or hard as a whole, so it is often the more
    sensitive test when the model is small.

Options (``experiments[i].monitor.options``):

``normalization`` (``token`` (default) | ``char`` | ``none``)
    divide a continuation's summed log-probability by its number of tokens, by its
    number of characters (OLMES' ``acc_norm``-style, comparable across tokenizers),
    or not at all. Applies to every metric.
``primary`` (``answer_logprob`` (default) | ``answer_margin`` | ``choice_accuracy``)
    which metric is the experiment's primary one (the one in the run's Holm
    correction); the others become secondary. The last two need choices.

Example (each question's prompt runs once; its choices run on its key/value cache)::

    monitor = ContaminationMonitor.from_experiment(exp, tokenizer=tok, options={}, sequence_length=128)
    answer_logprob, choice_accuracy, answer_margin = monitor.evaluate(live)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError
from multirun.kinds.probes import ContaminationProbes
from multirun.kinds.sdk import group_label
from multirun.measure.live_model import LiveModel, MetricScores, TestKind
from multirun.types import PreparedExperiment

__all__ = ["ContaminationMonitor", "normalise"]

_NORMALIZATIONS = ("token", "char", "none")
_METRICS = ("answer_logprob", "answer_margin", "choice_accuracy")
_OPTIONS = ("normalization", "primary")


def normalise(logprob_sum: np.ndarray, n_tokens: np.ndarray, n_chars: np.ndarray, how: str) -> np.ndarray:
    """Summed log-probabilities divided by the continuation's length in ``how`` units.

    Example:
        >>> normalise(np.array([-6.0]), np.array([3]), np.array([2]), "token").tolist()
        [-2.0]
    """
    if how == "token":
        return logprob_sum / np.maximum(n_tokens, 1)
    if how == "char":
        return logprob_sum / np.maximum(n_chars, 1)
    return np.asarray(logprob_sum, dtype=np.float64)


class ContaminationMonitor:
    """Scores each question's gold answer (and its choices) on the live model.

    Reads :class:`~multirun.kinds.probes.ContaminationProbes`.

    Args:
        item_ids, treated: the experiment's items and arms.
        contexts: per item, the prompt tokens the answer is conditioned on.
        answers, answer_texts: per item, the gold answer's tokens and text.
        choices, choice_texts, answer_index: per item, the choices' tokens and texts
            and the gold answer's index among them; None when the payload has none.
        groups: per item repetition group (0 = control), or None.
        normalization: ``token``, ``char`` or ``none``.
        primary: the primary metric's name.
    """

    #: Per-item metrics it reports (controllers validate their metric against these);
    #: the last two only when the payload has choices.
    metrics = ("answer_logprob", "choice_accuracy", "answer_margin")

    def __init__(
        self,
        item_ids: list[str],
        treated: np.ndarray,
        contexts: Sequence[Sequence[int]],
        answers: Sequence[Sequence[int]],
        answer_texts: Sequence[str],
        *,
        choices: Sequence[Sequence[Sequence[int]]] | None = None,
        choice_texts: Sequence[Sequence[str]] | None = None,
        answer_index: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        normalization: str = "token",
        primary: str = "answer_logprob",
    ) -> None:
        self.item_ids = list(item_ids)
        self.treated = np.asarray(treated, dtype=bool)
        self.contexts = [list(c) for c in contexts]
        self.answers = [list(a) for a in answers]
        self.answer_texts = list(answer_texts)
        self.choices = None if choices is None else [[list(c) for c in cs] for cs in choices]
        self.choice_texts = None if choice_texts is None else [list(cs) for cs in choice_texts]
        self.answer_index = None if answer_index is None else list(answer_index)
        self.groups = None if groups is None else [group_label(int(g)) for g in groups]
        self.normalization = normalization
        self.primary = primary

    @classmethod
    def from_experiment(
        cls, experiment: PreparedExperiment, *, tokenizer: Tokenizer, options: Mapping[str, Any], sequence_length: int
    ) -> ContaminationMonitor:
        """Build from a prepared ``contamination`` experiment.

        Raises:
            ConfigError: an unknown option or value (key ``monitor.options.<name>``),
                or an experiment without contamination probes (key ``monitor.name``).
        """
        for name in options:
            if name not in _OPTIONS:
                raise ConfigError(f"unknown option (allowed: {', '.join(_OPTIONS)})", key=f"monitor.options.{name}")
        normalization = options.get("normalization", "token")
        if normalization not in _NORMALIZATIONS:
            raise ConfigError(
                f"must be one of {', '.join(_NORMALIZATIONS)}; got {normalization!r}",
                key="monitor.options.normalization",
            )
        primary = options.get("primary", "answer_logprob")
        if primary not in _METRICS:
            raise ConfigError(f"must be one of {', '.join(_METRICS)}; got {primary!r}", key="monitor.options.primary")
        probes = experiment.probes
        if not isinstance(probes, ContaminationProbes):
            raise ConfigError(
                f"experiment {experiment.name!r} (kind {experiment.kind!r}) has no contamination probes; use its own kind's monitor",
                key="monitor.name",
            )
        if primary != "answer_logprob" and probes.choices is None:
            raise ConfigError(
                f"{primary} needs choices, and the payload of {experiment.name!r} has none",
                key="monitor.options.primary",
            )
        return cls(
            list(experiment.item_ids),
            np.asarray(experiment.treated, dtype=bool),
            probes.contexts,
            probes.answers,
            probes.answer_texts,
            choices=probes.choices,
            choice_texts=probes.choice_texts,
            answer_index=probes.answer_index,
            groups=probes.groups,
            normalization=normalization,
            primary=primary,
        )

    def evaluate(self, live: LiveModel) -> list[MetricScores]:
        """``answer_logprob`` and, with choices, ``choice_accuracy`` and ``answer_margin``."""
        if self.choices is None:
            scores = live.score_targets(self.contexts, self.answers)
            chars = np.array([len(t) for t in self.answer_texts])
            answer = normalise(scores.logprob_sum, scores.n_tokens, chars, self.normalization)
            return [self._metric("answer_logprob", answer, "means")]

        assert self.choice_texts is not None and self.answer_index is not None
        # Every choice on its question's shared context, in one sharded call; the gold answer
        # is one of the choices (same text, same tokens), so its score comes from the same pass.
        scores = live.score_continuations(self.contexts, self.choices)
        chars = np.array([len(t) for ts in self.choice_texts for t in ts])
        flat = normalise(scores.logprob_sum, scores.n_tokens, chars, self.normalization)
        starts = np.concatenate([[0], np.cumsum([len(cs) for cs in self.choices])[:-1]])
        answer = np.array([flat[s + k] for s, k in zip(starts, self.answer_index)])
        # np.argmax takes the first maximum: ties go to the earlier choice, deterministically.
        predicted = np.array([int(np.argmax(flat[s : s + len(cs)])) for s, cs in zip(starts, self.choices)])
        correct = (predicted == np.asarray(self.answer_index)).astype(np.float64)
        others = np.array(
            [(flat[s : s + len(cs)].sum() - a) / (len(cs) - 1) for s, cs, a in zip(starts, self.choices, answer)]
        )
        return [
            self._metric("answer_logprob", answer, "means"),
            self._metric("choice_accuracy", correct, "rates"),
            self._metric("answer_margin", answer - others, "means"),
        ]

    def _metric(self, name: str, values: np.ndarray, test: TestKind) -> MetricScores:
        return MetricScores(
            name,
            self.item_ids,
            self.treated,
            values,
            test=test,
            alternative="greater",
            groups=self.groups,
            primary=name == self.primary,
        )
