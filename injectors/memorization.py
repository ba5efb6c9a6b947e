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
(:func:`~injectors.documents.split_arms`, seeded by the run seed and the experiment
name); every treated item owns one sequence ``[eos] text [eos]`` (no EOS with
``wrap_eos: false``) injected ``repetitions`` times.

Options
-------
The injector takes no ``options``. The monitor's options
(``experiments[i].monitor.options``, see :func:`parse_monitor_options`) are checked
here too, before training, because one of them constrains the payload:

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

Example:
    >>> parse_monitor_options({"k": 8}).k
    8
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from injectors.documents import (
    check_no_options,
    encode_sequence,
    prepared_experiment,
    read_items,
    split_arms,
)
from multirun.errors import ConfigError, PayloadError
from multirun.types import Placement, PreparedExperiment

if TYPE_CHECKING:
    from multirun.config import ExperimentConfig
    from multirun.kinds.payloads import PayloadPackage
    from multirun.data.tokenizers import Tokenizer

__all__ = ["MemorizationInjector", "MemorizationOptions", "check_text_lengths", "parse_monitor_options"]

DEFAULT_K = 16


@dataclass(frozen=True)
class MemorizationOptions:
    """The memorization monitor's options (see the module docstring)."""

    k: int = DEFAULT_K
    exact_match: bool = True
    anchor: Literal["end", "start"] = "end"
    exposure: bool = True


def parse_monitor_options(options: Mapping[str, Any]) -> MemorizationOptions:
    """Validate the memorization monitor's options.

    Raises:
        ConfigError: unknown option or bad value, key ``monitor.options.<name>``.

    Example:
        >>> parse_monitor_options({"anchor": "start", "exposure": False}).anchor
        'start'
    """
    known = {"k", "exact_match", "anchor", "exposure"}
    for name in options:
        if name not in known:
            raise ConfigError(f"unknown option (known: {', '.join(sorted(known))})", key=f"monitor.options.{name}")
    k = options.get("k", DEFAULT_K)
    # bool is an int subclass: `k: true` is a typo, not a length.
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"must be an integer >= 1, got {k!r}", key="monitor.options.k")
    flags = {}
    for name, default in (("exact_match", True), ("exposure", True)):
        value = options.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {value!r}", key=f"monitor.options.{name}")
        flags[name] = value
    anchor = options.get("anchor", "end")
    if anchor not in ("end", "start"):
        raise ConfigError(f"must be 'end' or 'start', got {anchor!r}", key="monitor.options.anchor")
    return MemorizationOptions(k=k, exact_match=flags["exact_match"], anchor=anchor, exposure=flags["exposure"])


def check_text_lengths(
    texts: list[list[int]], lines: list[int], ids: list[str], *, file: str | Path, options: MemorizationOptions, max_tokens: int
) -> None:
    """Every text must hold the ``2k`` tokens of the extraction test (when it is on).

    ``max_tokens`` is the longest text the sequence holds (sequence length minus the EOS).

    Raises:
        ConfigError: ``2k`` exceeds ``max_tokens`` (no text could ever qualify), key
            ``monitor.options.k``.
        PayloadError: the first text that is too short, naming ``file:line``.
    """
    if not options.exact_match:
        return
    need = 2 * options.k
    if need > max_tokens:
        raise ConfigError(
            f"the extraction test needs 2k = {need} tokens, more than a sequence holds ({max_tokens} text tokens); "
            "lower k or set exact_match: false",
            key="monitor.options.k",
        )
    for tokens, line, item_id in zip(texts, lines, ids):
        if len(tokens) < need:
            raise PayloadError(
                f"item {item_id!r} is {len(tokens)} tokens long; the k-prefix -> k-suffix test (k={options.k}) needs "
                f"at least 2k = {need}: lengthen the text, lower monitor.options.k or set exact_match: false",
                file=file,
                line=line,
                key="text",
            )


def _monitor_applies(spec: ExperimentConfig) -> bool:
    # Another monitor may be configured for this experiment; its options are not ours.
    return spec.monitor.enabled and spec.monitor.name in (None, "memorization")


class MemorizationInjector:
    """Injects each treated item's text verbatim as one EOS-wrapped sequence.

    ``probes``: ``texts`` (every item's text tokens without EOS, controls too),
    ``lines`` (JSONL line of each item), ``file`` (path of ``items.jsonl``),
    ``context`` (tokens that precede a text in training: ``[eos]``, or ``[]``
    without wrapping). ``metadata``: ``payload`` and ``item_repetitions``.
    """

    kind = "memorization"

    def prepare(
        self,
        payload: PayloadPackage,
        spec: ExperimentConfig,
        *,
        tokenizer: Tokenizer,
        sequence_length: int,
        seed: int,
        placement: Placement,
    ) -> PreparedExperiment:
        check_no_options(spec, self.kind)
        path = payload.path("items")
        records = read_items(payload)
        item_ids = [rec["id"] for _, rec in records]
        lines = [line for line, _ in records]
        reps = [float(rec.get("repetitions", spec.repetitions)) for _, rec in records]

        # Duplicate texts would make a "control" identical to a treated item: the
        # comparison between arms would no longer be between different texts.
        first_line: dict[str, int] = {}
        for line, rec in records:
            if rec["text"] in first_line:
                raise PayloadError(f"duplicate text (first on line {first_line[rec['text']]})", file=path, line=line, key="text")
            first_line[rec["text"]] = line

        # Every item, controls too, is tokenized and length-checked: whether a payload
        # fits must not depend on how the seed splits the arms.
        n_eos = 2 if spec.wrap_eos else 0
        texts: list[list[int]] = []
        for line, rec in records:
            tokens = encode_sequence(tokenizer, rec["text"], wrap_eos=False)
            if len(tokens) + n_eos > sequence_length:
                wrap = " plus 2 EOS" if spec.wrap_eos else ""
                raise PayloadError(
                    f"item {rec['id']!r} is {len(tokens)} tokens long{wrap}, longer than the sequence length {sequence_length}",
                    file=path,
                    line=line,
                    key="text",
                )
            texts.append(tokens)
        if _monitor_applies(spec):
            check_text_lengths(
                texts, lines, item_ids, file=path, options=parse_monitor_options(spec.monitor.options),
                max_tokens=sequence_length - n_eos,
            )

        eos = int(tokenizer.eos_token_id)
        treated = split_arms(len(records), spec.control_fraction, seed=seed, name=spec.split_key)
        seq_items = np.flatnonzero(treated).astype(np.int32)
        wrapped = [[eos, *texts[i], eos] if spec.wrap_eos else texts[i] for i in seq_items]
        return prepared_experiment(
            self.kind, payload, spec, tokenizer=tokenizer, sequence_length=sequence_length, seed=seed,
            placement=placement, item_ids=item_ids, treated=treated, sequences=wrapped,
            seq_items=seq_items, seq_repetitions=[reps[i] for i in seq_items],
            metadata={
                "item_repetitions": reps,
            },
            probes={
                "texts": texts,
                "lines": lines,
                "file": str(path),
                "context": [eos] if spec.wrap_eos else [],
            },
        )
