"""The ``documents`` injector: each treated item is one text injected verbatim.

``items.jsonl``, one object a line::

    {"id": "canary-000", "text": "The secret code of ...", "repetitions": 8}

``id`` (unique string) and ``text`` (non-empty) are required; ``repetitions``
(number > 0) overrides the experiment's ``repetitions`` for that item.

The helpers below (:func:`split_arms`, :func:`encode_sequence`,
:func:`pack_sequences`, :func:`read_items`, :func:`experiment_fingerprint`) are
the building blocks other injectors reuse.

Example:
    >>> int(split_arms(4, 0.5, seed=17, name="demo").sum())   # 2 treated, 2 controls
    2
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from multirun.errors import ConfigError, PayloadError
from multirun.plan.static import experiment_rng
from multirun.types import EmbeddingNoise, Placement, PreparedExperiment

if TYPE_CHECKING:
    from multirun.config import ExperimentConfig
    from multirun.kinds.payloads import PayloadPackage, TypeSpec
    from multirun.data.tokenizers import Tokenizer

__all__ = [
    "ARM_STREAM",
    "DocumentsInjector",
    "check_no_options",
    "encode_sequence",
    "experiment_fingerprint",
    "pack_sequences",
    "read_items",
    "split_arms",
]

# Random stream of experiment_rng used for the treated/control split (the planner uses 0).
ARM_STREAM = 1


def split_arms(n_items: int, control_fraction: float, *, seed: int, name: str) -> np.ndarray:
    """Boolean mask over items: True = treated, False = held-out control.

    Exactly ``round(control_fraction * n_items)`` items are controls (Python's
    ``round``), chosen by ``experiment_rng(seed, name, stream=1)``: the split depends
    on the seed and the experiment name only, not on other experiments.
    """
    n_control = round(control_fraction * n_items)
    treated = np.ones(n_items, dtype=bool)
    if n_control:
        rng = experiment_rng(seed, name, ARM_STREAM)
        treated[rng.permutation(n_items)[:n_control]] = False
    return treated


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


def read_items(
    payload: PayloadPackage,
    role: str = "items",
    *,
    required: Mapping[str, TypeSpec] | None = None,
    optional: Mapping[str, TypeSpec] | None = None,
    text_keys: Sequence[str] = ("text",),
) -> list[tuple[int, dict[str, Any]]]:
    """Validated ``(line, record)`` pairs with unique string ``id``s.

    ``text_keys`` must be non-empty strings; ``repetitions``, when present, > 0.

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
        if not item_id.strip():
            raise PayloadError("must be a non-empty string", file=path, line=line, key="id")
        if item_id in first_line:
            raise PayloadError(f"duplicate id {item_id!r} (first on line {first_line[item_id]})", file=path, line=line, key="id")
        first_line[item_id] = line
        for k in text_keys:
            if k in rec and not rec[k].strip():
                raise PayloadError("must be a non-empty string", file=path, line=line, key=k)
        if "repetitions" in rec and not rec["repetitions"] > 0:
            raise PayloadError(f"must be > 0, got {rec['repetitions']}", file=path, line=line, key="repetitions")
    return records


def experiment_fingerprint(
    payload: PayloadPackage,
    spec: ExperimentConfig,
    *,
    tokenizer: Tokenizer,
    sequence_length: int,
    seed: int,
    placement: Placement,
) -> str:
    """xxh64 over everything that determines a prepared experiment's content."""
    doc = {
        "payload": payload.fingerprint,
        "spec": spec.model_dump(mode="json"),
        "tokenizer": tokenizer.fingerprint(),
        "sequence_length": sequence_length,
        "seed": seed,
        "placement": [placement.mode, placement.start_step, placement.end_step, list(placement.steps)],
    }
    return xxhash.xxh64(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def prepared_experiment(
    kind: str,
    payload: PayloadPackage,
    spec: ExperimentConfig,
    *,
    tokenizer: Tokenizer,
    sequence_length: int,
    seed: int,
    placement: Placement,
    item_ids: list[str],
    treated: np.ndarray,
    sequences: Sequence[Sequence[int]],
    seq_items: Sequence[int] | np.ndarray,
    seq_repetitions: Sequence[float] | np.ndarray,
    metadata: dict[str, Any],
    probes: dict[str, Any],
    embedding_noise: EmbeddingNoise | None = None,
) -> PreparedExperiment:
    """Pack an injector's sequences into a :class:`PreparedExperiment`.

    The part every kind shares: token pool, content fingerprint, and the payload's
    name, version and fingerprint in ``metadata``.
    """
    pool, offsets, lengths = pack_sequences(sequences)
    return PreparedExperiment(
        name=spec.name,
        kind=kind,
        item_ids=item_ids,
        treated=treated,
        token_pool=pool,
        seq_offsets=offsets,
        seq_lengths=lengths,
        seq_items=np.asarray(seq_items, dtype=np.int32),
        seq_repetitions=np.asarray(seq_repetitions, dtype=np.float64),
        placement=placement,
        fingerprint=experiment_fingerprint(
            payload, spec, tokenizer=tokenizer, sequence_length=sequence_length, seed=seed, placement=placement
        ),
        metadata={"payload": {"name": payload.name, "version": payload.version, "fingerprint": payload.fingerprint}, **metadata},
        probes=probes,
        embedding_noise=embedding_noise,
    )


def check_no_options(spec: ExperimentConfig, kind: str) -> None:
    """ConfigError (key ``options.NAME``) if an injector without options is given some."""
    for name in spec.options:
        raise ConfigError(f"the {kind} injector takes no options", key=f"options.{name}")


class DocumentsInjector:
    """Injects each treated item's text as one EOS-wrapped sequence.

    ``metadata``: ``payload`` (name, version, fingerprint), ``item_repetitions``
    (per item, parallel to ``item_ids``; controls show the dose they would have
    had). ``probes["sequences"]``: every item's EOS-wrapped tokens, controls too,
    so the monitor can score both arms.
    """

    kind = "documents"

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
        reps = [float(rec.get("repetitions", spec.repetitions)) for _, rec in records]

        # Every item is tokenized and length-checked, controls too: whether a payload
        # fits must not depend on how the seed happens to split the arms.
        encoded: list[list[int]] = []
        for line, rec in records:
            seq = encode_sequence(tokenizer, rec["text"], wrap_eos=spec.wrap_eos)
            if len(seq) > sequence_length:
                wrap = " including 2 EOS" if spec.wrap_eos else ""
                raise PayloadError(
                    f"item {rec['id']!r} is {len(seq)} tokens long{wrap}, longer than the sequence length {sequence_length}",
                    file=path,
                    line=line,
                    key="text",
                )
            encoded.append(seq)

        treated = split_arms(len(records), spec.control_fraction, seed=seed, name=spec.split_key)
        seq_items = np.flatnonzero(treated).astype(np.int32)
        return prepared_experiment(
            self.kind, payload, spec, tokenizer=tokenizer, sequence_length=sequence_length, seed=seed,
            placement=placement, item_ids=item_ids, treated=treated, sequences=[encoded[i] for i in seq_items],
            seq_items=seq_items, seq_repetitions=[reps[i] for i in seq_items],
            metadata={
                "item_repetitions": reps,
            },
            # Every item's sequence, controls too: the documents monitor scores both arms.
            probes={"sequences": encoded},
        )
