"""``multirun check`` on an llm-foundry training YAML: the ``callbacks.multirun`` block, without training.

llm-foundry builds the callback from the YAML's ``callbacks: {multirun: {...}}`` entry and
the trainer fixes the batch size and duration; a bad block would surface only once the
cluster job runs. :func:`check_foundry_yaml` reads the YAML as llm-foundry's ``train``
does (OmegaConf, ``key=value`` overrides merged with ``OmegaConf.from_cli``, ``variables:``
and ``${...}`` interpolation resolved and the config transforms applied by
``llmfoundry.utils.config_utils.make_dataclass_and_log_config``), then validates the block
with the callback's own :class:`~multirun.integration.llmfoundry.DeferredParts` and builds
the plan for the YAML's geometry:

- global batch: ``global_train_batch_size``;
- sequence length: the block's ``sequence_length``, which must equal ``max_seq_len`` and
  ``train_loader.dataset.max_seq_len`` (the width of llm-foundry's rows);
- steps: ``max_duration`` in ``ba``, ``tok`` or ``sp``; in ``ep`` only when the train
  loader reads a local MDS directory whose size says how many steps an epoch has.
- vocabulary: the block's tokenizer has no more ids than ``model.vocab_size`` (when given).

Errors name the llm-foundry YAML and the key, e.g.
``mpt.yaml: callbacks.multirun.experiments[1].payload: ...``.

Example::

    result = check_foundry_yaml("mpt.yaml", ["max_duration=2000ba"])
    result.parts.plan.geometry.num_steps   # 2000
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from composer.core import Time, TimeUnit
from composer.utils import dist

from multirun.errors import ConfigError, PlacementError
from multirun.integration.llmfoundry import BLOCK, DeferredParts, callback_keys, duration_steps
from multirun.run.parts import RunParts
from multirun.types import BatchGeometry

__all__ = ["FoundryCheck", "check_foundry_yaml", "is_foundry_yaml", "load_foundry_yaml"]

# Top-level keys of llm-foundry's training YAML that a multirun YAML never has (its
# schema forbids unknown keys), so either kind of file is told apart by its keys alone.
_FOUNDRY_KEYS = frozenset(
    {"callbacks", "train_loader", "global_train_batch_size", "max_seq_len", "device_train_microbatch_size"}
)


@dataclass
class FoundryCheck:
    """What ``multirun check`` found in an llm-foundry YAML.

    Attributes:
        path: the llm-foundry YAML.
        parts: the run's parts, as the callback would assemble them at ``FIT_START``.
        max_duration: the YAML's ``max_duration``, as written (after overrides).
        notes: how the geometry was derived where it needed an assumption.
    """

    path: Path
    parts: RunParts
    max_duration: str
    notes: list[str]

    @property
    def geometry(self) -> BatchGeometry:
        """The planned global batch size, sequence length and steps."""
        return self.parts.plan.geometry


def is_foundry_yaml(path: str | Path) -> bool:
    """True if ``path`` is an llm-foundry training YAML (rather than a multirun config).

    A file that cannot be read or parsed is not one: ``multirun check`` then reports it
    as a multirun config would be reported.
    """
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and bool(_FOUNDRY_KEYS & set(doc))


def load_foundry_yaml(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The training config llm-foundry's ``train`` would see, as plain dicts.

    ``train_from_yaml`` loads the file with OmegaConf and merges ``OmegaConf.from_cli``
    overrides (``max_duration=20ba``, ``train_loader.dataset.local=/data``);
    ``make_dataclass_and_log_config`` resolves interpolation (``${variables.x}``), applies
    the registered config transforms (``global_train_batch_size`` -> per-device batch) and
    rejects unknown or missing keys. The logged (resolved, unstructured) config is returned.

    Raises:
        ConfigError: naming the file and, where OmegaConf knows it, the key.
    """
    # llm-foundry and OmegaConf (its dependency) are imported only for llm-foundry YAMLs:
    # the plain `multirun check` neither needs the `foundry` extra nor waits for its import.
    try:
        with warnings.catch_warnings():
            # llm-foundry 0.22 imports pkg_resources, whose deprecation warning says nothing about this YAML.
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            from llmfoundry.utils.config_utils import (
                TRAIN_CONFIG_KEYS,
                TrainConfig,
                make_dataclass_and_log_config,
            )
        from omegaconf import DictConfig
        from omegaconf import OmegaConf as om
        from omegaconf.errors import OmegaConfBaseException
    except ImportError as exc:  # pragma: no cover - the foundry extra is installed in tests
        raise ConfigError(
            f"checking an llm-foundry YAML needs llm-foundry (pip install '.[foundry]'): {exc}", file=path
        ) from None

    source = Path(path)
    if not source.is_file():
        raise ConfigError("file not found", file=source)
    try:
        with source.open(encoding="utf-8") as f:
            cfg: Any = om.load(f)  # a DictConfig for any YAML mapping, checked below
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"not a readable YAML: {exc}", file=source) from None
    for override in overrides:
        key = override.partition("=")[0].strip()
        if "=" not in override or not key:
            raise ConfigError("expected KEY=VALUE, e.g. max_duration=20ba", file=source, key=f"override {override!r}")
        try:
            cli = om.from_cli([override])
            try:
                cfg = om.merge(cfg, cli)  # as train_from_yaml merges its command-line arguments
            except (TypeError, ValueError, OmegaConfBaseException):
                # from_cli reads `experiments.1.payload` as a mapping key '1', which cannot be merged
                # into a list: set the list item instead (OmegaConf.update indexes lists).
                om.update(cfg, key, om.select(cli, key), merge=True)
        except (TypeError, ValueError, OmegaConfBaseException) as exc:
            raise ConfigError(_omegaconf_message(exc), file=source, key=f"override {override!r}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError("the top level must be a mapping of keys", file=source)
    try:
        logged, _ = make_dataclass_and_log_config(cfg, TrainConfig, TRAIN_CONFIG_KEYS, transforms="all")
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc), file=source, key=getattr(exc, "full_key", None) or None) from None
    except KeyError as exc:  # a transform reads a key the YAML lacks (llm-foundry would fail the same way)
        raise ConfigError("required by llm-foundry, missing", file=source, key=str(exc.args[0])) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"llm-foundry rejects the config: {exc}", file=source) from None
    return logged


def check_foundry_yaml(path: str | Path, overrides: Sequence[str] = ()) -> FoundryCheck:
    """Validate an llm-foundry YAML's ``callbacks.multirun`` block and plan it for the YAML's geometry.

    Nothing is trained or written. The block is validated by the callback's own
    :meth:`DeferredParts.from_kwargs` and assembled by :meth:`DeferredParts.assemble_for`
    (:func:`~multirun.run.parts.assemble_parts`), as at ``FIT_START``.

    Args:
        path: the llm-foundry training YAML.
        overrides: llm-foundry-style ``key=value`` overrides (``max_duration=20ba``).

    Raises:
        InputError: naming the YAML and the key of the first problem; a placement that
            does not fit the YAML's batch and duration is a :class:`ConfigError` too.
    """
    source = Path(path)
    cfg = load_foundry_yaml(source, overrides)
    block = (cfg.get("callbacks") or {}).get("multirun")
    if not isinstance(block, Mapping):
        raise ConfigError(
            "no multirun callback here: add callbacks: {multirun: {...}} (see `LlmFoundryMultirunCallback`)",
            file=source,
            key=BLOCK,
        )
    known = callback_keys()
    for key in block:
        if key not in known:
            # llm-foundry would fail with a TypeError when it builds the callback.
            raise ConfigError(f"unknown key (allowed: {', '.join(known)})", file=source, key=f"{BLOCK}.{key}")
    sequence_length = _sequence_length(cfg, block, source)
    # The callback's own validation; `overwrite` only matters to a run directory, and none is written.
    deferred = DeferredParts.from_kwargs(
        **{name: block.get(name) for name in known if name != "overwrite"}, file=source
    )
    _check_vocab(cfg, deferred, source)
    global_batch = _global_batch(cfg, source)
    notes: list[str] = []
    duration = _duration(cfg, source)
    steps_per_epoch = None
    if duration.unit == TimeUnit.EPOCH:
        steps_per_epoch, note = _steps_per_epoch(cfg, global_batch)
        if note:
            notes.append(note)
    steps = duration_steps(
        duration,
        global_batch_size=global_batch,
        sequence_length=sequence_length,
        steps_per_epoch=steps_per_epoch,
        file=source,
    )
    geometry = BatchGeometry(global_batch, sequence_length, steps)
    try:
        parts = deferred.assemble_for(geometry)
    except PlacementError as exc:
        # An input problem here: the block asks for more than the YAML's batch and duration hold.
        raise ConfigError(
            f"{exc} (planned for global_train_batch_size {global_batch}, sequence_length {sequence_length}, "
            f"max_duration {cfg['max_duration']} = {steps} steps)",
            file=source,
            key=_experiment_key(str(exc), deferred),
        ) from None
    return FoundryCheck(source, parts, str(cfg["max_duration"]), notes)


def _sequence_length(cfg: Mapping[str, Any], block: Mapping[str, Any], source: Path) -> int:
    """The block's ``sequence_length``, which must be the width of llm-foundry's rows."""
    key = f"{BLOCK}.sequence_length"
    declared = {"max_seq_len": cfg.get("max_seq_len")}
    dataset = (cfg.get("train_loader") or {}).get("dataset") or {}
    if isinstance(dataset, Mapping) and "max_seq_len" in dataset:
        declared["train_loader.dataset.max_seq_len"] = dataset["max_seq_len"]
    given = block.get("sequence_length")
    said = ", ".join(f"{k} {v}" for k, v in declared.items() if v is not None)
    if given is None:
        raise ConfigError(
            f"set sequence_length to the training sequence length (the YAML has {said})", file=source, key=key
        )
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise ConfigError(f"must be a positive whole number of tokens, got {given!r}", file=source, key=key)
    if any(v is not None and v != given for v in declared.values()):
        raise ConfigError(
            f"sequence_length {given} differs from the YAML's {said}: spans are planned for rows of "
            "sequence_length tokens, and llm-foundry's rows are max_seq_len tokens",
            file=source,
            key=key,
        )
    return given


def _check_vocab(cfg: Mapping[str, Any], deferred: DeferredParts, source: Path) -> None:
    """Payload tokens must be ids the model embeds: the block's tokenizer fits the model's vocabulary.

    Only where the YAML states ``model.vocab_size`` (llm-foundry's own models; a Hugging Face
    model's comes with its checkpoint). A larger model vocabulary is usual (padded to a multiple).
    """
    model = cfg.get("model")
    vocab = model.get("vocab_size") if isinstance(model, Mapping) else None
    if isinstance(vocab, bool) or not isinstance(vocab, int):
        return
    if deferred.tokenizer.vocab_size > vocab:
        raise ConfigError(
            f"the tokenizer {deferred.tokenizer.name!r} has {deferred.tokenizer.vocab_size} ids, more than the "
            f"model's vocab_size {vocab}: payload tokens would index past its embeddings (use the tokenizer "
            "llm-foundry trains with)",
            file=source,
            key=f"{BLOCK}.tokenizer" if deferred.inline else f"{BLOCK}.config",
        )


def _global_batch(cfg: Mapping[str, Any], source: Path) -> int:
    value = cfg.get("global_train_batch_size")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"must be a positive whole number of rows, got {value!r}", file=source, key="global_train_batch_size"
        )
    return value


def _duration(cfg: Mapping[str, Any], source: Path) -> Time[int] | Time[float]:
    """``max_duration`` as Composer reads it: a time string, or an integer number of epochs."""
    value = cfg.get("max_duration")
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            return Time(value, TimeUnit.EPOCH)  # Composer's Trainer reads a bare integer as epochs
        return Time.from_timestring(str(value))
    except (ValueError, TypeError):
        raise ConfigError(
            f"expected a Composer time string such as 2000ba, 1000000tok or 64000sp; got {value!r}",
            file=source,
            key="max_duration",
        ) from None


def _steps_per_epoch(cfg: Mapping[str, Any], global_batch: int) -> tuple[int | None, str | None]:
    """Steps in one epoch when the train loader reads one local MDS directory, else None.

    Counted as Streaming and the DataLoader count them: the epoch's samples split over
    the ranks (``ceil(samples / ranks)`` each), whole per-rank batches only when
    ``drop_last``. The ranks are this process's world (1 for ``multirun check``).
    """
    loader = cfg.get("train_loader") or {}
    dataset = loader.get("dataset") or {}
    if not isinstance(dataset, Mapping) or dataset.get("remote") or dataset.get("streams"):
        return None, None
    if dataset.get("epoch_size") is not None or not dataset.get("local"):
        return None, None
    directory = Path(str(dataset["local"])) / str(dataset.get("split") or "")
    try:
        shards = json.loads((directory / "index.json").read_text(encoding="utf-8"))["shards"]
        samples = sum(int(shard["samples"]) for shard in shards)
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    world = dist.get_world_size()
    per_rank = global_batch // world
    rank_samples = math.ceil(samples / world)
    steps = rank_samples // per_rank if loader.get("drop_last", True) else math.ceil(rank_samples / per_rank)
    if steps < 1:
        return None, None
    note = f"1ep = {steps} steps: {samples} samples in {directory} over {world} rank(s)"
    return steps, note


def _experiment_key(message: str, deferred: DeferredParts) -> str:
    """The block's key of the experiment a placement error names (the block itself if none)."""
    if not deferred.inline:
        return f"{BLOCK}.config"
    match = re.match(r"experiment '([^']+)'", message)
    names = [e.name for e in deferred.loaded.config.experiments]
    if match and match.group(1) in names:
        return f"{BLOCK}.experiments[{names.index(match.group(1))}]"
    return f"{BLOCK}.experiments"


def _omegaconf_message(exc: Exception) -> str:
    """OmegaConf's own message, without the full-key/object-type trailer it appends."""
    text = str(exc).strip()
    return text.split("\n    full_key:")[0].strip()
