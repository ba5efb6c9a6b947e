"""The ``budget`` controller: a fixed rate until a token budget is spent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from multirun.control.controllers.base import ControllerBase
from multirun.control.controllers.decision import ControllerDecision
from multirun.control.controllers.options import Option, at_least_one, positive
from multirun.errors import ConfigError
from multirun.measure.records import EvaluationRecord
from multirun.types import PreparedExperiment

__all__ = ["BudgetController"]


class BudgetController(ControllerBase):
    """``rate`` spans per treated item per window until ``max_tokens`` would be exceeded.

    Spans are requested round-robin (every item's first span, then every item's
    second, ...), each item cycling through its sequences. The tokens of every
    requested span are added to the state; the first span that would take the
    total over ``max_tokens`` is not requested, and the controller stops for good.
    Requested spans that could not be placed still count, so the budget is never
    exceeded by what was trained on.
    """

    name: ClassVar[str] = "budget"
    OPTIONS: ClassVar[dict[str, Option]] = {
        "max_tokens": Option(int, help="most tokens this experiment may inject dynamically", check=positive),
        "rate": Option(int, 1, at_least_one, "spans per item per window"),
    }

    def __init__(
        self, experiment: PreparedExperiment, *, max_tokens: int, rate: int = 1, window_steps: int, num_steps: int
    ) -> None:
        super().__init__(experiment, window_steps=window_steps, num_steps=num_steps)
        self.max_tokens, self.rate = int(max_tokens), int(rate)
        self.lengths = np.asarray(experiment.seq_lengths, dtype=np.int64)
        self.tokens = 0
        self.exhausted = False
        self.next: dict[str, int] = dict.fromkeys(self.treated_items, 0)

    @classmethod
    def validate_experiment(cls, opts: dict[str, Any], experiment: PreparedExperiment) -> None:
        treated = np.asarray(experiment.treated, dtype=bool)
        treated_seqs = np.flatnonzero(treated[np.asarray(experiment.seq_items, dtype=np.int64)])
        shortest = int(np.asarray(experiment.seq_lengths)[treated_seqs].min())
        if opts["max_tokens"] < shortest:
            raise ConfigError(
                f"max_tokens {opts['max_tokens']} is below the shortest treated sequence ({shortest} tokens): "
                "nothing could ever be injected",
                key="controller.max_tokens",
            )

    def decide(
        self, *, step: int, records: Sequence[EvaluationRecord], experiment: PreparedExperiment, num_steps: int
    ) -> ControllerDecision:
        lo, hi = self._begin(step, experiment, num_steps)
        chosen: dict[str, list[int]] = {}
        window_tokens = 0
        if hi > lo and not self.exhausted:
            for r in range(self.rate):
                for item in self.treated_items:
                    seqs = self.seqs_of(item)
                    if not seqs.size:
                        continue
                    s = int(seqs[(self.next[item] + r) % seqs.size])
                    if self.tokens + window_tokens + int(self.lengths[s]) > self.max_tokens:
                        self.exhausted = True
                        break
                    chosen.setdefault(item, []).append(s)
                    window_tokens += int(self.lengths[s])
                if self.exhausted:
                    break
            for item, picked in chosen.items():
                self.next[item] = (self.next[item] + len(picked)) % self.seqs_of(item).size
        self.tokens += window_tokens
        info = {
            "tokens": self.tokens,
            "window_tokens": window_tokens,
            "remaining_tokens": self.max_tokens - self.tokens,
            "max_tokens": self.max_tokens,
            "exhausted": self.exhausted,
            "spans": int(sum(len(v) for v in chosen.values())),
        }
        return self._decision(step, (lo, hi), chosen, info)

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "tokens": self.tokens, "exhausted": self.exhausted, "next": dict(self.next)}

    def load_state_dict(self, state: dict) -> None:
        self._load_base(state)
        self._check_items(state.get("next", {}))
        self.tokens, self.exhausted = int(state["tokens"]), bool(state["exhausted"])
        self.next = {item: int(state["next"][item]) for item in self.treated_items}
