"""A run's inputs, resolved from its config: tokenizer, dataset, batch geometry, held-out rows.

Paths in a config file are relative to that file's directory. Everything here can
fail on bad input, and does so before a Trainer exists.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from composer.utils import dist

from multirun.config import LoadedConfig, parse_duration_steps
from multirun.data.mds import PreparedDataset, build_demo_dataset, demo_heldout_rows, read_dataset_info, read_rows
from multirun.data.tokenizers import Tokenizer, load_tokenizer
from multirun.errors import ConfigError, InputError
from multirun.types import BatchGeometry


def run_dir_of(loaded: LoadedConfig, explicit: str | Path | None = None) -> Path:
    """Where the run writes: ``explicit``, else ``run_dir`` of the config, else ``runs/<run_name>``."""
    config = loaded.config
    return Path(explicit) if explicit is not None else Path(config.run_dir or f"runs/{config.run_name}")


def resolve_dataset(loaded: LoadedConfig, tokenizer: Tokenizer, *, progress: bool = True) -> PreparedDataset:
    """The run's MDS dataset: the cached demo corpus, or a prepared dataset checked against the config."""
    data = loaded.config.data
    if data.source == "demo":
        return build_demo_dataset(tokenizer, data.sequence_length, max_bytes=data.demo_max_bytes, progress=progress)
    info = read_dataset_info(_required(loaded, data.path, key="data.path"))
    if info.sequence_length != data.sequence_length:
        raise ConfigError(
            f"the dataset at {info.path} has sequences of {info.sequence_length} tokens, the config says "
            f"{data.sequence_length}",
            file=loaded.source,
            key="data.sequence_length",
        )
    # Identity is the tokenizer's fingerprint (its files' content), not how its path was
    # spelled: 'hf:tok' and 'hf:/abs/tok' are the same tokenizer when the files are equal.
    if info.tokenizer_fingerprint != tokenizer.fingerprint():
        raise ConfigError(
            f"the dataset at {info.path} was tokenized with {info.tokenizer!r} (fingerprint "
            f"{info.tokenizer_fingerprint}), the run uses {tokenizer.name!r} (fingerprint {tokenizer.fingerprint()})",
            file=loaded.source,
            key="data.path",
        )
    return info


def run_geometry(loaded: LoadedConfig, dataset: PreparedDataset) -> BatchGeometry:
    """The run's batch geometry: global batch, sequence length and steps, checked against the dataset.

    Raises:
        ConfigError: naming the key (with its line) whose value does not fit the dataset,
            the world size or the planner's bound on steps (:data:`multirun.config.MAX_STEPS`).
    """
    train = loaded.config.train
    world = dist.get_world_size()
    if train.global_batch_size % world:
        raise _error(
            loaded,
            "train.global_batch_size",
            f"global_batch_size {train.global_batch_size} is not divisible by the world size {world}",
        )
    per_rank = train.global_batch_size // world
    steps_per_epoch = math.ceil(dataset.num_samples / world) // per_rank
    if steps_per_epoch == 0:
        raise _error(
            loaded,
            "train.global_batch_size",
            f"the dataset has {dataset.num_samples} sequences, fewer than one global batch",
        )
    if loaded.config.data.num_canonical_nodes > dataset.num_samples:
        # Streaming partitions the samples over the canonical nodes: more nodes than
        # samples is meaningless, and a huge count is a huge partition array.
        raise _error(
            loaded,
            "data.num_canonical_nodes",
            f"{loaded.config.data.num_canonical_nodes} canonical nodes for a dataset of {dataset.num_samples} sequences",
        )
    try:
        num_steps = parse_duration_steps(
            train.max_duration,
            global_batch_size=train.global_batch_size,
            sequence_length=dataset.sequence_length,
            steps_per_epoch=steps_per_epoch,
        )
    except ConfigError as err:
        raise _error(loaded, err.key or "train.max_duration", err.message) from None
    return BatchGeometry(train.global_batch_size, dataset.sequence_length, num_steps)


def _error(loaded: LoadedConfig, key: str, message: str) -> ConfigError:
    """A ConfigError at ``key`` of the config file, with its line when the file has the key."""
    return ConfigError(message, file=loaded.source, key=key, line=loaded.line_of(key) if loaded.lines else None)


def run_tokenizer(loaded: LoadedConfig) -> Tokenizer:
    """The config's tokenizer (a path relative to the config file's directory)."""
    tokenizer = loaded.config.tokenizer
    return load_tokenizer(tokenizer.kind, _resolve(loaded, tokenizer.path))


def heldout_rows(loaded: LoadedConfig, tokenizer: Tokenizer, sequence_length: int) -> np.ndarray | None:
    """Rows for the held-out loss: the demo's unused stdlib files; ``data.heldout_path``
    (multirun's or llm-foundry's MDS); else the held-out split the training dataset
    records (``multirun prepare --heldout-fraction``); else none."""
    count = loaded.config.monitoring.heldout_rows
    data = loaded.config.data
    if count == 0:
        return None
    if data.source == "demo":
        return demo_heldout_rows(tokenizer, sequence_length, count=count, train_max_bytes=data.demo_max_bytes)
    if data.heldout_path is not None:
        # Cut to the run's sequence length, as llm-foundry cuts its rows to max_seq_len.
        return read_rows(_required(loaded, data.heldout_path, key="data.heldout_path"), count, sequence_length)
    split = read_dataset_info(_required(loaded, data.path, key="data.path")).heldout_path
    if split is None:
        return None
    try:
        return read_rows(split, count, sequence_length)
    except InputError as err:
        # The default split is too small for monitoring.heldout_rows: say which keys decide.
        raise ConfigError(
            f"the dataset's held-out split: {err} (lower monitoring.heldout_rows, prepare with a larger "
            "--heldout-fraction, or set data.heldout_path)",
            file=loaded.source,
            key="monitoring.heldout_rows",
        ) from err


def _resolve(loaded: LoadedConfig, path: str | None) -> str | None:
    """Paths in a config file are relative to that file's directory."""
    if path is None:
        return None
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else loaded.base_dir / candidate)


def _required(loaded: LoadedConfig, path: str | None, *, key: str) -> str:
    resolved = _resolve(loaded, path)
    if resolved is None:  # validation requires it in a YAML config; a config built in code may lack it
        raise ConfigError("a path is required here", file=loaded.source, key=key)
    return resolved
