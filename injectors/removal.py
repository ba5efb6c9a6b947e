"""The ``removal`` injector: sequences taken out of the training stream (the paper's MemV).

Where every other kind writes payloads into the stream, ``removal`` takes content out:
every training row that holds, once the other experiments' spans are written, any
length-``ngram`` window of a treated item's text is overwritten with a replacement
(:mod:`multirun.inject.removal`); every overwritten span is a row of the removals
ledger (``ledger/removals/``, docs/ledger.md). Control items are left in the stream.
The monitor (:mod:`monitors.removal`) compares how well the model continues removed
texts and controls from their first ``k`` tokens. Full description: docs/kinds/removal.md.

Payload package
---------------
``payload.yaml``: ``kind: removal``; one file with role ``items``, one object a line::

    {"id": "line-000", "text": "        raise TypeError(\\"expected a string\\")"}

====  ===========================  ===============================================
key   type                         meaning
====  ===========================  ===============================================
id    string, required, unique     the item id
text  string, required, non-empty  a sequence that occurs in the training data
====  ===========================  ===============================================

Options (``experiments[i].options``)
------------------------------------
``ngram`` (integer >= 1, default 25)
    the n-gram length in tokens: a row is caught when it holds any ``ngram`` consecutive
    tokens of a treated text (25 suits BPE tokenizers; 16 to 32 the byte tokenizer).
    At most the sequence length; every text must be at least this long.
``replacement`` (default ``"eos"``)
    what is written over a removed span: ``"eos"`` (the EOS token), ``{"text": "..."}``
    (its tokens) or ``{"tokens": [ids]}``, repeated to fill the span. Repeated, it must
    hold no n-gram of any item.
``span`` (``"match"`` or ``"row"``, default ``"match"``)
    ``match``: the matched windows only (overlapping or adjacent windows merged into one
    span); ``row``: the whole row that holds a match.

The experiment's ``placement`` bounds when rows are scanned: ``uniform`` (default) every
step, extensions included; ``window`` its steps; ``steps`` only those. ``repetitions``
has no effect (nothing is injected); ``inject: false`` makes a negative control that
removes nothing and measures the same arms. A ``controller`` is refused.

Errors: PayloadError naming ``items.jsonl:line`` and the key (empty or duplicate text, a
text shorter than ``ngram`` tokens, two items sharing an n-gram: a control would then be
partly removed); ConfigError naming the option (bad ``ngram``, ``ngram`` longer than the
sequence, an empty or self-matching replacement, an unknown option or ``span``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from multirun.errors import ConfigError, PayloadError
from multirun.inject.removal import tiled, window_hashes
from multirun.kinds.probes import RemovalProbes
from multirun.kinds.sdk import PrepareContext
from multirun.types import PreparedExperiment, RemovalSpec

__all__ = ["RemovalInjector"]

DEFAULT_NGRAM = 25
_OPTIONS = ("ngram", "replacement", "span")
_NO_END = 2**62


def _windows(tokens: list[int], n: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(np.asarray(tokens, dtype=np.int64), n)


class RemovalInjector:
    """Prepares the removed n-grams of the treated items; injects nothing.

    ``probes``: :class:`~multirun.kinds.probes.RemovalProbes` (every item's tokens,
    controls too). ``removal``: :class:`~multirun.types.RemovalSpec` (None with
    ``inject: false``). ``metadata``: ``ngram``, ``span``, ``replacement`` and the
    number of distinct ``removed_ngrams``.
    """

    kind = "removal"

    def prepare(self, ctx: PrepareContext) -> PreparedExperiment:
        spec = ctx.spec
        options = dict(spec.options)
        for name in options:
            if name not in _OPTIONS:
                raise ConfigError(f"unknown option (known: {', '.join(_OPTIONS)})", key=f"options.{name}")
        if spec.controller is not None:
            raise ConfigError("a removal experiment removes at every step: it takes no controller", key="controller")
        n = options.get("ngram", DEFAULT_NGRAM)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"must be an integer >= 1, got {n!r}", key="options.ngram")
        if n > ctx.sequence_length:
            raise ConfigError(
                f"the n-gram ({n} tokens) is longer than a training row ({ctx.sequence_length} tokens): "
                "no row could ever hold one",
                key="options.ngram",
            )
        span = options.get("span", "match")
        if span not in ("match", "row"):
            raise ConfigError(f"must be 'match' or 'row', got {span!r}", key="options.span")
        replacement, replacement_label = self._replacement(ctx, options.get("replacement", "eos"))

        path = ctx.payload.path("items")
        records = ctx.read_items()
        texts: list[list[int]] = []
        first_line: dict[str, int] = {}
        for line, rec in records:
            if rec["text"] in first_line:
                raise PayloadError(
                    f"duplicate text (first on line {first_line[rec['text']]})", file=path, line=line, key="text"
                )
            first_line[rec["text"]] = line
            tokens = ctx.encode(rec["text"], wrap_eos=False)
            if len(tokens) < n:
                raise PayloadError(
                    f"item {rec['id']!r} is {len(tokens)} tokens long, shorter than the n-gram ({n}): it could never "
                    "be matched; lengthen it or lower options.ngram",
                    file=path,
                    line=line,
                    key="text",
                )
            texts.append(tokens)
        lines = [line for line, _ in records]
        # Checked over every item, before the split: whether a payload is valid must not
        # depend on the seed. Two items sharing an n-gram would make a control partly removed.
        hashes = [np.unique(window_hashes(_windows(t, n), n)[:, 0]) for t in texts] if texts else []
        owner = np.concatenate([np.full(h.size, i) for i, h in enumerate(hashes)]) if hashes else np.empty(0, int)
        flat = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
        order = np.argsort(flat, kind="stable")
        shared = np.flatnonzero(flat[order][1:] == flat[order][:-1])
        for at in shared.tolist():
            a, b = sorted((int(owner[order[at]]), int(owner[order[at + 1]])))
            common = {w.tobytes() for w in _windows(texts[a], n)} & {w.tobytes() for w in _windows(texts[b], n)}
            if common:  # equal hashes, checked exactly
                raise PayloadError(
                    f"items {records[a][1]['id']!r} (line {lines[a]}) and {records[b][1]['id']!r} share a {n}-token "
                    "n-gram: removing one would remove part of the other; make them differ or raise options.ngram",
                    file=path,
                    line=lines[b],
                    key="text",
                )
        # Every window of the replacement repeated is among its first len(replacement) windows.
        probe = tiled(replacement, n + len(replacement) - 1)
        probe_hashes = set(window_hashes(probe[None, :], n)[0].tolist())
        for i, h in enumerate(hashes):
            if probe_hashes & set(h.tolist()):
                raise ConfigError(
                    f"the replacement, repeated, holds an n-gram of item {records[i][1]['id']!r}: it would write back "
                    "what it removes",
                    key="options.replacement",
                )

        treated = ctx.split_arms(len(records))
        seq_items = np.flatnonzero(treated).astype(np.int32)
        sequences = [texts[i] for i in seq_items]
        removal = None
        if spec.inject and sequences:
            removal = self._spec(ctx, sequences, n, replacement, span)
        experiment = ctx.experiment(
            self.kind,
            item_ids=[rec["id"] for _, rec in records],
            treated=treated,
            sequences=sequences,
            seq_items=seq_items,
            seq_repetitions=np.zeros(len(sequences)),  # nothing is injected
            metadata={
                "ngram": n,
                "span": span,
                "replacement": replacement_label,
                "removed_ngrams": len(removal.ngrams) if removal is not None else 0,
            },
            probes=RemovalProbes(texts=texts, lines=lines, file=str(path)),
        )
        experiment.removal = removal
        ctx.check_monitor(experiment)
        return experiment

    @staticmethod
    def _replacement(ctx: PrepareContext, value: Any) -> tuple[np.ndarray, Any]:
        key = "options.replacement"
        if value == "eos":
            return np.array([ctx.eos], dtype=np.int64), "eos"
        if isinstance(value, dict) and set(value) == {"text"}:
            text = value["text"]
            tokens = ctx.encode(text, wrap_eos=False) if isinstance(text, str) else []
            if not tokens:
                raise ConfigError("replacement text must be a non-empty string", key=f"{key}.text")
            return np.asarray(tokens, dtype=np.int64), {"text": text}
        if isinstance(value, dict) and set(value) == {"tokens"}:
            tokens = value["tokens"]
            vocab = int(ctx.tokenizer.vocab_size)
            ok = isinstance(tokens, list) and tokens and all(type(t) is int and 0 <= t < vocab for t in tokens)
            if not ok:
                raise ConfigError(
                    f"replacement tokens must be a non-empty list of token ids in [0, {vocab})", key=f"{key}.tokens"
                )
            return np.asarray(tokens, dtype=np.int64), {"tokens": list(tokens)}
        raise ConfigError(f"must be 'eos', {{text: ...}} or {{tokens: [...]}}, got {value!r}", key=key)

    @staticmethod
    def _spec(
        ctx: PrepareContext, sequences: list[list[int]], n: int, replacement: np.ndarray, span: Any
    ) -> RemovalSpec:
        windows = np.concatenate([_windows(t, n) for t in sequences])
        owner = np.concatenate([np.full(len(t) - n + 1, j) for j, t in enumerate(sequences)])
        start = np.concatenate([np.arange(len(t) - n + 1) for t in sequences])
        _, first = np.unique(windows, axis=0, return_index=True)
        first_sorted = np.sort(first)  # payload order: the first sequence holding each n-gram
        placement = ctx.placement
        return RemovalSpec(
            n=n,
            ngrams=windows[first_sorted].astype(np.int64),
            ngram_sequence=owner[first_sorted].astype(np.int64),
            ngram_start=start[first_sorted].astype(np.int64),
            replacement=replacement,
            span=span,
            start_step=placement.start_step if placement.mode == "window" else 0,
            end_step=placement.end_step if placement.mode == "window" else _NO_END,
            steps=tuple(sorted(set(placement.steps))) if placement.mode == "steps" else (),
        )
