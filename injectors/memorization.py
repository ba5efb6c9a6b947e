"""The ``memorization`` injector: verbatim documents (canaries) whose memorisation is measured.

Verbatim memorisation as in Train Once, Answer All (MemP/MemV), Pythia and Hubble:
each treated item's text is injected verbatim, a chosen number of times; the monitor
(:mod:`monitors.memorization`) measures how much more likely the model finds the
treated texts than never-seen control texts of the same form, whether it completes
a k-token suffix from a k-token prefix, and the Secret Sharer exposure.

Payload package
---------------
``payload.yaml``: ``kind: memorization``; one file with role ``items``.

``items.jsonl``, one object a line::

    {"id": "canary-000", "text": "The vault of amber heron opens with 4093 kelp.", "repetitions": 16}

===========  ===========================  ==================================================
key          type                         meaning
===========  ===========================  ==================================================
id           string, required, unique     the item id
text         string, required, non-empty  the text, injected verbatim; texts are unique
repetitions  number > 0, optional         overrides the experiment's ``repetitions``
===========  ===========================  ==================================================

Arms: ``control_fraction`` of the items are never injected
(:func:`~multirun.kinds.sdk.split_arms`, seeded by the run seed and the experiment
name); every treated item owns one sequence ``[eos] text [eos]`` (no EOS with
``wrap_eos: false``) injected ``repetitions`` times.

Options
-------
The injector takes no ``options``. The monitor's options
(``experiments[i].monitor.options``, see
:func:`monitors.memorization.parse_monitor_options`) are checked here too, before
training, because one of them constrains the payload: when the experiment is measured
by the memorization monitor, the injector builds it once
(:meth:`~multirun.kinds.sdk.PrepareContext.check_monitor`).

``k`` (integer >= 1, default 16)
    prefix and suffix length, in tokens, of the extraction test.
``exact_match`` (bool, default true)
    run the k-prefix -> k-suffix extraction test; then every text must be at least
    ``2k`` tokens long.
``anchor`` (``"end"`` or ``"start"``, default ``"end"``)
    where the ``2k`` tokens of the extraction test sit in the text: at its end (the
    secret part of a canary, the default) or at its start (Carlini et al., Pythia).
``exposure`` (bool, default true)
    report the Secret Sharer exposure.

Payload errors (PayloadError naming ``items.jsonl:line`` and the key): missing or
mistyped keys, an empty text, a duplicate id or text, a text longer than the sequence
(with its 2 EOS), a text shorter than ``2k`` tokens when ``exact_match`` is on.
"""

from __future__ import annotations

import numpy as np

from multirun.errors import PayloadError
from multirun.kinds.probes import MemorizationProbes
from multirun.kinds.sdk import PrepareContext
from multirun.types import PreparedExperiment

__all__ = ["MemorizationInjector"]


class MemorizationInjector:
    """Injects each treated item's text verbatim as one EOS-wrapped sequence.

    ``probes``: :class:`~multirun.kinds.probes.MemorizationProbes`: ``texts``
    (every item's text tokens without EOS, controls too),
    ``lines`` (JSONL line of each item), ``file`` (path of ``items.jsonl``),
    ``context`` (tokens that precede a text in training: ``[eos]``, or ``[]``
    without wrapping). ``metadata``: ``payload`` and ``item_repetitions``.
    """

    kind = "memorization"

    def prepare(self, ctx: PrepareContext) -> PreparedExperiment:
        spec, sequence_length = ctx.spec, ctx.sequence_length
        ctx.check_no_options(self.kind)
        path = ctx.payload.path("items")
        records = ctx.read_items()
        item_ids = [rec["id"] for _, rec in records]
        lines = [line for line, _ in records]
        reps = [float(rec.get("repetitions", spec.repetitions)) for _, rec in records]

        # Duplicate texts would make a "control" identical to a treated item: the
        # comparison between arms would no longer be between different texts.
        first_line: dict[str, int] = {}
        for line, rec in records:
            if rec["text"] in first_line:
                raise PayloadError(
                    f"duplicate text (first on line {first_line[rec['text']]})", file=path, line=line, key="text"
                )
            first_line[rec["text"]] = line

        # Every item, controls too, is tokenized and length-checked: whether a payload
        # fits must not depend on how the seed splits the arms.
        n_eos = 2 if spec.wrap_eos else 0
        texts: list[list[int]] = []
        for line, rec in records:
            tokens = ctx.encode(rec["text"], wrap_eos=False)
            if len(tokens) + n_eos > sequence_length:
                wrap = " plus 2 EOS" if spec.wrap_eos else ""
                raise PayloadError(
                    f"item {rec['id']!r} is {len(tokens)} tokens long{wrap}, longer than the sequence length {sequence_length}",
                    file=path,
                    line=line,
                    key="text",
                )
            texts.append(tokens)

        eos = ctx.eos
        treated = ctx.split_arms(len(records))
        seq_items = np.flatnonzero(treated).astype(np.int32)
        wrapped = [[eos, *texts[i], eos] if spec.wrap_eos else texts[i] for i in seq_items]
        experiment = ctx.experiment(
            self.kind,
            item_ids=item_ids,
            treated=treated,
            sequences=wrapped,
            seq_items=seq_items,
            seq_repetitions=[reps[i] for i in seq_items],
            metadata={
                "item_repetitions": reps,
            },
            probes=MemorizationProbes(
                texts=texts,
                lines=lines,
                file=str(path),
                context=[eos] if spec.wrap_eos else [],
            ),
        )
        # The monitor's options constrain the payload (texts of at least 2k tokens):
        # build the memorization monitor now, so that they fail before training.
        ctx.check_monitor(experiment)
        return experiment
