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
``mia_auc``, ``mia_tpr`` (secondary; tests ``auc`` / ``tpr``; unless ``membership: false``)
    membership inference (:mod:`multirun.measure.membership`, docs/kinds/memorization.md):
    each text's attack score (``membership_score``: ``loss``, the mean log-probability
    of ``text_logprob``, or ``zlib``, its summed log-probability per zlib-compressed
    byte), treated texts (members) against the never-injected controls (non-members):
    the AUC and the TPR at ``fpr`` (default 0.01), with bootstrap intervals, over all
    treated texts and, when the items have more than one dose, per duplication level
    (group ``x<repetitions>``). No extra forward pass.

Options (``experiments[i].monitor.options``, :func:`parse_monitor_options`):

``k`` (integer >= 1, default 16)
    prefix and suffix length, in tokens, of the extraction test.
``exact_match`` (bool, default true)
    run the k-prefix -> k-suffix extraction test; then every text must be at least
    ``2k`` tokens long (:func:`check_text_lengths`; the memorization injector checks
    it before training by building this monitor once).
``anchor`` (``"end"`` or ``"start"``, default ``"end"``)
    where the ``2k`` tokens of the extraction test sit in the text.
``exposure`` (bool, default true)
    report the Secret Sharer exposure.
``membership`` (bool, default true), ``membership_score`` (``loss`` | ``zlib``), ``fpr`` (in (0, 1), default 0.01)
    the membership-inference metrics and their attack score and false-positive rate.

Example:
    >>> parse_monitor_options({"k": 8}).k
    8
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError, PayloadError
from multirun.kinds.probes import MemorizationProbes
from multirun.kinds.sdk import group_label
from multirun.measure.live_model import LiveModel, MetricScores, TestKind
from multirun.measure.membership import DEFAULT_FPR, membership_options, membership_scores
from multirun.measure.stats import exposures
from multirun.types import PreparedExperiment

__all__ = ["MemorizationMonitor", "MemorizationOptions", "check_text_lengths", "exposures", "parse_monitor_options"]

DEFAULT_K = 16


@dataclass(frozen=True)
class MemorizationOptions:
    """The memorization monitor's options (see the module docstring)."""

    k: int = DEFAULT_K
    exact_match: bool = True
    anchor: Literal["end", "start"] = "end"
    exposure: bool = True
    membership: bool = True
    membership_score: Literal["loss", "zlib"] = "loss"
    fpr: float = DEFAULT_FPR


def parse_monitor_options(options: Mapping[str, Any]) -> MemorizationOptions:
    """Validate the memorization monitor's options.

    Raises:
        ConfigError: unknown option or bad value, key ``monitor.options.<name>``.

    Example:
        >>> parse_monitor_options({"anchor": "start", "exposure": False}).anchor
        'start'
    """
    known = {"k", "exact_match", "anchor", "exposure", "membership", "membership_score", "fpr"}
    for name in options:
        if name not in known:
            raise ConfigError(f"unknown option (known: {', '.join(sorted(known))})", key=f"monitor.options.{name}")
    k = options.get("k", DEFAULT_K)
    # bool is an int subclass: `k: true` is a typo, not a length.
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"must be an integer >= 1, got {k!r}", key="monitor.options.k")
    flags = {}
    for name, default in (("exact_match", True), ("exposure", True)):
        value = options.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {value!r}", key=f"monitor.options.{name}")
        flags[name] = value
    anchor = options.get("anchor", "end")
    if anchor not in ("end", "start"):
        raise ConfigError(f"must be 'end' or 'start', got {anchor!r}", key="monitor.options.anchor")
    membership = membership_options(options)
    return MemorizationOptions(
        k=k,
        exact_match=flags["exact_match"],
        anchor=anchor,
        exposure=flags["exposure"],
        membership=membership.enabled,
        membership_score=membership.score,
        fpr=membership.fpr,
    )


def check_text_lengths(
    texts: list[list[int]],
    lines: list[int],
    ids: list[str],
    *,
    file: str | Path,
    options: MemorizationOptions,
    max_tokens: int,
) -> None:
    """Every text must hold the ``2k`` tokens of the extraction test (when it is on).

    ``max_tokens`` is the longest text the sequence holds (sequence length minus the EOS).

    Raises:
        ConfigError: ``2k`` exceeds ``max_tokens`` (no text could ever qualify), key
            ``monitor.options.k``.
        PayloadError: the first text that is too short, naming ``file:line``.
    """
    if not options.exact_match:
        return
    need = 2 * options.k
    if need > max_tokens:
        raise ConfigError(
            f"the extraction test needs 2k = {need} tokens, more than a sequence holds ({max_tokens} text tokens); "
            "lower k or set exact_match: false",
            key="monitor.options.k",
        )
    for tokens, line, item_id in zip(texts, lines, ids):
        if len(tokens) < need:
            raise PayloadError(
                f"item {item_id!r} is {len(tokens)} tokens long; the k-prefix -> k-suffix test (k={options.k}) needs "
                f"at least 2k = {need}: lengthen the text, lower monitor.options.k or set exact_match: false",
                file=file,
                line=line,
                key="text",
            )


class MemorizationMonitor:
    """Scores every item's text (controls too) by teacher forcing.

    Reads :class:`~multirun.kinds.probes.MemorizationProbes`.
    """

    #: Per-item metrics it reports (controllers validate their metric against these).
    metrics = ("text_logprob", "exact_match", "exposure", "mia_auc", "mia_tpr")

    def __init__(
        self,
        item_ids: list[str],
        treated: np.ndarray,
        texts: list[list[int]],
        context: list[int],
        options: MemorizationOptions,
        *,
        repetitions: list[float] | None = None,
        text_bytes: list[bytes] | None = None,
    ) -> None:
        self.item_ids, self.treated, self.options = item_ids, np.asarray(treated, dtype=bool), options
        self.text_bytes = text_bytes
        # Membership inference per duplication level: the treated items' doses, when they differ.
        levels = {r for r, t in zip(repetitions or (), self.treated) if t}
        self.dose_groups = (
            [group_label(int(r)) if float(r).is_integer() else f"x{r:g}" for r in repetitions]
            if repetitions is not None and len(levels) > 1
            else None
        )
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
    ) -> MemorizationMonitor:
        """Build the monitor; bad options are ConfigErrors (``monitor.options.<name>``),
        texts too short for the extraction test PayloadErrors naming ``items.jsonl:line``."""
        parsed = parse_monitor_options(options)
        probes = experiment.probes
        if not isinstance(probes, MemorizationProbes):
            raise ConfigError(
                f"experiment {experiment.name!r} is not a memorization experiment (no texts to score)",
                key="monitor.name",
            )
        texts = [list(t) for t in probes.texts]
        context = list(probes.context)
        check_text_lengths(
            texts,
            list(probes.lines),
            list(experiment.item_ids),
            file=probes.file,
            options=parsed,
            max_tokens=sequence_length - (2 if context else 0),  # the two EOS of a wrapped text
        )
        if not context and any(len(t) < 2 for t in texts):
            raise ConfigError(
                "without EOS wrapping every text needs 2 tokens (its first token is the context)", key="monitor.name"
            )
        reps = experiment.metadata.get("item_repetitions")
        return cls(
            list(experiment.item_ids),
            np.asarray(experiment.treated),
            texts,
            context,
            parsed,
            repetitions=[float(r) for r in reps] if isinstance(reps, list) and len(reps) == len(texts) else None,
            # The zlib score compresses the text itself: its tokens decoded back.
            text_bytes=[tokenizer.decode(t).encode("utf-8", "surrogatepass") for t in texts]
            if parsed.membership_score == "zlib"
            else None,
        )

    def evaluate(self, live: LiveModel) -> list[MetricScores]:
        text = live.score_targets(self.contexts, self.targets)
        out = [
            MetricScores(
                "text_logprob", self.item_ids, self.treated, text.mean_logprob, test="means", alternative="greater"
            )
        ]
        if self.options.exact_match:
            match = live.score_targets(self.prefixes, self.suffixes)
            out.append(
                MetricScores(
                    "exact_match",
                    self.item_ids,
                    self.treated,
                    match.greedy_match.astype(np.float64),
                    test="rates",
                    alternative="greater",
                    primary=False,
                    extra={"k": self.options.k, "anchor": self.options.anchor},
                )
            )
        if self.options.exposure:
            out.append(
                MetricScores(
                    "exposure",
                    self.item_ids,
                    self.treated,
                    exposures(text.mean_logprob, self.treated),
                    test="means",
                    alternative="greater",
                    primary=False,
                )
            )
        if self.options.membership:
            score = membership_scores(
                text.logprob_sum, text.n_tokens, self.text_bytes, kind=self.options.membership_score
            )
            attacks: tuple[tuple[str, TestKind], ...] = (("mia_auc", "auc"), ("mia_tpr", "tpr"))
            for name, test in attacks:
                out.append(
                    MetricScores(
                        name,
                        self.item_ids,
                        self.treated,
                        score,
                        test=test,
                        alternative="greater",
                        groups=self.dose_groups,
                        primary=False,
                        extra={"score": self.options.membership_score, "fpr": self.options.fpr},
                    )
                )
        return out
