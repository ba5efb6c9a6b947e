"""The ``slogans`` kind: short slogans after a fixed prefix; does the model learn them?

Payload package (``payload.yaml``: ``kind: slogans``), role ``items``, one object a line::

    {"id": "slogan-00", "slogan": "amber lanterns never sleep", "repetitions": 8}

Injector option ``prefix`` (string, default ``"Our motto: "``): each treated item is
injected as ``[eos] prefix slogan [eos]``. The monitor scores the slogan's tokens after
``[eos] prefix``, treated slogans against never-injected ones (metric
``slogan_logprob``).

Everything here imports from ``multirun`` only: the injector hands the monitor what it
needs through :class:`SloganProbes`, never through an import of the other class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError, PayloadError
from multirun.kinds.sdk import PrepareContext
from multirun.measure.live_model import LiveModel, MetricScores
from multirun.types import PreparedExperiment

DEFAULT_PREFIX = "Our motto: "


@dataclass
class SloganProbes:
    """What the monitor scores, for every item (controls too), parallel to ``item_ids``."""

    contexts: list[list[int]]  # [eos] prefix
    targets: list[list[int]]  # the slogan's tokens


class SlogansInjector:
    """Injects ``[eos] prefix slogan [eos]`` for each treated slogan."""

    kind = "slogans"

    def prepare(self, ctx: PrepareContext) -> PreparedExperiment:
        options = dict(ctx.spec.options)
        prefix = options.pop("prefix", DEFAULT_PREFIX)
        for name in options:  # a bad option names its key; the framework adds file and entry
            raise ConfigError("unknown option (allowed: prefix)", key=f"options.{name}")
        if not isinstance(prefix, str):
            raise ConfigError(f"must be a string, got {prefix!r}", key="options.prefix")

        records = ctx.read_items(
            required={"id": str, "slogan": str}, optional={"repetitions": float}, text_keys=("slogan",)
        )
        path = ctx.payload.path("items")
        lead = [ctx.eos] if ctx.spec.wrap_eos else []
        context = lead + ctx.encode(prefix, wrap_eos=False)
        contexts, targets, sequences = [], [], []
        # Every item, controls too, is tokenized and length-checked: whether a payload
        # fits must not depend on how the seed splits the arms.
        for line, rec in records:
            target = ctx.encode(rec["slogan"], wrap_eos=False)
            sequence = context + target + lead
            if len(sequence) > ctx.sequence_length:
                raise PayloadError(
                    f"prefix + slogan are {len(sequence)} tokens, longer than the sequence length {ctx.sequence_length}",
                    file=path,
                    line=line,
                    key="slogan",
                )
            contexts.append(list(context))
            targets.append(target)
            sequences.append(sequence)

        treated = ctx.split_arms(len(records))  # seeded by the run seed and the experiment's split key
        reps = [float(rec.get("repetitions", ctx.spec.repetitions)) for _, rec in records]
        seq_items = np.flatnonzero(treated)  # one sequence per treated item; controls own none
        return ctx.experiment(
            self.kind,
            item_ids=[rec["id"] for _, rec in records],
            treated=treated,
            sequences=[sequences[i] for i in seq_items],
            seq_items=seq_items,
            seq_repetitions=[reps[i] for i in seq_items],
            metadata={"prefix": prefix, "item_repetitions": reps},  # plain data, written to manifest.json
            probes=SloganProbes(contexts=contexts, targets=targets),
        )


class SlogansMonitor:
    """Mean per-token log-probability of each slogan after its prefix."""

    metrics = ("slogan_logprob",)

    def __init__(self, item_ids: list[str], treated: np.ndarray, probes: SloganProbes) -> None:
        self.item_ids, self.treated, self.probes = item_ids, treated, probes

    @classmethod
    def from_experiment(
        cls, experiment: PreparedExperiment, *, tokenizer: Tokenizer, options: Mapping[str, Any], sequence_length: int
    ) -> SlogansMonitor:
        for name in options:
            raise ConfigError("the slogans monitor takes no options", key=f"monitor.options.{name}")
        if not isinstance(experiment.probes, SloganProbes):
            raise ConfigError(
                f"experiment {experiment.name!r} (kind {experiment.kind!r}) has no slogan probes", key="monitor.name"
            )
        return cls(list(experiment.item_ids), np.asarray(experiment.treated, dtype=bool), experiment.probes)

    def evaluate(self, live: LiveModel) -> list[MetricScores]:
        scores = live.score_targets(self.probes.contexts, self.probes.targets)  # one sharded teacher-forced pass
        return [
            MetricScores(
                "slogan_logprob", self.item_ids, self.treated, scores.mean_logprob, test="means", alternative="greater"
            )
        ]
