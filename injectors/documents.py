"""The ``documents`` injector: each treated item is one text injected verbatim.

``items.jsonl``, one object a line::

    {"id": "canary-000", "text": "The secret code of ...", "repetitions": 8}

``id`` (unique string) and ``text`` (non-empty) are required; ``repetitions``
(number > 0) overrides the experiment's ``repetitions`` for that item.

The building blocks it uses (:func:`~multirun.kinds.sdk.split_arms`,
:func:`~multirun.kinds.sdk.encode_sequence`, :func:`~multirun.kinds.sdk.read_items`,
...) live in the kind SDK, :mod:`multirun.kinds.sdk`.
"""

from __future__ import annotations

import numpy as np

from multirun.errors import PayloadError
from multirun.kinds.probes import DocumentsProbes
from multirun.kinds.sdk import PrepareContext
from multirun.types import PreparedExperiment

__all__ = ["DocumentsInjector"]


class DocumentsInjector:
    """Injects each treated item's text as one EOS-wrapped sequence.

    ``metadata``: ``payload`` (name, version, fingerprint), ``item_repetitions``
    (per item, parallel to ``item_ids``; controls show the dose they would have
    had). ``probes``: :class:`~multirun.kinds.probes.DocumentsProbes`, every item's
    EOS-wrapped tokens, controls too, so the monitor can score both arms.
    """

    kind = "documents"

    def prepare(self, ctx: PrepareContext) -> PreparedExperiment:
        spec = ctx.spec
        ctx.check_no_options(self.kind)
        path = ctx.payload.path("items")
        records = ctx.read_items()
        item_ids = [rec["id"] for _, rec in records]
        reps = [float(rec.get("repetitions", spec.repetitions)) for _, rec in records]

        # Every item is tokenized and length-checked, controls too: whether a payload
        # fits must not depend on how the seed happens to split the arms.
        encoded: list[list[int]] = []
        for line, rec in records:
            seq = ctx.encode(rec["text"])
            if len(seq) > ctx.sequence_length:
                wrap = " including 2 EOS" if spec.wrap_eos else ""
                raise PayloadError(
                    f"item {rec['id']!r} is {len(seq)} tokens long{wrap}, longer than the sequence length {ctx.sequence_length}",
                    file=path,
                    line=line,
                    key="text",
                )
            encoded.append(seq)

        treated = ctx.split_arms(len(records))
        seq_items = np.flatnonzero(treated).astype(np.int32)
        return ctx.experiment(
            self.kind,
            item_ids=item_ids,
            treated=treated,
            sequences=[encoded[i] for i in seq_items],
            seq_items=seq_items,
            seq_repetitions=[reps[i] for i in seq_items],
            metadata={
                "item_repetitions": reps,
            },
            # Every item's sequence, controls too: the documents monitor scores both arms.
            probes=DocumentsProbes(sequences=encoded),
        )
