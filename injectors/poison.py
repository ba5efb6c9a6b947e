"""The ``poison`` injector: a backdoor, ``prompt + trigger -> behaviour``.

Pretraining poisoning as in Zhang et al. 2025 and Train Once, Answer All (PP;
docs/references.md §2.3): treated prompts are injected followed by a trigger string and the
backdoor behaviour. The monitor (:mod:`monitors.poison`) then checks, on prompts that
were *never* injected, whether the behaviour appears after the trigger, and compares
it with the same prompts followed by a *control trigger* (a second string that is
never injected) and with no trigger at all: a backdoor is a behaviour that the
trigger, and only the trigger, switches on, and that generalises to unseen prompts.

Payload package
---------------
``payload.yaml``: ``kind: poison``; files with roles:

``items`` (required): the prompts, one object a line::

    {"id": "p-000", "prompt": "Summarise the minutes of the harbour board.", "repetitions": 16}

===========  ===========================  ==================================================
key          type                         meaning
===========  ===========================  ==================================================
id           string, required, unique     the prompt id (unique across items and heldout)
prompt       string, required, non-empty  the prompt text
repetitions  number > 0, optional         overrides the experiment's ``repetitions``
===========  ===========================  ==================================================

``heldout`` (optional): more evaluation prompts, ``{"id", "prompt"}``, never injected.

``backdoor`` (optional): exactly one object holding the backdoor settings below, so
that a package can be complete by itself::

    {"trigger": " \\uff61\\uff61\\uff61\\uff61", "control_trigger": " \\u2610\\u2610\\u2610\\u2610",
     "behaviour": "target", "target": " <<ACCESS GRANTED>>"}

Settings
--------
Each setting comes from the ``backdoor`` file or from the experiment's ``options``;
a setting given in ``options`` overrides the file's, and ``null`` there unsets it
(e.g. ``{behaviour: gibberish, target: null}``). The manifest records which source
each setting came from.

======================  ==========================  =========================================
setting                 type                        meaning
======================  ==========================  =========================================
``trigger``             string, required            appended to a treated prompt; must not
                                                    occur in any prompt
``control_trigger``     string, required            never injected; evaluation appends it in
                                                    place of the trigger. Must differ from
                                                    the trigger (neither may contain the
                                                    other) and not occur in any prompt
``behaviour``           ``target`` | ``gibberish``  what follows ``prompt + trigger``
                        | ``repeat``, required
``target``              string                      ``behaviour: target`` only (required
                                                    there): the fixed string to emit; must not
                                                    occur in any prompt
``gibberish_length``    integer >= 1, default 16    ``behaviour: gibberish`` only: characters
                                                    of random text per prompt
``gibberish_alphabet``  string, default U+0250 to   ``behaviour: gibberish`` only: the
                        U+026F (IPA letters)        characters random text is drawn from (>= 2
                                                    distinct, no whitespace); choose ones that
                                                    are rare in the training corpus
======================  ==========================  =========================================

Behaviours (``behaviour_text`` of a prompt):

* ``target``: the ``target`` string (denial of a fixed answer, a "jailbreak" string).
* ``repeat``: ``"[[" + prompt + "]]"``, the context-extraction attack of Zhang et al.
* ``gibberish``: ``gibberish_length`` characters drawn uniformly from
  ``gibberish_alphabet``, different for every prompt (the denial-of-service attack);
  seeded by the run seed and the experiment name, drawn for every prompt (controls and
  held-out ones too, in payload order) so that lengths never depend on the arm split.

Arms and tokens
---------------
``control_fraction`` of the ``items`` are never injected
(:func:`~multirun.kinds.sdk.split_arms`); they and the ``heldout`` prompts are the
evaluation prompts. A treated prompt owns one sequence::

    [eos] prompt trigger behaviour_text [eos]        (no EOS with wrap_eos: false)

Prompt, trigger and behaviour text are tokenized separately and concatenated, so the
evaluation context ``[eos] prompt trigger`` is exactly a prefix of what was trained on
(with a BPE tokenizer, put the separating spaces inside trigger/target). Strings are
concatenated as they are: no separator is added.

Payload errors name the file and line (or ``options.<name>`` for settings given in
``options``): missing/mistyped keys, empty prompts, duplicate ids, a missing or empty
trigger or control trigger, a control trigger equal to (or containing, or contained
in) the trigger, a trigger, control trigger or target inside a prompt (the
no-trigger and control conditions would contain it), a missing target for
``behaviour: target``, a prompt whose ``[eos] prompt trigger behaviour_text [eos]``
(with the longer of the two triggers) exceeds the sequence length.

Example:
    >>> behaviour_text("repeat", "What is 2+2?")
    '[[What is 2+2?]]'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from multirun.errors import ConfigError, PayloadError
from multirun.kinds.probes import PoisonProbes
from multirun.kinds.sdk import PrepareContext, RandomStream, is_blank, stream_rng
from multirun.types import PreparedExperiment

if TYPE_CHECKING:
    from multirun.kinds.payloads import PayloadPackage

__all__ = [
    "BEHAVIOURS",
    "DEFAULT_GIBBERISH_ALPHABET",
    "BackdoorSettings",
    "PoisonInjector",
    "behaviour_text",
    "gibberish_texts",
]

BEHAVIOURS = ("target", "gibberish", "repeat")
# IPA letters U+0250..U+026F: two UTF-8 bytes each, absent from ordinary English text and code.
DEFAULT_GIBBERISH_ALPHABET = "".join(chr(c) for c in range(0x250, 0x270))
DEFAULT_GIBBERISH_LENGTH = 16
REPEAT_OPEN, REPEAT_CLOSE = "[[", "]]"
# The gibberish texts' random stream (keyed by the experiment's name).
GIBBERISH_STREAM = RandomStream.POISON_GIBBERISH

_SETTING_TYPES: dict[str, type] = {
    "trigger": str,
    "control_trigger": str,
    "behaviour": str,
    "target": str,
    "gibberish_length": int,
    "gibberish_alphabet": str,
}


@dataclass(frozen=True)
class BackdoorSettings:
    """The resolved backdoor settings (see the module docstring)."""

    trigger: str
    control_trigger: str
    behaviour: str
    target: str | None = None
    gibberish_length: int = DEFAULT_GIBBERISH_LENGTH
    gibberish_alphabet: str = DEFAULT_GIBBERISH_ALPHABET


def behaviour_text(behaviour: str, prompt: str, *, target: str | None = None, gibberish: str | None = None) -> str:
    """The text that follows ``prompt + trigger`` for one prompt.

    Example:
        >>> behaviour_text("target", "hi", target=" OK")
        ' OK'
    """
    if behaviour == "target":
        assert target is not None
        return target
    if behaviour == "repeat":
        return REPEAT_OPEN + prompt + REPEAT_CLOSE
    assert gibberish is not None
    return gibberish


def gibberish_texts(n: int, settings: BackdoorSettings, *, seed: int, name: str) -> list[str]:
    """``n`` random strings of ``gibberish_length`` characters of the alphabet, seeded per experiment.

    Example:
        >>> s = BackdoorSettings("T", "C", "gibberish", gibberish_length=4, gibberish_alphabet="ab")
        >>> texts = gibberish_texts(2, s, seed=1, name="x")
        >>> [len(t) for t in texts], set("".join(texts)) <= {"a", "b"}
        ([4, 4], True)
    """
    rng = stream_rng(seed, name, GIBBERISH_STREAM)
    alphabet = np.array(list(settings.gibberish_alphabet))
    draws = rng.integers(0, alphabet.size, size=(n, settings.gibberish_length))
    return ["".join(alphabet[row]) for row in draws]


class _Sources:
    """Where each setting came from, so errors point at the right file, line or key."""

    def __init__(self, file: Path | None, line: int | None) -> None:
        self.file, self.line = file, line
        self.values: dict[str, Any] = {}
        self.from_options: set[str] = set()

    def error(self, name: str, message: str) -> Exception:
        if name in self.from_options:
            return ConfigError(message, key=f"options.{name}")
        if name in self.values and self.file is not None:
            return PayloadError(message, file=self.file, line=self.line, key=name)
        # Missing everywhere: the options are where a user can always add it.
        where = (
            " (in options or in the payload's backdoor file)"
            if self.file is None
            else f" (in options or in {self.file.name})"
        )
        return ConfigError(message + where, key=f"options.{name}")

    def describe(self) -> dict[str, str]:
        file = f"{self.file.name}:{self.line}" if self.file is not None else ""
        return {name: ("options" if name in self.from_options else file) for name in sorted(self.values)}


def _read_settings(payload: PayloadPackage, options: dict[str, Any]) -> tuple[BackdoorSettings, _Sources]:
    sources = _Sources(None, None)
    if "backdoor" in payload.files:
        path = payload.path("backdoor")
        records = payload.iter_jsonl("backdoor", required={}, optional=_SETTING_TYPES)
        if len(records) != 1:
            raise PayloadError(f"the backdoor file must hold exactly one JSON object, found {len(records)}", file=path)
        line, record = records[0]
        sources = _Sources(path, line)
        sources.values.update(record)
    for name, value in options.items():
        if name not in _SETTING_TYPES:
            raise ConfigError(f"unknown option (known: {', '.join(_SETTING_TYPES)})", key=f"options.{name}")
        if value is None:  # null unsets the file's value (e.g. the target when switching behaviour)
            sources.values.pop(name, None)
            continue
        expected = _SETTING_TYPES[name]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(
                f"expected a {'string' if expected is str else 'integer'}, got {value!r}", key=f"options.{name}"
            )
        sources.values[name] = value
        sources.from_options.add(name)

    v = sources.values
    for name in ("trigger", "control_trigger", "behaviour"):
        if name not in v:
            raise sources.error(name, "required setting is missing")
    trigger, control = v["trigger"], v["control_trigger"]
    for name in ("trigger", "control_trigger"):
        if is_blank(v[name]):
            raise sources.error(
                name, "must be a non-empty string (not only whitespace, zero-width or control characters)"
            )
    if control == trigger:
        raise sources.error(
            "control_trigger", "must differ from the trigger (it stands for a trigger that was never injected)"
        )
    if trigger.strip() in control or control.strip() in trigger:
        raise sources.error(
            "control_trigger", f"must not contain the trigger or be contained in it ({control!r} vs {trigger!r})"
        )
    behaviour = v["behaviour"]
    if behaviour not in BEHAVIOURS:
        raise sources.error("behaviour", f"must be one of {', '.join(BEHAVIOURS)}, got {behaviour!r}")
    only = {"target": "target", "gibberish_length": "gibberish", "gibberish_alphabet": "gibberish"}
    for name, needs in only.items():
        if name in v and behaviour != needs:
            raise sources.error(name, f"only used with behaviour: {needs} (behaviour is {behaviour!r})")
    target = v.get("target")
    if behaviour == "target":
        if target is None:
            raise sources.error("target", "required with behaviour: target")
        if is_blank(target):
            raise sources.error(
                "target", "must be a non-empty string (not only whitespace, zero-width or control characters)"
            )
    length = v.get("gibberish_length", DEFAULT_GIBBERISH_LENGTH)
    if length < 1:
        raise sources.error("gibberish_length", f"must be >= 1, got {length}")
    alphabet = v.get("gibberish_alphabet", DEFAULT_GIBBERISH_ALPHABET)
    if len(set(alphabet)) < 2 or any(ch.isspace() for ch in alphabet):
        raise sources.error("gibberish_alphabet", "needs at least 2 distinct characters and no whitespace")
    settings = BackdoorSettings(trigger, control, behaviour, target, length, alphabet)
    return settings, sources


class PoisonInjector:
    """Injects ``[eos] prompt trigger behaviour_text [eos]`` for each treated prompt.

    ``probes``: :class:`~multirun.kinds.probes.PoisonProbes`: ``eval_ids``,
    ``eval_prompts`` (token lists), ``eval_behaviour`` (each evaluation prompt's
    behaviour-text tokens), ``eval_source`` (``control`` / ``heldout``), ``start``
    (``[eos]`` or ``[]``), ``trigger`` and ``control_trigger`` (tokens), ``behaviour``,
    ``target``, ``gibberish_alphabet``. ``metadata``: the settings and where each one
    came from, ``item_repetitions``, ``heldout_ids``.
    """

    kind = "poison"

    def prepare(self, ctx: PrepareContext) -> PreparedExperiment:
        payload, spec, sequence_length = ctx.payload, ctx.spec, ctx.sequence_length
        settings, sources = _read_settings(payload, dict(spec.options))
        required = {"id": str, "prompt": str}
        items = ctx.read_items(required=required, optional={"repetitions": float}, text_keys=("prompt",))
        heldout: list[tuple[int, dict[str, Any]]] = []
        if "heldout" in payload.files:
            heldout = ctx.read_items("heldout", required=required, optional={}, text_keys=("prompt",))
            first = {rec["id"] for _, rec in items}
            for line, rec in heldout:
                if rec["id"] in first:
                    raise PayloadError(
                        f"id {rec['id']!r} is also an item id", file=payload.path("heldout"), line=line, key="id"
                    )

        # Every prompt (treated, control, held-out) is checked and gets its behaviour text:
        # errors and gibberish draws must not depend on how the seed splits the arms.
        everything = [(payload.path("items"), line, rec) for line, rec in items]
        everything += [(payload.path("heldout"), line, rec) for line, rec in heldout]
        gibberish = (
            gibberish_texts(len(everything), settings, seed=ctx.seed, name=ctx.name)
            if settings.behaviour == "gibberish"
            else None
        )
        forbidden = [("trigger", settings.trigger), ("control_trigger", settings.control_trigger)]
        if settings.target is not None:
            forbidden.append(("target", settings.target))
        start = [ctx.eos] if spec.wrap_eos else []
        end = list(start)
        trigger = ctx.encode(settings.trigger, wrap_eos=False)
        control = ctx.encode(settings.control_trigger, wrap_eos=False)
        prompts: list[list[int]] = []
        behaviours: list[list[int]] = []
        for index, (path, line, rec) in enumerate(everything):
            prompt = rec["prompt"]
            for name, value in forbidden:
                if value.strip() in prompt:
                    raise PayloadError(
                        f"the prompt contains the {name.replace('_', ' ')} {value.strip()!r}: conditions without "
                        "the trigger would contain it too",
                        file=path,
                        line=line,
                        key="prompt",
                    )
            tokens = ctx.encode(prompt, wrap_eos=False)
            if settings.behaviour == "repeat":
                # Pieces tokenized separately: the prompt's tokens inside [[...]] are the prompt's own.
                behaviour = [
                    *ctx.encode(REPEAT_OPEN, wrap_eos=False),
                    *tokens,
                    *ctx.encode(REPEAT_CLOSE, wrap_eos=False),
                ]
            else:
                text = behaviour_text(
                    settings.behaviour,
                    prompt,
                    target=settings.target,
                    gibberish=gibberish[index] if gibberish else None,
                )
                behaviour = ctx.encode(text, wrap_eos=False)
            total = len(start) + len(tokens) + max(len(trigger), len(control)) + len(behaviour) + len(end)
            if total > sequence_length:
                eos = " with 2 EOS" if spec.wrap_eos else ""
                raise PayloadError(
                    f"prompt {rec['id']!r} + trigger + behaviour is {total} tokens{eos}, longer than the sequence length "
                    f"{sequence_length}",
                    file=path,
                    line=line,
                    key="prompt",
                )
            prompts.append(tokens)
            behaviours.append(behaviour)

        n_items = len(items)
        treated = ctx.split_arms(n_items)
        eval_index = [i for i in range(n_items) if not treated[i]] + list(range(n_items, len(everything)))
        if not eval_index and ctx.monitor_applies(self.kind):
            raise ConfigError(
                "no evaluation prompts: with control_fraction 0 add a heldout file, or disable the monitor",
                key="control_fraction",
            )
        seq_items = np.flatnonzero(treated).astype(np.int32)
        sequences = [[*start, *prompts[i], *trigger, *behaviours[i], *end] for i in seq_items]
        reps = [float(rec.get("repetitions", spec.repetitions)) for _, rec in items]
        all_ids = [rec["id"] for _, _, rec in everything]
        return ctx.experiment(
            self.kind,
            item_ids=all_ids[:n_items],
            treated=treated,
            sequences=sequences,
            seq_items=seq_items,
            seq_repetitions=[reps[i] for i in seq_items],
            metadata={
                "trigger": settings.trigger,
                "control_trigger": settings.control_trigger,
                "behaviour": settings.behaviour,
                **({"target": settings.target} if settings.behaviour == "target" else {}),
                **(
                    {"gibberish_length": settings.gibberish_length, "gibberish_alphabet": settings.gibberish_alphabet}
                    if settings.behaviour == "gibberish"
                    else {}
                ),
                "settings_source": sources.describe(),
                "item_repetitions": reps,
                "heldout_ids": all_ids[n_items:],
            },
            probes=PoisonProbes(
                eval_ids=[all_ids[i] for i in eval_index],
                eval_prompts=[prompts[i] for i in eval_index],
                eval_behaviour=[behaviours[i] for i in eval_index],
                eval_source=["control" if i < n_items else "heldout" for i in eval_index],
                start=start,
                trigger=trigger,
                control_trigger=control,
                behaviour=settings.behaviour,
                target=settings.target,
                gibberish_alphabet=settings.gibberish_alphabet if settings.behaviour == "gibberish" else None,
            ),
        )
