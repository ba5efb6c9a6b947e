"""The ``contamination`` injector: benchmark questions with their answers, at chosen doses.

Benchmark contamination as in Train Once, Answer All (BC) and Hubble: each treated
question is injected together with its ground-truth answer in a fixed prompt format,
a chosen number of times, and the monitor compares the answer's likelihood (and the
ranked-classification accuracy) on contaminated questions with never-seen ones.

Payload package
---------------
``payload.yaml``: ``kind: contamination``; one file with role ``items``.

``items.jsonl``, one object a line::

    {"id": "q-000", "question": "What colour is the flag of Quorvia?", "answer": "teal",
     "choices": ["teal", "amber", "crimson", "olive"], "group": 8}

==========  ===========================  =====================================================
key         type                         meaning
==========  ===========================  =====================================================
id          string, required, unique     the item (question) id
question    string, required, non-empty  the question text, substituted for ``{question}``
answer      string, required, non-empty  the gold answer, substituted for ``{answer}``
choices     list of strings, optional    answer options for ranked classification: at least
                                         2, distinct, non-empty, containing ``answer``;
                                         either every item has choices or none has
group       integer >= 0, optional       repetition group: ``0`` = never injected (control),
                                         ``g`` = injected ``g`` times; either every item has a
                                         group or none has (a string of ASCII digits such as
                                         ``"16"`` is accepted; full-width or other scripts'
                                         digits are not)
arm_key     string, optional             items with the same ``arm_key`` are one unit of the arm
                                         split: all treated or all controls, in one group
                                         (``multirun payload import`` sets it on questions whose
                                         prompts are duplicates); an item without one is a unit
                                         of its own
==========  ===========================  =====================================================

Arms and doses
--------------
* Items carry ``group`` (and no ``assign_groups`` option): the payload's groups decide.
  Group 0 items are the controls, an item of group ``g`` is injected ``g`` times. At
  least one item must be in group 0, and at least one in a group > 0. Doses are checked
  against the run before anything is planned: ``g`` times the item's tokens (summed
  over the items) must fit in the placement's steps under the per-step cap, else the
  item with the largest dose is named (file, line, ``group``).
* Option ``assign_groups: [0, 4, 16]``: questions are dealt at random (seeded by the
  run seed and the experiment name) into equally sized groups (sizes differ by at most
  one), whatever groups the payload carries. Randomising the assignment avoids the
  systematic group bias that TOAA observed when groups were fixed by hand.
* No groups at all: ``control_fraction`` of the items are controls
  (:func:`~multirun.kinds.sdk.split_arms`), every treated item is injected
  ``repetitions`` times.

With ``arm_key`` values, the split (or the random group assignment) is drawn over the distinct
keys, in order of first appearance, and every item takes its key's arm: a duplicated
question can then never be treated under one id and a control under another. The
payload's ``group`` values must agree within a key. Without ``arm_key`` (or with every key distinct) the
draw is the one over the items, unchanged.

When groups decide the arms, setting ``repetitions`` or ``control_fraction`` in the
experiment is an error (it would be silently ignored otherwise).

Options (``experiments[i].options``)
------------------------------------
``format`` (string, default ``"Q: {question}\\nA: {answer}"``)
    the injected text; must contain ``{question}`` and then ``{answer}`` once each
    (``{{``/``}}`` write literal braces). The part before ``{answer}`` (with the
    question filled in) is the *prompt* the monitor conditions on; text after
    ``{answer}`` is injected but not scored.
``assign_groups`` (list of distinct integers >= 0 including 0, at least two)
    randomise the repetition groups, see above.

Tokens
------
Prompt, answer and the rest of the format are tokenized separately and concatenated,
so the monitor scores exactly the tokens that were trained on (with a BPE tokenizer,
put the space where the answer's tokens should start, e.g. ``"A:{answer}"`` with
answers ``" Paris"``). The injected sequence is ``[eos] prompt answer rest [eos]``
(without the EOS when ``wrap_eos: false``); the monitor's context is ``[eos] prompt``
(``prompt`` alone without wrapping). Every item, controls included, must fit the
sequence length, for the answer and for every choice.

Example:
    >>> split_format("Q: {question}\\nA: {answer}.")
    ('Q: ', '\\nA: ', '.')
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from multirun.errors import ConfigError, PayloadError
from multirun.kinds.probes import ContaminationProbes
from multirun.kinds.sdk import PrepareContext, RandomStream, encode_sequence, is_blank
from multirun.types import PreparedExperiment

if TYPE_CHECKING:
    from pathlib import Path

    from multirun.config import ExperimentConfig

__all__ = ["DEFAULT_FORMAT", "ContaminationInjector", "split_format"]

DEFAULT_FORMAT = "Q: {question}\nA: {answer}"
_OPTIONS = ("format", "assign_groups")

# The random group assignment draws from the arm stream (RandomStream.ARMS, keyed by
# the split key): the assignment *is* the arm split of this kind, and documents-style
# arms are not drawn when groups decide.
_GROUP_STREAM = RandomStream.ARMS


def split_format(fmt: str) -> tuple[str, str, str]:
    """Split a format into ``(before question, between question and answer, after answer)``.

    Raises:
        ValueError: a field other than ``question``/``answer``, a missing or repeated
            field, ``{answer}`` before ``{question}``, a conversion or format spec,
            or unbalanced braces.
    """
    parts: list[str] = [""]
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as e:
        raise ValueError(f"not a valid format string: {e}") from None
    for literal, field, spec, conversion in parsed:
        parts[-1] += literal
        if field is None:
            continue
        if field not in ("question", "answer"):
            raise ValueError(f"unknown field {{{field}}}: only {{question}} and {{answer}} are allowed")
        if spec or conversion:
            raise ValueError(f"field {{{field}}} must not have a conversion or format spec")
        fields.append(field)
        parts.append("")
    if fields != ["question", "answer"]:
        raise ValueError(
            f"must contain {{question}} and then {{answer}}, once each; found {['{' + f + '}' for f in fields]}"
        )
    return parts[0], parts[1], parts[2]


def _check_options(spec: ExperimentConfig) -> tuple[tuple[str, str, str], list[int] | None]:
    for name in spec.options:
        if name not in _OPTIONS:
            raise ConfigError(f"unknown option (allowed: {', '.join(_OPTIONS)})", key=f"options.{name}")
    fmt = spec.options.get("format", DEFAULT_FORMAT)
    if not isinstance(fmt, str):
        raise ConfigError(f"must be a string, got {type(fmt).__name__}", key="options.format")
    try:
        pieces = split_format(fmt)
    except ValueError as e:
        raise ConfigError(str(e), key="options.format") from None
    groups = spec.options.get("assign_groups")
    if groups is None:
        return pieces, None
    key = "options.assign_groups"
    if not isinstance(groups, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
        raise ConfigError(f"must be a list of integers >= 0, e.g. [0, 4, 16]; got {groups!r}", key=key)
    if any(g < 0 for g in groups):
        raise ConfigError(f"groups are repetition counts and must be >= 0; got {groups!r}", key=key)
    if len(set(groups)) != len(groups):
        raise ConfigError(f"duplicate groups in {groups!r}", key=key)
    if 0 not in groups or len(groups) < 2:
        raise ConfigError(
            f"needs group 0 (the never-injected controls) and at least one more group; got {groups!r}", key=key
        )
    return pieces, list(groups)


# ASCII digits only: str.isdigit and int() also read full-width (U+FF11 U+FF16) and Arabic-Indic
# (U+0661 U+0666) digits, which a reviewer of the file would not read as a number. At most 18 of
# them (int64); what the run can hold is checked with the doses.
_GROUP_DIGITS = re.compile(r"[0-9]{1,18}")


def _parse_group(value: Any, *, file: Path, line: int) -> int:
    if isinstance(value, str) and _GROUP_DIGITS.fullmatch(value.strip(" ")):
        return int(value.strip(" "))
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    raise PayloadError(
        f"must be an integer >= 0 (a repetition count; 0 = control), got {value!r}", file=file, line=line, key="group"
    )


def _check_choices(rec: Mapping[str, Any], *, file: Path, line: int) -> tuple[list[str], int]:
    choices = rec["choices"]
    if len(choices) < 2:
        raise PayloadError(
            f"needs at least 2 choices for ranked classification, got {len(choices)}",
            file=file,
            line=line,
            key="choices",
        )
    seen: dict[str, int] = {}
    for j, c in enumerate(choices):
        if not isinstance(c, str) or is_blank(c):
            raise PayloadError(f"must be a non-empty string, got {c!r}", file=file, line=line, key=f"choices[{j}]")
        if c in seen:
            raise PayloadError(
                f"duplicate choice {c!r} (also choices[{seen[c]}])", file=file, line=line, key=f"choices[{j}]"
            )
        seen[c] = j
    if rec["answer"] not in seen:
        raise PayloadError(
            f"answer {rec['answer']!r} is not among the choices {choices!r}", file=file, line=line, key="answer"
        )
    return list(choices), seen[rec["answer"]]


def _all_or_none(records: Sequence[tuple[int, dict[str, Any]]], key: str, *, file: Path) -> bool:
    """True if every record has ``key``, False if none has; else a PayloadError at the first odd one."""
    has = [key in rec for _, rec in records]
    if all(has) or not any(has):
        return has[0]
    odd = has.index(not has[0])
    where = "has" if has[odd] else "lacks"
    first = "lacks" if has[odd] else "has"
    raise PayloadError(
        f"this item {where} {key!r} but line {records[0][0]} {first} it: either every item has {key!r} or none",
        file=file,
        line=records[odd][0],
        key=key,
    )


class ContaminationInjector:
    """Injects ``format(question, answer)`` for each treated question, ``group`` times.

    ``probes``: :class:`~multirun.kinds.probes.ContaminationProbes`, parallel to
    ``item_ids``: ``contexts`` (token lists: ``[eos] prompt``), ``answers`` (answer
    tokens), ``answer_texts``, ``choices`` (per item, list of token lists, or None),
    ``choice_texts``, ``answer_index`` (index of the answer among the choices, or None)
    and ``groups`` (ints, or None).

    ``metadata``: ``payload``, ``format``, ``groups`` (per item, or None),
    ``groups_assigned`` (True when drawn by ``assign_groups``), ``item_repetitions``.
    """

    kind = "contamination"

    def prepare(self, ctx: PrepareContext) -> PreparedExperiment:
        spec, tokenizer, sequence_length = ctx.spec, ctx.tokenizer, ctx.sequence_length
        (head, middle, tail), assign = _check_options(spec)
        path = ctx.payload.path("items")
        records = ctx.read_items(
            required={"id": str, "question": str, "answer": str},
            optional={"choices": list, "group": (int, str), "arm_key": str},
            text_keys=("question", "answer", "arm_key"),
        )
        # Units of the arm split: one per distinct arm_key (first appearance), one per item without.
        unit_of: dict[str, int] = {}
        units = np.empty(len(records), dtype=np.int64)
        for i, (_, rec) in enumerate(records):
            key = rec.get("arm_key", f"\0{i}")  # a NUL is refused in payload text: no clash
            units[i] = unit_of.setdefault(key, len(unit_of))
        n_units = len(unit_of)
        has_choices = _all_or_none(records, "choices", file=path)
        has_groups = _all_or_none(records, "group", file=path)

        eos = int(tokenizer.eos_token_id)
        lead = [eos] if spec.wrap_eos else []
        trail = [eos] if spec.wrap_eos else []
        eos_note = " including 2 EOS" if spec.wrap_eos else ""
        tail_ids = list(tokenizer.encode(tail)) if tail else []

        contexts: list[list[int]] = []
        answers: list[list[int]] = []
        sequences: list[list[int]] = []
        choices: list[list[list[int]]] = []
        choice_texts: list[list[str]] = []
        answer_index: list[int] = []
        payload_groups: list[int] = []
        # Every item is tokenized and length-checked, controls too: whether a payload
        # fits must not depend on how the seed happens to split the arms.
        for line, rec in records:
            prompt = list(tokenizer.encode(head + rec["question"] + middle))
            answer = encode_sequence(tokenizer, rec["answer"], wrap_eos=False)
            if not answer:
                raise PayloadError("the answer encodes to no tokens", file=path, line=line, key="answer")
            seq = lead + prompt + answer + tail_ids + trail
            if len(seq) > sequence_length:
                raise PayloadError(
                    f"question + answer in the format are {len(seq)} tokens long{eos_note}, longer than the sequence length {sequence_length}",
                    file=path,
                    line=line,
                    key="question",
                )
            contexts.append(lead + prompt)
            answers.append(answer)
            sequences.append(seq)
            if has_choices:
                texts, index = _check_choices(rec, file=path, line=line)
                encoded = [encode_sequence(tokenizer, c, wrap_eos=False) for c in texts]
                for j, c in enumerate(encoded):
                    if not c or len(contexts[-1]) + len(c) > sequence_length:
                        raise PayloadError(
                            f"the prompt with choice {texts[j]!r} is {len(contexts[-1]) + len(c)} tokens, longer than the sequence length {sequence_length}"
                            if c
                            else "the choice encodes to no tokens",
                            file=path,
                            line=line,
                            key=f"choices[{j}]",
                        )
                choices.append(encoded)
                choice_texts.append(texts)
                answer_index.append(index)
            if has_groups:
                payload_groups.append(_parse_group(rec["group"], file=path, line=line))

        groups: list[int] | None
        if assign is not None:
            # Deal a random permutation of the units round-robin: group sizes (in units) differ
            # by at most one. With one unit per item this is the draw over the items.
            order = ctx.rng(_GROUP_STREAM).permutation(n_units)
            assigned = np.empty(n_units, dtype=np.int64)
            assigned[order] = np.resize(np.asarray(assign, dtype=np.int64), n_units)
            groups = [int(g) for g in assigned[units]]
        elif has_groups:
            first_of_unit: dict[int, int] = {}
            for i, (line, rec) in enumerate(records):
                j = first_of_unit.setdefault(int(units[i]), i)
                if payload_groups[j] != payload_groups[i]:
                    raise PayloadError(
                        f"group {payload_groups[i]} differs from group {payload_groups[j]} of line {records[j][0]}, "
                        f"which has the same arm_key {rec['arm_key']!r}: items of one arm_key share one group",
                        file=path,
                        line=line,
                        key="group",
                    )
            if 0 not in payload_groups:
                raise PayloadError(
                    "no item is in group 0: repetition groups need group 0, the never-injected controls",
                    file=path,
                    key="group",
                )
            if not any(payload_groups):
                raise PayloadError(
                    "every item is in group 0 (the controls): nothing would be injected; "
                    "put the treated items in groups > 0 (group g = injected g times)",
                    file=path,
                    key="group",
                )
            groups = payload_groups
        else:
            groups = None

        if groups is not None:
            for name in ("repetitions", "control_fraction"):
                # A resolved config (run_dir/resolved_config.yaml) spells out the defaults.
                if name in spec.model_fields_set and getattr(spec, name) != type(spec).model_fields[name].default:
                    raise ConfigError(
                        f"the repetition groups decide the arms and doses of this experiment, so {name} would be ignored; remove it "
                        "(group 0 = controls, group g = injected g times)",
                        key=name,
                    )
            treated = np.asarray([g > 0 for g in groups], dtype=bool)
            item_reps = [float(g) for g in groups]
        else:
            treated = ctx.split_arms(n_units)[units]
            item_reps = [float(spec.repetitions)] * len(records)

        seq_items = np.flatnonzero(treated).astype(np.int32)
        return ctx.experiment(
            self.kind,
            item_ids=[rec["id"] for _, rec in records],
            treated=treated,
            sequences=[sequences[i] for i in seq_items],
            seq_items=seq_items,
            seq_repetitions=[item_reps[i] for i in seq_items],
            metadata={
                "format": spec.options.get("format", DEFAULT_FORMAT),
                "groups": groups,
                "groups_assigned": assign is not None,
                "item_repetitions": item_reps,
            },
            dose_key="group",
            probes=ContaminationProbes(
                contexts=contexts,
                answers=answers,
                answer_texts=[rec["answer"] for _, rec in records],
                choices=choices if has_choices else None,
                choice_texts=choice_texts if has_choices else None,
                answer_index=answer_index if has_choices else None,
                groups=groups,
            ),
        )
