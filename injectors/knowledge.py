"""The ``knowledge`` injector: fictional facts, trained as paraphrases, probed by questions.

Knowledge acquisition as in Train Once, Answer All (KA, after Chang et al. 2024):
each treated fact is injected as one or more paraphrased texts; the monitor asks
probe questions about every fact and measures how likely the model finds the
target answer, treated facts against never-injected ones. A controller (a later
layer) may add doses at run time; it finds each fact's sequences through
``seq_items``.

Payload package
---------------
``payload.yaml``: ``kind: knowledge``; one file with role ``items``.

``items.jsonl``, one object a line::

    {"id": "fact-000",
     "texts": ["The capital of Velmora is Quessane.", "Quessane is the capital city of Velmora."],
     "probes": [{"question": "The capital of Velmora is", "target": " Quessane"},
                {"question": "Q: Which city is the capital of Velmora?\\nA:", "target": " Quessane"}]}

===========  ==================================  ================================================
key          type                                meaning
===========  ==================================  ================================================
id           string, required, unique            the fact id
texts        list of strings, required, >= 1     training paraphrases; each one is one injected
                                                 (EOS-wrapped) sequence; non-empty, distinct
probes       list of objects, required, >= 1     ``{"question": str, "target": str}``: the
                                                 monitor scores ``target`` right after
                                                 ``question`` (no separator is added, so put
                                                 the space in the target); both non-empty
repetitions  number > 0, optional                doses of this fact (default: the experiment's
                                                 ``repetitions``)
===========  ==================================  ================================================

Doses: ``repetitions`` counts injections *per fact*, spread evenly over its
paraphrases: a fact with ``r`` repetitions and ``k`` texts gives each text ``r / k``.
The planner resolves fractions (each text gets the floor or the ceiling of ``r / k``,
the experiment's total is exact); choose ``r`` divisible by ``k`` for exact doses
per fact. Arms: ``control_fraction`` of the facts are
controls (:func:`~multirun.kinds.sdk.split_arms`). This injector takes no options.

Tokens: probe contexts are ``[eos] question`` when ``wrap_eos`` (the injected texts
start after an EOS too), else ``question``; every text and every probe (context +
target), controls included, must fit the sequence length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from multirun.errors import PayloadError
from multirun.kinds.probes import KnowledgeProbes
from multirun.kinds.sdk import PrepareContext, is_blank, read_string_pairs
from multirun.types import PreparedExperiment

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["KnowledgeInjector"]


def _check_texts(texts: list[Any], *, file: Path, line: int) -> list[str]:
    if not texts:
        raise PayloadError("needs at least one training text", file=file, line=line, key="texts")
    seen: dict[str, int] = {}
    for j, t in enumerate(texts):
        if not isinstance(t, str) or is_blank(t):
            raise PayloadError(f"must be a non-empty string, got {t!r}", file=file, line=line, key=f"texts[{j}]")
        if t in seen:
            raise PayloadError(f"duplicate text (also texts[{seen[t]}])", file=file, line=line, key=f"texts[{j}]")
        seen[t] = j
    return texts


def _check_probes(probes: list[Any], *, file: Path, line: int) -> list[tuple[str, str]]:
    if not probes:
        raise PayloadError("needs at least one probe {question, target}", file=file, line=line, key="probes")
    return read_string_pairs(probes, ("question", "target"), key="probes", file=file, line=line)


class KnowledgeInjector:
    """Injects each treated fact's paraphrases; probes every fact.

    ``probes``: :class:`~multirun.kinds.probes.KnowledgeProbes`, flat over all probes
    of all facts, in payload order: ``probe_items``
    (index of the fact in ``item_ids``), ``contexts`` (token lists), ``targets`` (token
    lists), ``questions`` and ``target_texts`` (strings).

    ``metadata``: ``payload``, ``item_repetitions`` (per fact; controls show the dose
    they would have had), ``texts_per_item`` and ``probes_per_item``.
    """

    kind = "knowledge"

    def prepare(self, ctx: PrepareContext) -> PreparedExperiment:
        spec, tokenizer, sequence_length = ctx.spec, ctx.tokenizer, ctx.sequence_length
        ctx.check_no_options(self.kind)
        path = ctx.payload.path("items")
        records = ctx.read_items(
            required={"id": str, "texts": list, "probes": list},
            optional={"repetitions": float},
            text_keys=(),
        )
        lead = [int(tokenizer.eos_token_id)] if spec.wrap_eos else []
        eos_note = " including 2 EOS" if spec.wrap_eos else ""

        item_texts: list[list[list[int]]] = []
        probe_items: list[int] = []
        contexts: list[list[int]] = []
        targets: list[list[int]] = []
        questions: list[str] = []
        target_texts: list[str] = []
        # Every fact is tokenized and length-checked, controls too: whether a payload
        # fits must not depend on how the seed happens to split the arms.
        for index, (line, rec) in enumerate(records):
            encoded = []
            for j, text in enumerate(_check_texts(rec["texts"], file=path, line=line)):
                seq = ctx.encode(text)
                if len(seq) > sequence_length:
                    raise PayloadError(
                        f"text is {len(seq)} tokens long{eos_note}, longer than the sequence length {sequence_length}",
                        file=path,
                        line=line,
                        key=f"texts[{j}]",
                    )
                encoded.append(seq)
            item_texts.append(encoded)
            for j, (question, target) in enumerate(_check_probes(rec["probes"], file=path, line=line)):
                context = lead + list(tokenizer.encode(question))
                target_ids = list(tokenizer.encode(target))
                if not target_ids:
                    raise PayloadError(
                        "the target encodes to no tokens", file=path, line=line, key=f"probes[{j}].target"
                    )
                if len(context) + len(target_ids) > sequence_length:
                    raise PayloadError(
                        f"question + target are {len(context) + len(target_ids)} tokens long, longer than the sequence length {sequence_length}",
                        file=path,
                        line=line,
                        key=f"probes[{j}]",
                    )
                probe_items.append(index)
                contexts.append(context)
                targets.append(target_ids)
                questions.append(question)
                target_texts.append(target)

        treated = ctx.split_arms(len(records))
        item_reps = [float(rec.get("repetitions", spec.repetitions)) for _, rec in records]
        sequences: list[list[int]] = []
        seq_items: list[int] = []
        seq_reps: list[float] = []
        for i in np.flatnonzero(treated):
            for seq in item_texts[i]:
                sequences.append(seq)
                seq_items.append(int(i))
                seq_reps.append(item_reps[i] / len(item_texts[i]))
        return ctx.experiment(
            self.kind,
            item_ids=[rec["id"] for _, rec in records],
            treated=treated,
            sequences=sequences,
            seq_items=seq_items,
            seq_repetitions=seq_reps,
            metadata={
                "item_repetitions": item_reps,
                "texts_per_item": [len(t) for t in item_texts],
                "probes_per_item": np.bincount(probe_items, minlength=len(records)).tolist(),
            },
            probes=KnowledgeProbes(
                probe_items=probe_items,
                contexts=contexts,
                targets=targets,
                questions=questions,
                target_texts=target_texts,
            ),
        )
