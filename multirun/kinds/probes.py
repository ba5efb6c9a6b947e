"""Typed probes of the built-in kinds: the contract between each kind's injector and monitor.

An injector puts one of these in :attr:`multirun.types.PreparedExperiment.probes`; the
monitor of the same kind checks its type (a ConfigError with key ``monitor.name`` when
an experiment of another kind is given to it) and reads its attributes. Injector and
monitor are separate plugins that never import each other, so the classes live here,
in the core. A plugin kind defines its own probes dataclass (``docs/writing-a-kind.md``).

Every list is parallel to the experiment's ``item_ids`` unless its description says
otherwise; token lists are plain ``list[int]`` (watermark: numpy arrays).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ContaminationProbes",
    "DocumentsProbes",
    "KnowledgeProbes",
    "MemorizationProbes",
    "PoisonProbes",
    "WatermarkProbes",
]


@dataclass
class DocumentsProbes:
    """``documents``: every item's EOS-wrapped tokens, controls too.

    ``groups``: optional label per item (a condition, e.g. ``x1``/``x8`` or ``late``): the
    monitor then also reports each group of treated items against all controls.
    """

    sequences: list[list[int]]
    groups: list[str] | None = None


@dataclass
class ContaminationProbes:
    """``contamination``, per question.

    Attributes:
        contexts: ``[eos] prompt`` tokens (the format up to ``{answer}``).
        answers, answer_texts: the gold answer's tokens and text.
        choices, choice_texts: the choices' tokens and texts; None without choices.
        answer_index: the gold answer's index among the choices; None without choices.
        groups: repetition group (0 = control); None without groups.
    """

    contexts: list[list[int]]
    answers: list[list[int]]
    answer_texts: list[str]
    choices: list[list[list[int]]] | None = None
    choice_texts: list[list[str]] | None = None
    answer_index: list[int] | None = None
    groups: list[int] | None = None


@dataclass
class KnowledgeProbes:
    """``knowledge``, flat over all probes of all facts, in payload order.

    Attributes:
        probe_items: per probe, the index of its fact in ``item_ids``.
        contexts, targets: per probe, the question's and the target's tokens.
        questions, target_texts: per probe, the strings.
    """

    probe_items: list[int]
    contexts: list[list[int]]
    targets: list[list[int]]
    questions: list[str]
    target_texts: list[str]


@dataclass
class MemorizationProbes:
    """``memorization``.

    Attributes:
        texts: every item's text tokens without EOS, controls too.
        lines: the JSONL line of each item; ``file``: the path of ``items.jsonl``
            (the monitor's payload errors name them).
        context: the tokens that precede a text in training (``[eos]``, or ``[]``).
    """

    texts: list[list[int]]
    lines: list[int]
    file: str
    context: list[int]


@dataclass
class PoisonProbes:
    """``poison``: the evaluation prompts (never injected) and the backdoor's pieces.

    Attributes:
        eval_ids, eval_prompts, eval_behaviour, eval_source: per evaluation prompt, its
            id, tokens, behaviour-text tokens and ``control`` / ``heldout``.
        start: ``[eos]`` or ``[]``.
        trigger, control_trigger: tokens.
        behaviour: ``target`` | ``gibberish`` | ``repeat``.
        target: the target string (``behaviour: target``), else None.
        gibberish_alphabet: the alphabet (``behaviour: gibberish``), else None.
    """

    eval_ids: list[str]
    eval_prompts: list[list[int]]
    eval_behaviour: list[list[int]]
    eval_source: list[str]
    start: list[int]
    trigger: list[int]
    control_trigger: list[int]
    behaviour: str
    target: str | None
    gibberish_alphabet: str | None


@dataclass
class WatermarkProbes:
    """``watermark``.

    Attributes:
        method: ``gaussian`` or ``random_tokens``.
        sequences: gaussian: every item's EOS-wrapped tokens (int64 arrays), controls
            included: exactly what is injected and noised.
        keys: random_tokens: ``(items, key_length)`` int64.
        context: random_tokens: the tokens each key is scored after (``[eos]``).
    """

    method: str
    sequences: list[np.ndarray] | None = None
    keys: np.ndarray | None = None
    context: np.ndarray | None = None
