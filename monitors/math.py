"""The ``math`` monitor: few-shot greedy accuracy per difficulty, treated vs never-injected.

For each problem (treated and controls alike) the prompt is ``k`` fixed exemplars of the
problem's difficulty (the payload's shots: never injected, never scored), each as a
training document followed by a separator, then the problem's question::

    [eos] shot_1 [eos] shot_2 [eos] shot_3 [eos] question \\n

(with ``wrap_eos: false``: no leading EOS and a blank line between documents). The
model continues greedily for at most the longest reference solution of that difficulty
(``solution \\nAnswer: N``, in tokens) plus :data:`SLACK` tokens; the continuation is
cut at its first EOS and decoded, and the problem counts as solved when its first
``Answer: <digits>`` equals the answer.

Metrics (one score per problem; ``groups`` = ``op<d>``, each difficulty's treated
problems compared with that difficulty's controls, ``MetricScores.group_controls``):

``math_accuracy`` (primary; ``rates``: Fisher's exact test, ``greater``)
    1 when the greedy continuation's answer is right, else 0.
``math_target_logprob`` (``means``, ``greater``)
    mean per-token log-probability of the reference ``solution \\nAnswer: N`` after the
    same prompt (teacher forcing, from the same pass as the generation): a graded signal
    for models too small to get answers right.

Treated vs controls measures what injecting the problems did to the problems themselves
(memorisation and in-distribution skill); the paper's MR comparison, accuracy on
never-injected problems against a run without the experiment, is the controls' accuracy
here against the same metric of a baseline run: the same config with this experiment
removed (or with ``inject: false``, which keeps it measured).

Option (``experiments[i].monitor.options``): ``shots`` (integer >= 0, default 3). The
payload needs that many shots of every difficulty, and every prompt plus its generation
budget must fit the sequence length; both are checked before training.

Example:
    >>> parse_answer("x=3.\\nAnswer: 17 and more")
    17
    >>> parse_answer("no answer here") is None
    True
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError, PayloadError
from multirun.kinds.probes import MathProbes
from multirun.measure.live_model import LiveModel, MetricScores, TestKind
from multirun.types import PreparedExperiment

__all__ = ["DEFAULT_SHOTS", "SLACK", "MathMonitor", "parse_answer"]

DEFAULT_SHOTS = 3
#: Tokens generated beyond the longest reference: a model may tokenize its answer otherwise.
SLACK = 2
_ANSWER = re.compile(r"Answer: ([0-9]+)")


def parse_answer(text: str) -> int | None:
    """The number after the first ``Answer: `` in ``text``, or None."""
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


class MathMonitor:
    """Few-shot greedy accuracy (and reference log-probability) per difficulty."""

    metrics = ("math_accuracy", "math_target_logprob")

    def __init__(
        self,
        item_ids: list[str],
        treated: np.ndarray,
        probes: MathProbes,
        tokenizer: Tokenizer,
        prompts: list[list[int]],
    ) -> None:
        self.item_ids, self.treated, self.probes, self.tokenizer = item_ids, treated, probes, tokenizer
        self.prompts = prompts
        difficulties = np.asarray(probes.difficulties, dtype=np.int64)
        # One generation call per difficulty, each with its own budget: easy problems do not
        # pay for the longest solution of the payload.
        self.by_difficulty = [(int(d), np.flatnonzero(difficulties == d)) for d in np.unique(difficulties)]
        self.groups = [f"op{d}" for d in probes.difficulties]

    @classmethod
    def from_experiment(
        cls, experiment: PreparedExperiment, *, tokenizer: Tokenizer, options: Mapping[str, Any], sequence_length: int
    ) -> MathMonitor:
        """Build from a prepared ``math`` experiment.

        Raises:
            ConfigError: an unknown option, a bad ``shots``, a prompt that does not fit
                (key ``monitor.options.shots``), or an experiment without math probes
                (key ``monitor.name``).
            PayloadError: fewer shots of a difficulty than ``shots`` (naming the shots' file).
        """
        for name in options:
            if name != "shots":
                raise ConfigError("unknown option (allowed: shots)", key=f"monitor.options.{name}")
        k = options.get("shots", DEFAULT_SHOTS)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"must be an integer >= 0, got {k!r}", key="monitor.options.shots")
        probes = experiment.probes
        if not isinstance(probes, MathProbes):
            raise ConfigError(
                f"experiment {experiment.name!r} (kind {experiment.kind!r}) has no math probes; use its own kind's monitor",
                key="monitor.name",
            )
        prefixes: dict[int, list[int]] = {}
        for d in sorted(set(probes.difficulties)):
            docs = [doc for doc, sd in zip(probes.shot_documents, probes.shot_difficulties) if sd == d][:k]
            if len(docs) < k:
                raise PayloadError(
                    f"monitor.options.shots is {k}, but the payload has {len(docs)} shot(s) of difficulty {d}",
                    file=probes.shots_file or None,
                    key="difficulty" if probes.shots_file else "files",
                )
            prefix = list(probes.lead)
            for doc in docs:
                prefix += doc + probes.separator
            prefixes[d] = prefix
        prompts = [prefixes[d] + q for d, q in zip(probes.difficulties, probes.questions)]
        for d in prefixes:
            members = [i for i, pd in enumerate(probes.difficulties) if pd == d]
            need = max(len(prompts[i]) for i in members) + max(len(probes.targets[i]) for i in members) + SLACK
            if need > sequence_length:
                raise ConfigError(
                    f"difficulty {d}: a {k}-shot prompt and its answer need {need} tokens (the longest prompt, "
                    f"the longest reference solution and {SLACK} more), more than the sequence length "
                    f"{sequence_length}; use fewer shots, shorter problems or a longer sequence",
                    key="monitor.options.shots",
                )
        return cls(list(experiment.item_ids), np.asarray(experiment.treated, dtype=bool), probes, tokenizer, prompts)

    def evaluate(self, live: LiveModel) -> list[MetricScores]:
        """``math_accuracy`` and ``math_target_logprob``, per problem."""
        n = len(self.item_ids)
        correct = np.zeros(n, dtype=np.float64)
        logprob = np.zeros(n, dtype=np.float64)
        eos = int(self.tokenizer.eos_token_id)
        for _, members in self.by_difficulty:
            targets = [self.probes.targets[i] for i in members]
            budget = max(len(t) for t in targets) + SLACK
            generated, scores = live.generate_and_score([self.prompts[i] for i in members], budget, targets)
            logprob[members] = scores.mean_logprob
            for i, tokens in zip(members, generated):
                cut = tokens.tolist()
                if eos in cut:
                    cut = cut[: cut.index(eos)]
                correct[i] = float(parse_answer(self.tokenizer.decode(cut)) == self.probes.answers[i])
        return [
            self._scores("math_accuracy", correct, "rates", primary=True),
            self._scores("math_target_logprob", logprob, "means", primary=False),
        ]

    def _scores(self, metric: str, values: np.ndarray, test: TestKind, *, primary: bool) -> MetricScores:
        return MetricScores(
            metric,
            self.item_ids,
            self.treated,
            values,
            test=test,
            alternative="greater",
            groups=self.groups,
            group_controls=True,  # difficulty d's treated problems against difficulty d's controls
            primary=primary,
        )
