"""Experiment assembly: config entries -> payload packages -> prepared experiments.

Example::

    loaded = load_config(None)
    geo = BatchGeometry(global_batch_size=16, sequence_length=128, num_steps=300)
    exps = build_experiments(loaded, tokenizer=ByteTokenizer(), geometry=geo)
    arms_record(exps)["canaries"]["control"][:2]   # ['canary-003', 'canary-007']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from multirun.config import LoadedConfig, resolve_placement
from multirun.errors import ConfigError, PayloadError
from multirun.kinds.payloads import load_package, resolve_payload_ref
from multirun.kinds.registry import injectors
from multirun.kinds.sdk import PrepareContext
from multirun.types import BatchGeometry, PreparedExperiment

if TYPE_CHECKING:
    from multirun.data.tokenizers import Tokenizer

__all__ = ["arms_record", "build_experiments"]


def build_experiments(
    loaded: LoadedConfig, *, tokenizer: Tokenizer, geometry: BatchGeometry
) -> list[PreparedExperiment]:
    """Load each experiment's payload, pick its injector and prepare its sequences.

    Raises:
        ConfigError: duplicate names, a payload ref that resolves to nothing,
            an unknown or mismatched injector kind, a bad placement or bad
            injector options; each names the config file and ``experiments[i]...``.
        PayloadError: a malformed payload package (names payload.yaml or file:line).
    """
    config = loaded.config
    source = loaded.source
    seen: dict[str, int] = {}
    for i, spec in enumerate(config.experiments):
        # load_config checks this too; a config built in code has not been through it.
        if spec.name in seen:
            raise ConfigError(
                f"duplicate experiment name {spec.name!r} (also experiments[{seen[spec.name]}].name)",
                file=source,
                key=f"experiments[{i}].name",
            )
        seen[spec.name] = i

    out: list[PreparedExperiment] = []
    for i in range(len(config.experiments)):
        try:
            out.append(_build_one(loaded, i, tokenizer=tokenizer, geometry=geometry))
        except ConfigError as e:
            if source is None or e.file != str(source) or e.line is not None or not e.key:
                raise
            # Errors about the config file get the line of their key, as load_config's do.
            raise ConfigError(e.message, file=source, key=e.key, line=loaded.line_of(e.key)) from None
    return out


def _build_one(loaded: LoadedConfig, i: int, *, tokenizer: Tokenizer, geometry: BatchGeometry) -> PreparedExperiment:
    config, source, spec = loaded.config, loaded.source, loaded.config.experiments[i]
    where = f"experiments[{i}]"
    try:
        root = resolve_payload_ref(spec.payload, base_dir=loaded.base_dir)
    except PayloadError as e:
        raise ConfigError(e.message, file=source, key=f"{where}.payload") from None
    payload = load_package(root)
    if spec.kind is not None:
        injectors.get(spec.kind, file=source, key=f"{where}.kind")  # unknown kind: list the known ones
        if spec.kind != payload.kind:
            raise ConfigError(
                f"kind {spec.kind!r} does not match the payload's kind {payload.kind!r} ({payload.root / 'payload.yaml'})",
                file=source,
                key=f"{where}.kind",
            )
    kind = payload.kind
    injector_cls = injectors.get(kind, file=payload.root / "payload.yaml", key="kind")
    placement = resolve_placement(spec.placement, geometry, key=f"{where}.placement", file=source)
    injector = injector_cls()
    try:
        prepared = injector.prepare(
            PrepareContext(
                payload=payload,
                spec=spec,
                tokenizer=tokenizer,
                sequence_length=geometry.sequence_length,
                seed=config.seed,
                placement=placement,
            )
        )
    except ConfigError as e:
        if e.file is not None:
            raise
        # The injector knows the spec, not where it was written: add the file and entry.
        raise ConfigError(e.message, file=source, key=f"{where}.{e.key}" if e.key else where) from None
    if prepared.name != spec.name or prepared.kind != kind:
        raise RuntimeError(
            f"injector {kind!r} returned experiment {prepared.name!r}/{prepared.kind!r} for {spec.name!r}"
        )
    return prepared


def arms_record(experiments: Sequence[PreparedExperiment]) -> dict[str, dict[str, list[Any]]]:
    """``{name: {"treated": [ids], "control": [ids]}}`` in payload order, for ``arms.json``."""
    record: dict[str, dict[str, list[Any]]] = {}
    for e in experiments:
        treated = np.asarray(e.treated, dtype=bool)
        record[e.name] = {
            "treated": [i for i, t in zip(e.item_ids, treated) if t],
            "control": [i for i, t in zip(e.item_ids, treated) if not t],
        }
    return record
