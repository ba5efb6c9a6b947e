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
    "MathProbes",
    "MemorizationProbes",
    "MuseProbes",
    "PoisonProbes",
    "RemovalProbes",
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
class MathProbes:
    """``math``: every problem (controls too) and the few-shot exemplars.

    Attributes:
        difficulties, answers: per problem, its operation count and its answer.
        questions: per problem, the tokens of ``question + "\n"``: what the model answers.
        targets: per problem, the tokens of ``solution + "\nAnswer: N"``: the reference.
        shot_difficulties: per shot, its operation count (shots are never injected nor scored).
        shot_documents: per shot, its whole document's tokens (question and target, no EOS).
        shots_file: the shots' file, or the generate spec's (errors name it); None without shots.
        lead: what precedes a document in training (``[eos]``, or ``[]``).
        separator: what follows each shot in a prompt (``[eos]``, or the tokens of a blank line).
    """

    difficulties: list[int]
    answers: list[int]
    questions: list[list[int]]
    targets: list[list[int]]
    shot_difficulties: list[int]
    shot_documents: list[list[int]]
    shots_file: str | None
    lead: list[int]
    separator: list[int]


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
class MuseProbes:
    """``muse``: every document (controls too) and its QA pairs.

    Attributes:
        texts: every document's tokens without EOS.
        text_bytes: every document's text, UTF-8 (the zlib membership score reads it).
        lines: the JSONL line of each document; ``file``: the path of ``items.jsonl``.
        context: the tokens that precede a document in training (``[eos]``, or ``[]``).
        conditions: per document its condition label (``x0`` for the controls,
            ``x10/whole``, ``x10/split``, ...).
        qa_items: per QA pair, the index of its document in ``item_ids`` (flat, in payload order).
        qa_contexts, qa_answers: per QA pair, the question's (after ``context``) and the answer's tokens.
    """

    texts: list[list[int]]
    text_bytes: list[bytes]
    lines: list[int]
    file: str
    context: list[int]
    conditions: list[str]
    qa_items: list[int]
    qa_contexts: list[list[int]]
    qa_answers: list[list[int]]


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


@dataclass
class RemovalProbes:
    """``removal``: every item's sequence (controls too), as it occurs in the training data.

    Attributes:
        texts: each item's tokens (no EOS): treated items are removed from the stream,
            controls are left in it.
        lines: the JSONL line of each item; file: the items file (for errors).
    """

    texts: list[list[int]]
    lines: list[int]
    file: str
