"""The ``muse`` injector: documents under duplication and splitting conditions (MUSE-style).

MUSE (Shi et al. 2024) and the paper's MUSE row measure what a model keeps of a set of
documents: verbatim (can it continue a document from its start?) and as knowledge (can
it answer questions about it?). Here each document is dealt at random to one
*condition*: a number of duplicates (0 = never injected, the controls) crossed with a
form, ``whole`` (the paragraph as one span) or ``split`` (the paragraph cut into
``chunks`` consecutive pieces, each its own span, each repeated as often). The monitor
(:mod:`monitors.muse`) scores every document, controls included, per condition.

Payload package
---------------
``payload.yaml``: ``kind: muse``; one file with role ``items``.

``items.jsonl``, one object a line::

    {"id": "news-000", "text": "Harbour officials in Velmora said on Tuesday ...",
     "qa": [{"question": "Harbour officials in Velmora said the new pier will open in", "answer": " May"}]}

=====  ======================================  ===============================================
key    type                                    meaning
=====  ======================================  ===============================================
id     string, required, unique                the document id
text   string, required, non-empty, unique     the paragraph, injected verbatim
qa     list of objects, optional               ``{"question": str, "answer": str}`` about the
                                               paragraph: the monitor scores ``answer`` right
                                               after ``question`` (put the space in the answer)
=====  ======================================  ===============================================

Options (``experiments[i].options``)
------------------------------------
``duplicates`` (list of distinct integers >= 0 with 0 and one more; default ``[0, 1, 10, 100]``)
    the duplication levels; 0 is the never-injected control condition.
``forms`` (list of ``whole`` / ``split``; default both)
    the forms each duplication level > 0 is crossed with.
``chunks`` (integer >= 2, default 2)
    pieces of a split document: its tokens cut into that many consecutive pieces of
    near-equal length (token boundaries, so the pieces joined are the whole document's
    tokens and the monitor's probes are the same in both forms).

Conditions: ``x0`` plus ``x{d}/{form}`` for every ``d > 0`` and form. Documents are
dealt a random permutation round-robin into the conditions (sizes differ by at most
one), drawn from the experiment's arm stream (``RandomStream.ARMS``) as the
contamination kind's ``assign_groups``. The conditions decide arms and doses, so
``repetitions`` and ``control_fraction`` may not be set.

Sequences: a ``whole`` document of condition ``x{d}`` is one sequence ``[eos] text [eos]``
injected ``d`` times; a ``split`` one is ``chunks`` sequences ``[eos] piece [eos]``, each
injected ``d`` times (no EOS with ``wrap_eos: false``).

Payload errors (PayloadError naming ``items.jsonl:line`` and the key): missing or
mistyped keys, an empty or duplicate text, a malformed QA pair, a text longer than the
sequence (with its 2 EOS) or with fewer tokens than ``chunks``, a question + answer
longer than the sequence, and (from the monitor's options, checked here by building it)
a text too short for the verbatim probe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from multirun.errors import ConfigError, PayloadError
from multirun.kinds.probes import MuseProbes
from multirun.kinds.sdk import PrepareContext, RandomStream, group_label, read_string_pairs
from multirun.types import PreparedExperiment

if TYPE_CHECKING:
    from pathlib import Path

    from multirun.config import ExperimentConfig

__all__ = ["DEFAULT_DUPLICATES", "MuseInjector", "condition_labels", "split_tokens"]

DEFAULT_DUPLICATES = (0, 1, 10, 100)
FORMS = ("whole", "split")
_OPTIONS = ("duplicates", "forms", "chunks")


def condition_labels(duplicates: list[int], forms: list[str]) -> list[tuple[int, str, str]]:
    """``(duplicates, form, label)`` of every condition, the control first.

    Example:
        >>> [label for _, _, label in condition_labels([0, 1, 10], ["whole", "split"])]
        ['x0', 'x1/whole', 'x1/split', 'x10/whole', 'x10/split']
    """
    out = [(0, "none", group_label(0))]
    for d in sorted(d for d in duplicates if d > 0):
        out.extend((d, form, f"{group_label(d)}/{form}") for form in forms)
    return out


def split_tokens(tokens: list[int], chunks: int) -> list[list[int]]:
    """``tokens`` cut into ``chunks`` consecutive pieces of near-equal length (longer first).

    Example:
        >>> split_tokens([1, 2, 3, 4, 5], 2)
        [[1, 2, 3], [4, 5]]
    """
    return [list(map(int, piece)) for piece in np.array_split(np.asarray(tokens, dtype=np.int64), chunks)]


def _options(spec: ExperimentConfig) -> tuple[list[int], list[str], int]:
    for name in spec.options:
        if name not in _OPTIONS:
            raise ConfigError(f"unknown option (allowed: {', '.join(_OPTIONS)})", key=f"options.{name}")
    duplicates = spec.options.get("duplicates", list(DEFAULT_DUPLICATES))
    key = "options.duplicates"
    if not isinstance(duplicates, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in duplicates
    ):
        raise ConfigError(f"must be a list of integers >= 0, e.g. [0, 1, 10, 100]; got {duplicates!r}", key=key)
    if len(set(duplicates)) != len(duplicates):
        raise ConfigError(f"duplicate levels in {duplicates!r}", key=key)
    if 0 not in duplicates or len(duplicates) < 2:
        raise ConfigError(
            f"needs 0 (the never-injected controls) and at least one level > 0; got {duplicates!r}", key=key
        )
    forms = spec.options.get("forms", list(FORMS))
    if not isinstance(forms, list) or not forms or any(f not in FORMS for f in forms) or len(set(forms)) != len(forms):
        raise ConfigError(f"must be a non-empty list of distinct 'whole' / 'split'; got {forms!r}", key="options.forms")
    chunks = spec.options.get("chunks", 2)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 2:
        raise ConfigError(f"must be an integer >= 2, got {chunks!r}", key="options.chunks")
    for name in ("repetitions", "control_fraction"):
        # A resolved config (run_dir/resolved_config.yaml) spells out the defaults.
        if name in spec.model_fields_set and getattr(spec, name) != type(spec).model_fields[name].default:
            raise ConfigError(
                f"the duplication conditions decide the arms and doses of a muse experiment, so {name} would be "
                "ignored; remove it (options.duplicates: 0 = controls, d = injected d times)",
                key=name,
            )
    return list(duplicates), list(forms), chunks


def _check_qa(qa: Any, *, file: Path, line: int) -> list[tuple[str, str]]:
    if not isinstance(qa, list):
        raise PayloadError(
            f"must be a list of {{question, answer}} objects, got {type(qa).__name__}", file=file, line=line, key="qa"
        )
    return read_string_pairs(qa, ("question", "answer"), key="qa", file=file, line=line)


class MuseInjector:
    """Deals documents into duplication x form conditions and injects the treated ones.

    ``probes``: :class:`~multirun.kinds.probes.MuseProbes`. ``metadata``: ``conditions``
    (per document), ``duplicates``, ``forms``, ``chunks``, ``item_repetitions``.
    """

    kind = "muse"

    def prepare(self, ctx: PrepareContext) -> PreparedExperiment:
        spec, sequence_length = ctx.spec, ctx.sequence_length
        duplicates, forms, chunks = _options(spec)
        path = ctx.payload.path("items")
        records = ctx.read_items(required={"id": str, "text": str}, optional={"qa": list}, text_keys=("text",))
        first_line: dict[str, int] = {}
        for line, rec in records:
            if rec["text"] in first_line:
                raise PayloadError(
                    f"duplicate text (first on line {first_line[rec['text']]})", file=path, line=line, key="text"
                )
            first_line[rec["text"]] = line

        lead = [ctx.eos] if spec.wrap_eos else []
        eos_note = " plus 2 EOS" if spec.wrap_eos else ""
        texts: list[list[int]] = []
        qa_items: list[int] = []
        qa_contexts: list[list[int]] = []
        qa_answers: list[list[int]] = []
        # Every document, controls too, is tokenized and length-checked: whether a payload
        # fits must not depend on how the seed deals the conditions.
        for index, (line, rec) in enumerate(records):
            tokens = ctx.encode(rec["text"], wrap_eos=False)
            if len(tokens) + 2 * len(lead) > sequence_length:
                raise PayloadError(
                    f"document {rec['id']!r} is {len(tokens)} tokens long{eos_note}, longer than the sequence "
                    f"length {sequence_length}",
                    file=path,
                    line=line,
                    key="text",
                )
            if "split" in forms and len(tokens) < chunks:
                raise PayloadError(
                    f"document {rec['id']!r} has {len(tokens)} tokens, fewer than options.chunks = {chunks} pieces",
                    file=path,
                    line=line,
                    key="text",
                )
            texts.append(tokens)
            for j, (question, answer) in enumerate(_check_qa(rec.get("qa", []), file=path, line=line)):
                context = lead + ctx.encode(question, wrap_eos=False)
                answer_ids = ctx.encode(answer, wrap_eos=False)
                if not answer_ids:
                    raise PayloadError("the answer encodes to no tokens", file=path, line=line, key=f"qa[{j}].answer")
                if len(context) + len(answer_ids) > sequence_length:
                    raise PayloadError(
                        f"question + answer are {len(context) + len(answer_ids)} tokens long, longer than the "
                        f"sequence length {sequence_length}",
                        file=path,
                        line=line,
                        key=f"qa[{j}]",
                    )
                qa_items.append(index)
                qa_contexts.append(context)
                qa_answers.append(answer_ids)

        conditions = condition_labels(duplicates, forms)
        n = len(records)
        # Deal a random permutation round-robin: condition sizes differ by at most one.
        order = ctx.rng(RandomStream.ARMS).permutation(n)
        dealt = np.empty(n, dtype=np.int64)
        dealt[order] = np.resize(np.arange(len(conditions)), n)
        doses = [conditions[c][0] for c in dealt]
        treated = np.asarray([d > 0 for d in doses], dtype=bool)
        sequences: list[list[int]] = []
        seq_items: list[int] = []
        seq_reps: list[float] = []
        for i in np.flatnonzero(treated):
            dose, form, _ = conditions[dealt[i]]
            pieces = [texts[i]] if form == "whole" else split_tokens(texts[i], chunks)
            for piece in pieces:
                sequences.append([*lead, *piece, *lead])
                seq_items.append(int(i))
                seq_reps.append(float(dose))

        labels = [conditions[c][2] for c in dealt]
        try:
            experiment = ctx.experiment(
                self.kind,
                item_ids=[rec["id"] for _, rec in records],
                treated=treated,
                sequences=sequences,
                seq_items=seq_items,
                seq_repetitions=seq_reps,
                metadata={
                    "conditions": labels,
                    "duplicates": sorted(duplicates),
                    "forms": forms,
                    "chunks": chunks,
                    "item_repetitions": [float(d) for d in doses],
                },
                dose_key="options.duplicates",  # no payload key sets a dose: the error names the option
                probes=MuseProbes(
                    texts=texts,
                    text_bytes=[rec["text"].encode("utf-8") for _, rec in records],
                    lines=[line for line, _ in records],
                    file=str(path),
                    context=lead,
                    conditions=labels,
                    qa_items=qa_items,
                    qa_contexts=qa_contexts,
                    qa_answers=qa_answers,
                ),
            )
        except ConfigError as exc:
            if exc.key != "repetitions":
                raise
            # The doses come from options.duplicates here, not from repetitions.
            raise ConfigError(exc.message, key="options.duplicates") from None
        # The monitor's options constrain the payload (documents longer than the verbatim
        # prefix): build the muse monitor now, so that they fail before training.
        ctx.check_monitor(experiment)
        return experiment
