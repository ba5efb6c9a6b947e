"""The kind SDK: what every injector (and its monitor) builds on.

A payload kind is a plugin: an injector (payload package -> token sequences, arms,
probes) and usually a monitor (probes -> per-item scores on the live model). Plugins
import only from ``multirun`` (this module and the core), never from one another; an
injector hands its monitor what it needs through the prepared experiment's typed
``probes`` and its ``metadata``. See ``docs/writing-a-kind.md``.

An injector's ``prepare`` gets one :class:`PrepareContext`: the payload package, the
experiment's config, the tokenizer, the sequence length, the run seed and the resolved
placement, with the helpers every kind uses (read and validate items, encode texts,
split the arms, draw from a named :class:`RandomStream`, pack the result).

Example:
    >>> int(split_arms(4, 0.5, seed=17, name="demo").sum())   # 2 treated, 2 controls
    2
    >>> RandomStream.ARMS.number, RandomStream.ARMS.by_split_key
    (1, True)
    >>> group_label(4)
    'x4'
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import xxhash

from multirun.config import without_row_defaults
from multirun.errors import ConfigError, PayloadError
from multirun.plan.static import cap_tokens, experiment_rng
from multirun.types import BatchGeometry, EmbeddingNoise, Placement, PreparedExperiment

if TYPE_CHECKING:
    from multirun.config import ExperimentConfig
    from multirun.data.tokenizers import Tokenizer
    from multirun.kinds.payloads import PayloadPackage, TypeSpec

__all__ = [
    "Injector",
    "PrepareContext",
    "RandomStream",
    "RunSources",
    "encode_sequence",
    "group_label",
    "is_blank",
    "pack_sequences",
    "read_items",
    "read_string_pairs",
    "split_arms",
    "stream_rng",
]


class RandomStream(Enum):
    """The named random streams of one experiment.

    Each stream is ``experiment_rng(seed, key, number)``
    (:func:`multirun.plan.static.experiment_rng`), where ``key`` is the experiment's
    ``split_key`` (its ``arms_key``, else its name) for streams with ``by_split_key``
    and its name for the others. Streams never share draws and do not depend on the
    other experiments of the run. An experiment has one kind, so the numbers 2 and 3
    are each kind's own: two kinds using the same number never draw for the same
    experiment. (Dynamic placement, :mod:`multirun.plan.dynamic`, seeds its own
    generators with ``[seed, name, 3, decision]``, which no stream here equals.)

    Members are ``(number, by_split_key, purpose)``.
    """

    PLACEMENT = (0, False, "the static planner: steps, rows and offsets of the experiment's spans")
    ARMS = (1, True, "the treated/control split (split_arms) and contamination's group assignment")
    POISON_GIBBERISH = (2, False, "poison: the gibberish behaviour texts")
    WATERMARK_NOISE = (2, False, "watermark (gaussian): the embedding-noise seed")
    WATERMARK_KEYS = (3, False, "watermark (random_tokens): the secret keys")
    KIND_FIRST = (2, False, "free for a plugin kind's own first kind of draw")
    KIND_SECOND = (3, False, "free for a plugin kind's own second kind of draw")

    def __init__(self, number: int, by_split_key: bool, purpose: str) -> None:
        self.number = number
        self.by_split_key = by_split_key
        self.purpose = purpose


def stream_rng(seed: int, name: str, stream: RandomStream) -> np.random.Generator:
    """The generator of ``stream`` for the key ``name`` (the caller picks name or split key).

    Example:
        >>> a = stream_rng(7, "wm", RandomStream.WATERMARK_KEYS).integers(0, 100, 3)
        >>> b = experiment_rng(7, "wm", 3).integers(0, 100, 3)
        >>> a.tolist() == b.tolist()
        True
    """
    return experiment_rng(seed, name, stream.number)


def group_label(group: int) -> str:
    """Label of a repetition group in reports: ``x0`` (controls), ``x4``, ``x16``."""
    return f"x{group}"


def split_arms(n_items: int, control_fraction: float, *, seed: int, name: str) -> np.ndarray:
    """Boolean mask over items: True = treated, False = held-out control.

    Exactly ``round(control_fraction * n_items)`` items are controls (Python's
    ``round``), chosen by the :attr:`RandomStream.ARMS` stream
    (``experiment_rng(seed, name, 1)``; pass the experiment's ``split_key``): the
    split depends on the seed and the name only, not on other experiments.
    """
    n_control = round(control_fraction * n_items)
    treated = np.ones(n_items, dtype=bool)
    if n_control:
        rng = stream_rng(seed, name, RandomStream.ARMS)
        treated[rng.permutation(n_items)[:n_control]] = False
    return treated


# Characters that show nothing on their own: controls (Cc: NUL, tabs, newlines), format
# characters (Cf: zero-width space and joiners, BOM, bidi marks, soft hyphen) and
# separators (Zs, Zl, Zp: every kind of space).
_INVISIBLE = frozenset(("Cc", "Cf", "Zs", "Zl", "Zp"))


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: empty, or only whitespace, control, zero-width or
    other format characters (Unicode categories Cc, Cf, Zs, Zl, Zp).

    Example:
        >>> is_blank(" \u200b\u2060\t"), is_blank("\u200bx")
        (True, False)
    """
    return all(unicodedata.category(c) in _INVISIBLE for c in text)


def read_string_pairs(
    values: Sequence[Any], names: tuple[str, str], *, key: str, file: Path, line: int
) -> list[tuple[str, str]]:
    """``values``, a list of objects with exactly the two non-blank string keys ``names``,
    as ``(first, second)`` tuples (knowledge's probes, muse's questions and answers).

    A :class:`~multirun.errors.PayloadError` names ``file``, ``line`` and the key
    (``key[j]`` or ``key[j].name``) of the first problem.

    Example:
        >>> read_string_pairs([{"q": "Who?", "a": "Ada"}], ("q", "a"), key="qa", file=Path("x.jsonl"), line=3)
        [('Who?', 'Ada')]
    """
    first, second = names
    out: list[tuple[str, str]] = []
    for j, pair in enumerate(values):
        at = f"{key}[{j}]"
        if not isinstance(pair, Mapping):
            raise PayloadError(
                f"must be an object {{{first}, {second}}}, got {pair!r:.60}", file=file, line=line, key=at
            )
        extra = sorted(str(k) for k in set(pair) - set(names))
        if extra:
            raise PayloadError(f"unknown key {extra[0]!r} (allowed: {first}, {second})", file=file, line=line, key=at)
        for name in names:
            if name not in pair:
                raise PayloadError("required key is missing", file=file, line=line, key=f"{at}.{name}")
            if not isinstance(pair[name], str) or is_blank(pair[name]):
                raise PayloadError(
                    f"must be a non-empty string, got {pair[name]!r:.60}", file=file, line=line, key=f"{at}.{name}"
                )
        out.append((pair[first], pair[second]))
    return out


def encode_sequence(tokenizer: Tokenizer, text: str, *, wrap_eos: bool) -> list[int]:
    """``[eos] + encode(text) + [eos]`` (or just the tokens without wrapping)."""
    ids = list(tokenizer.encode(text))
    if wrap_eos:
        eos = int(tokenizer.eos_token_id)
        return [eos, *ids, eos]
    return ids


def pack_sequences(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate sequences into ``(token_pool int32, offsets int64, lengths int32)``."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int32, count=len(sequences))
    offsets = np.zeros(len(sequences), dtype=np.int64)
    if len(sequences) > 1:
        np.cumsum(lengths[:-1], out=offsets[1:])
    pool = np.fromiter((t for s in sequences for t in s), dtype=np.int32, count=int(lengths.sum()))
    return pool, offsets, lengths


_BLANK = "must be a non-empty string (it is empty, or only spaces, zero-width or control characters)"


def read_items(
    payload: PayloadPackage,
    role: str = "items",
    *,
    required: Mapping[str, TypeSpec] | None = None,
    optional: Mapping[str, TypeSpec] | None = None,
    text_keys: Sequence[str] = ("text",),
) -> list[tuple[int, dict[str, Any]]]:
    """Validated ``(line, record)`` pairs with unique string ``id``s.

    Defaults: ``required = {"id": str, "text": str}``, ``optional = {"repetitions": float}``.
    ``id`` and the ``text_keys`` must show something (not :func:`is_blank`: a text of
    only spaces, zero-width or control characters is refused like an empty one);
    ``repetitions``, when present, > 0. No string may hold a NUL or a lone surrogate
    (:func:`~multirun.kinds.payloads.read_jsonl_file`).

    Raises:
        PayloadError: naming ``file:line`` and the key.
    """
    required = {"id": str, "text": str} if required is None else required
    optional = {"repetitions": float} if optional is None else optional
    path = payload.path(role)
    records = payload.iter_jsonl(role, required=required, optional=optional)
    if not records:
        raise PayloadError(f"no items: a {payload.kind} payload needs at least one line", file=path)
    first_line: dict[str, int] = {}
    for line, rec in records:
        item_id = rec["id"]
        if is_blank(item_id):
            raise PayloadError(_BLANK, file=path, line=line, key="id")
        if item_id in first_line:
            raise PayloadError(
                f"duplicate id {item_id!r} (first on line {first_line[item_id]})", file=path, line=line, key="id"
            )
        first_line[item_id] = line
        for k in text_keys:
            if k in rec and is_blank(rec[k]):
                raise PayloadError(_BLANK, file=path, line=line, key=k)
        if "repetitions" in rec and not rec["repetitions"] > 0:
            raise PayloadError(f"must be > 0, got {rec['repetitions']}", file=path, line=line, key="repetitions")
    return records


@dataclass(frozen=True)
class RunSources:
    """The run's own token datasets, for kinds whose items come from them (``replay``).

    Each is resolved only when a kind asks (the demo corpus is built on demand), and
    each raises a :class:`~multirun.errors.ConfigError` naming the config key when the
    run has no such dataset.

    Attributes:
        train: returns the training dataset's MDS directory (``data.path``, or the demo's).
        heldout: returns the held-out split's MDS directory (``data.heldout_path``, or the
            split ``multirun prepare --heldout-fraction`` wrote into the dataset, or the
            demo's held-out text).
        heldout_loss_rows: the held-out split's first rows that the held-out loss evaluates
            (``monitoring.heldout_rows``): a kind must not train on them.
        train_steps: given global steps of the run's first epoch, the training dataset's
            sample ids of each (``{step: ids}``, in global-row order), as the run's Trainer
            will draw them; None where the order is not known (llm-foundry data).
    """

    train: Callable[[], Path]
    heldout: Callable[[], Path]
    heldout_loss_rows: int = 0
    train_steps: Callable[[Sequence[int]], dict[int, list[int]]] | None = None


@dataclass(frozen=True)
class PrepareContext:
    """Everything an injector's ``prepare`` gets, with the helpers every kind uses.

    Attributes:
        payload: the loaded, hash-verified payload package.
        spec: the experiment's config entry (name, options, repetitions,
            control_fraction, wrap_eos, monitor, ...).
        tokenizer: the run's tokenizer.
        sequence_length: tokens per training row; every injected sequence must fit.
        seed: the run seed.
        placement: where the experiment's spans may go (resolved to steps).
        geometry: the run's batch geometry (the planner's horizon), when known: doses are
            then checked against what the placement can hold (:meth:`dose_budget`).
        max_modified_fraction: the run's ``injection.max_modified_fraction``.
        sources: the run's datasets (:class:`RunSources`), when the caller knows the run's
            config (``multirun check``/``train``); None for a payload checked on its own.

    Example::

        def prepare(self, ctx: PrepareContext) -> PreparedExperiment:
            ctx.check_no_options(self.kind)
            records = ctx.read_items()
            treated = ctx.split_arms(len(records))
            ...
            return ctx.experiment(self.kind, item_ids=..., treated=treated, sequences=..., ...)
    """

    payload: PayloadPackage
    spec: ExperimentConfig
    tokenizer: Tokenizer
    sequence_length: int
    seed: int
    placement: Placement
    geometry: BatchGeometry | None = None
    max_modified_fraction: float = 1.0
    sources: RunSources | None = field(default=None, compare=False)
    # id -> (file, line, record) of every item read by read_items: where a dose came from.
    _items: dict[str, tuple[Path, int, dict[str, Any]]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        """The experiment's name."""
        return self.spec.name

    @property
    def eos(self) -> int:
        """The tokenizer's EOS token id."""
        return int(self.tokenizer.eos_token_id)

    def rng(self, stream: RandomStream) -> np.random.Generator:
        """A fresh generator of this experiment's ``stream`` (the same numbers on every call)."""
        return stream_rng(self.seed, self.spec.split_key if stream.by_split_key else self.spec.name, stream)

    def split_arms(self, n_items: int) -> np.ndarray:
        """:func:`split_arms` with the experiment's ``control_fraction``, seed and split key."""
        return split_arms(n_items, self.spec.control_fraction, seed=self.seed, name=self.spec.split_key)

    def encode(self, text: str, *, wrap_eos: bool | None = None) -> list[int]:
        """:func:`encode_sequence`; ``wrap_eos`` defaults to the experiment's ``wrap_eos``."""
        return encode_sequence(self.tokenizer, text, wrap_eos=self.spec.wrap_eos if wrap_eos is None else wrap_eos)

    def read_items(
        self,
        role: str = "items",
        *,
        required: Mapping[str, TypeSpec] | None = None,
        optional: Mapping[str, TypeSpec] | None = None,
        text_keys: Sequence[str] = ("text",),
    ) -> list[tuple[int, dict[str, Any]]]:
        """:func:`read_items` of the payload's file with ``role``."""
        records = read_items(self.payload, role, required=required, optional=optional, text_keys=text_keys)
        path = self.payload.path(role)
        for line, rec in records:
            self._items.setdefault(rec["id"], (path, line, rec))
        return records

    def dose_budget(self) -> tuple[int, int] | None:
        """``(steps, cap)``: the steps of the placement and the injected tokens one step may
        hold (:func:`~multirun.plan.static.cap_tokens`); None without a geometry.

        ``steps x cap`` tokens is the most an experiment can ever have placed: the
        planner refuses more, so doses beyond it are refused before anything is built
        for them.
        """
        if self.geometry is None:
            return None
        p = self.placement
        steps = len(set(p.steps)) if p.mode == "steps" else max(p.end_step - p.start_step, 0)
        return steps, cap_tokens(self.geometry, self.max_modified_fraction)

    def check_no_options(self, kind: str) -> None:
        """ConfigError (key ``options.NAME``) if an injector that takes no options is given some."""
        for name in self.spec.options:
            raise ConfigError(f"the {kind} injector takes no options", key=f"options.{name}")

    def monitor_applies(self, kind: str) -> bool:
        """True when the experiment is measured by ``kind``'s own monitor (enabled, and
        no other monitor named): only then are that monitor's options this kind's concern."""
        return self.spec.monitor.enabled and self.spec.monitor.name in (None, kind)

    def fingerprint(self, content: str | None = None) -> str:
        """xxh64 over everything that determines the prepared experiment's content.

        ``content``: a digest of what the kind read from outside its payload (a replay's
        source rows), so that a change there changes the fingerprint too.
        """
        placement = self.placement
        # The payload enters by its content, not by how its path was spelt (a config's
        # relative path is absolute in resolved_config.yaml); how it is measured does not
        # change what is injected.
        spec = self.spec.model_dump(mode="json", exclude={"payload", "monitor"})
        spec["placement"] = without_row_defaults(spec["placement"])
        rows = [placement.whole, placement.at] if placement.by_row else []
        doc = {
            "payload": self.payload.fingerprint,
            "spec": spec,
            "tokenizer": self.tokenizer.fingerprint(),
            "sequence_length": self.sequence_length,
            "seed": self.seed,
            "placement": [placement.mode, placement.start_step, placement.end_step, list(placement.steps), *rows],
        }
        if content is not None:  # absent for every payload-only kind: their fingerprints are unchanged
            doc["content"] = content
        return xxhash.xxh64(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()

    def experiment(
        self,
        kind: str,
        *,
        item_ids: list[str],
        treated: np.ndarray,
        sequences: Sequence[Sequence[int]],
        seq_items: Sequence[int] | np.ndarray,
        seq_repetitions: Sequence[float] | np.ndarray,
        metadata: dict[str, Any],
        probes: Any,
        embedding_noise: EmbeddingNoise | None = None,
        dose_key: str = "repetitions",
        content: str | None = None,
    ) -> PreparedExperiment:
        """Pack the injector's sequences into a :class:`PreparedExperiment`.

        ``sequences[j]`` belongs to item ``seq_items[j]`` and is injected
        ``seq_repetitions[j]`` times; ``probes`` is the kind's probes dataclass. The
        context adds what every kind shares: the token pool, the content fingerprint,
        and the payload's name, version and fingerprint in ``metadata``.

        With a :attr:`geometry`, the doses are checked first (:meth:`check_doses`;
        ``dose_key``: the payload key that sets an item's dose, for the error).
        """
        self.check_doses(sequences, seq_items, seq_repetitions, item_ids, dose_key=dose_key)
        pool, offsets, lengths = pack_sequences(sequences)
        payload = self.payload
        return PreparedExperiment(
            name=self.spec.name,
            kind=kind,
            item_ids=item_ids,
            treated=treated,
            token_pool=pool,
            seq_offsets=offsets,
            seq_lengths=lengths,
            seq_items=np.asarray(seq_items, dtype=np.int32),
            seq_repetitions=np.asarray(seq_repetitions, dtype=np.float64),
            placement=self.placement,
            fingerprint=self.fingerprint(content),
            metadata={
                "payload": {"name": payload.name, "version": payload.version, "fingerprint": payload.fingerprint},
                **metadata,
            },
            probes=probes,
            embedding_noise=embedding_noise,
        )

    def check_doses(
        self,
        sequences: Sequence[Sequence[int]],
        seq_items: Sequence[int] | np.ndarray,
        seq_repetitions: Sequence[float] | np.ndarray,
        item_ids: Sequence[str],
        *,
        dose_key: str = "repetitions",
    ) -> None:
        """Refuse doses whose tokens exceed what the placement can ever hold (:meth:`dose_budget`).

        Counts whole repetitions only (``floor``), so whatever is refused here the planner
        would refuse too, after allocating a span per repetition. Skipped without a
        geometry and for experiments that are not statically injected (``inject: false``,
        or controlled). The error blames the item with the largest dose: a
        :class:`~multirun.errors.PayloadError` at its line when the payload set it
        (``dose_key``), else a :class:`~multirun.errors.ConfigError` on ``repetitions``.
        """
        budget = self.dose_budget()
        if self.placement.whole is not None:
            return  # whole rows are exempt from the cap: the planner checks their rows (docs/placement.md)
        if budget is None or not self.spec.inject or self.spec.controller is not None or not len(sequences):
            return
        steps, cap = budget
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.float64, count=len(sequences))
        with np.errstate(over="ignore", invalid="ignore"):
            need = np.floor(np.asarray(seq_repetitions, dtype=np.float64)) * lengths
            per_item = np.bincount(np.asarray(seq_items, dtype=np.int64), weights=need, minlength=len(item_ids))
            total = float(need.sum())
        limit = steps * cap
        if np.isfinite(total) and total <= limit:
            return
        worst = int(np.argmax(np.nan_to_num(per_item, nan=np.inf)))
        item_id = item_ids[worst]
        reps = np.asarray(seq_repetitions, dtype=np.float64)[np.asarray(seq_items) == worst]
        dose = float(reps.sum()) if reps.size else 0.0
        msg = (
            f"doses too large for the run: the experiment's injections need {total:.4g} tokens, but its placement "
            f"can hold at most {limit} ({steps} steps x {cap} tokens, the per-step cap = "
            f"max_modified_fraction {self.max_modified_fraction} x {self.geometry.global_batch_size if self.geometry else '?'} rows x "
            f"{self.sequence_length} tokens); item {item_id!r} alone is injected {dose:.4g} times "
            f"({per_item[worst]:.4g} tokens)"
        )
        source = self._items.get(item_id)
        if source is not None and dose_key in source[2]:
            raise PayloadError(msg, file=source[0], line=source[1], key=dose_key)
        raise ConfigError(msg, key="repetitions")

    def check_monitor(self, experiment: PreparedExperiment) -> None:
        """Build the experiment's own monitor once, now, when it applies (:meth:`monitor_applies`).

        For a kind whose monitor options constrain the payload: the monitor (looked up
        in the ``monitors`` registry by the kind's name, as the framework does) raises
        its ConfigErrors (``monitor.options.<name>``) and PayloadErrors before training
        instead of after the data is prepared. The monitor built here is discarded.
        """
        if not self.monitor_applies(experiment.kind):
            return
        from multirun.kinds.registry import monitors  # the registry imports no plugin code

        monitor_class: Any = monitors.get(experiment.kind)
        monitor_class.from_experiment(
            experiment,
            tokenizer=self.tokenizer,
            options=dict(self.spec.monitor.options),
            sequence_length=self.sequence_length,
        )


@runtime_checkable
class Injector(Protocol):
    """Turns a payload package into injectable token sequences for one experiment.

    Implementations are constructed without arguments. ``prepare`` gets a
    :class:`~multirun.kinds.sdk.PrepareContext` (payload, experiment config,
    tokenizer, sequence length, seed, placement and the shared helpers) and returns
    the :class:`~multirun.types.PreparedExperiment`, with the kind's probes
    dataclass in ``probes``. It validates ``ctx.spec.options`` itself: a problem
    with the spec is a :class:`~multirun.errors.ConfigError` with ``key`` relative
    to the experiment (``options.foo``) and no file; the caller adds both.
    """

    kind: str

    def prepare(self, ctx: PrepareContext) -> PreparedExperiment: ...
