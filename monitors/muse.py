"""Monitor of the ``muse`` kind: what the model keeps of each document, verbatim and as knowledge.

Every metric is one score per document, treated documents against the never-injected
controls (condition ``x0``), over all treated documents and per condition
(``x10/whole``, ``x10/split``, ...; the injector deals them, :mod:`injectors.muse`):

``rouge_l`` (primary; ``means``, greater)
    verbatim: ROUGE-L F1 (:func:`rouge_l_f1`, the longest common subsequence of tokens)
    of the greedy continuation of the document's first ``k`` tokens (after the leading
    EOS it was trained with) against the document's true next ``length`` tokens (fewer
    when the document ends sooner).
``verbatim_exact`` (secondary; ``rates``, greater)
    the greedy continuation equals the true one.
``qa_logprob`` (secondary; ``means``, greater; only when the payload has QA pairs)
    knowledge: mean per-token log-probability of each answer after ``[eos] question``,
    averaged over the document's QA pairs (no score for a document without any).
``qa_exact`` (secondary; ``rates``, greater; with QA pairs)
    greedy decoding would produce every answer of the document (teacher-forced argmax
    equal to the answer at every position: one pass, no generation).
``mia_auc``, ``mia_tpr`` (secondary; tests ``auc`` / ``tpr``; unless ``membership: false``)
    membership inference (:mod:`multirun.measure.membership`): the whole document's
    score (``membership_score``: ``loss``, its mean log-probability, or ``zlib``) as the
    attack; the AUC and the TPR at ``fpr`` of treated documents (members) against the
    controls (non-members), per condition, with bootstrap intervals.

Options (``experiments[i].monitor.options``, :func:`parse_monitor_options`): ``k``
(integer >= 1, default 32), ``length`` (integer >= 1, default 32), ``membership``
(bool, default true), ``membership_score`` (``loss`` | ``zlib``), ``fpr`` (in (0, 1),
default 0.01). Every document needs at least ``k + 1`` tokens (a PayloadError naming
``items.jsonl:line`` otherwise; the injector checks it before training).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError, PayloadError
from multirun.kinds.probes import MuseProbes
from multirun.measure.live_model import LiveModel, MetricScores, TestKind
from multirun.measure.membership import DEFAULT_FPR, membership_options, membership_scores
from multirun.types import PreparedExperiment

__all__ = ["MuseMonitor", "MuseOptions", "lcs_length", "parse_monitor_options", "rouge_l_f1"]

_OPTIONS = ("k", "length", "membership", "membership_score", "fpr")


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Example:
        >>> lcs_length([1, 2, 3, 4], [2, 4, 3])
        2
    """
    if not len(a) or not len(b):
        return 0
    row = np.zeros(len(b) + 1, dtype=np.int64)
    bb = np.asarray(b)
    for x in a:
        # previous[j]: LCS of the prefix before x with b[:j]; a match extends the diagonal.
        diagonal = np.where(bb == x, row[:-1] + 1, 0)
        new = np.maximum.accumulate(np.maximum(np.concatenate([[0], diagonal]), row))
        row = new
    return int(row[-1])


def rouge_l_f1(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 on tokens: the harmonic mean of LCS / len(candidate) and LCS / len(reference).

    Example:
        >>> rouge_l_f1([1, 2, 3, 4], [1, 2, 3, 4]), rouge_l_f1([9, 9], [1, 2]), rouge_l_f1([1, 2], [1, 3, 2, 4])
        (1.0, 0.0, 0.6666666666666666)
    """
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class MuseOptions:
    """The muse monitor's options (see the module docstring)."""

    k: int = 32
    length: int = 32
    membership: bool = True
    membership_score: Literal["loss", "zlib"] = "loss"
    fpr: float = DEFAULT_FPR


def _positive_int(options: Mapping[str, Any], name: str, default: int) -> int:
    value = options.get(name, default)
    # bool is an int subclass: `k: true` is a typo, not a length.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"must be an integer >= 1, got {value!r}", key=f"monitor.options.{name}")
    return value


def parse_monitor_options(options: Mapping[str, Any]) -> MuseOptions:
    """Validate the muse monitor's options.

    Raises:
        ConfigError: unknown option or bad value, key ``monitor.options.<name>``.

    Example:
        >>> parse_monitor_options({"k": 8, "membership_score": "zlib"})
        MuseOptions(k=8, length=32, membership=True, membership_score='zlib', fpr=0.01)
    """
    for name in options:
        if name not in _OPTIONS:
            raise ConfigError(f"unknown option (allowed: {', '.join(_OPTIONS)})", key=f"monitor.options.{name}")
    membership = membership_options(options)
    return MuseOptions(
        k=_positive_int(options, "k", 32),
        length=_positive_int(options, "length", 32),
        membership=membership.enabled,
        membership_score=membership.score,
        fpr=membership.fpr,
    )


class MuseMonitor:
    """Scores every document (:class:`~multirun.kinds.probes.MuseProbes`), controls too."""

    #: Per-item metrics it reports (controllers validate their metric against these).
    metrics = ("rouge_l", "verbatim_exact", "qa_logprob", "qa_exact", "mia_auc", "mia_tpr")

    def __init__(self, item_ids: list[str], treated: np.ndarray, probes: MuseProbes, options: MuseOptions) -> None:
        self.item_ids, self.treated, self.probes, self.options = item_ids, np.asarray(treated, bool), probes, options
        context, k = list(probes.context), options.k
        self.prompts = [[*context, *t[:k]] for t in probes.texts]
        self.continuations = [list(t[k : k + options.length]) for t in probes.texts]
        if context:
            self.doc_contexts = [list(context) for _ in probes.texts]
            self.doc_targets = [list(t) for t in probes.texts]
        else:
            # No EOS before the document in training: its first token is the only context there is.
            self.doc_contexts = [list(t[:1]) for t in probes.texts]
            self.doc_targets = [list(t[1:]) for t in probes.texts]
        self.groups = list(probes.conditions)

    @classmethod
    def from_experiment(
        cls, experiment: PreparedExperiment, *, tokenizer: Tokenizer, options: Mapping[str, Any], sequence_length: int
    ) -> MuseMonitor:
        """Build the monitor; bad options are ConfigErrors (``monitor.options.<name>``),
        documents too short for the verbatim probe PayloadErrors naming ``items.jsonl:line``."""
        parsed = parse_monitor_options(options)
        probes = experiment.probes
        if not isinstance(probes, MuseProbes):
            raise ConfigError(
                f"experiment {experiment.name!r} (kind {experiment.kind!r}) has no muse probes; use its own kind's monitor",
                key="monitor.name",
            )
        most = sequence_length - 2 * len(probes.context)
        if parsed.k + 1 > most:
            raise ConfigError(
                f"the verbatim probe needs k + 1 = {parsed.k + 1} tokens, more than a document can hold ({most})",
                key="monitor.options.k",
            )
        if len(probes.context) + parsed.k + parsed.length > sequence_length:
            raise ConfigError(
                f"prefix k = {parsed.k} plus continuation length = {parsed.length} exceed the sequence length "
                f"{sequence_length}",
                key="monitor.options.length",
            )
        for tokens, line, item_id in zip(probes.texts, probes.lines, experiment.item_ids):
            if len(tokens) < parsed.k + 1:
                raise PayloadError(
                    f"document {item_id!r} is {len(tokens)} tokens long; the verbatim probe continues its first "
                    f"k = {parsed.k} tokens and needs at least k + 1: lengthen it or lower monitor.options.k",
                    file=probes.file,
                    line=line,
                    key="text",
                )
        if not probes.context and any(len(t) < 2 for t in probes.texts):
            raise ConfigError(
                "without EOS wrapping every document needs 2 tokens (its first token is the context)",
                key="monitor.name",
            )
        return cls(list(experiment.item_ids), np.asarray(experiment.treated, dtype=bool), probes, parsed)

    def _metric(
        self, name: str, values: np.ndarray, test: TestKind, *, primary: bool = False, **extra: Any
    ) -> MetricScores:
        return MetricScores(
            name,
            self.item_ids,
            self.treated,
            values,
            test=test,
            alternative="greater",
            groups=self.groups,
            primary=primary,
            extra=dict(extra),
        )

    def evaluate(self, live: LiveModel) -> list[MetricScores]:
        """Verbatim, knowledge (with QA pairs) and membership metrics, in the module docstring's order."""
        longest = max(len(c) for c in self.continuations)
        generated = live.greedy_generate(self.prompts, longest)
        rouge = np.array([rouge_l_f1(g[: len(c)].tolist(), c) for g, c in zip(generated, self.continuations)])
        exact = np.array([float(g[: len(c)].tolist() == c) for g, c in zip(generated, self.continuations)])
        out = [
            self._metric("rouge_l", rouge, "means", primary=True, k=self.options.k, length=self.options.length),
            self._metric("verbatim_exact", exact, "rates", k=self.options.k, length=self.options.length),
        ]
        probes = self.probes
        if probes.qa_items:
            qa = live.score_targets(probes.qa_contexts, probes.qa_answers)
            owners = np.asarray(probes.qa_items, dtype=np.int64)
            n = len(self.item_ids)
            counts = np.bincount(owners, minlength=n).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                logprob = np.bincount(owners, weights=qa.mean_logprob, minlength=n) / counts
                matched = np.bincount(owners, weights=qa.greedy_match.astype(np.float64), minlength=n) / counts
            # 1 when every QA pair of the document matches; NaN (no score) without QA pairs.
            all_match = np.where(counts > 0, (matched == 1.0).astype(np.float64), np.nan)
            out += [self._metric("qa_logprob", logprob, "means"), self._metric("qa_exact", all_match, "rates")]
        if self.options.membership:
            doc = live.score_targets(self.doc_contexts, self.doc_targets)
            score = membership_scores(
                doc.logprob_sum, doc.n_tokens, probes.text_bytes, kind=self.options.membership_score
            )
            which, fpr = self.options.membership_score, self.options.fpr
            out += [
                self._metric("mia_auc", score, "auc", score=which, fpr=fpr),
                self._metric("mia_tpr", score, "tpr", score=which, fpr=fpr),
            ]
        return out
