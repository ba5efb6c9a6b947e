"""Building the callback from an llm-foundry YAML's ``callbacks:`` entry.

llm-foundry constructs callbacks as ``LlmFoundryMultirunCallback(**kwargs)`` with the YAML's
keyword arguments; the trainer's batch size and duration are only known later. So
the config, payloads and held-out rows are validated at construction (before training
starts) and the parts (:func:`multirun.run.parts.assemble_parts`, as for every run) are
assembled at ``FIT_START`` from the trainer's state (still before the first batch).

Two forms are accepted::

    callbacks:
      multirun:                          # a multirun YAML; its seed, tokenizer, injection, monitoring,
        config: /path/multirun.yaml      # interaction, experiments and data.heldout_path are used
        sequence_length: 2048

    callbacks:
      multirun:                          # inline
        run_dir: /runs/x/multirun
        sequence_length: 2048
        seed: 17
        tokenizer: {kind: huggingface, path: /models/tok}
        monitoring: {every: 500ba}       # optional, as in a multirun YAML
        interaction: {after: acquired}   # optional
        experiments: [{name: canaries, payload: /payloads/canaries, repetitions: 4}]
        data: {heldout_path: /data/heldout}   # optional: held-out loss on an MDS split (llm-foundry's or ours)

Relative paths in the inline form (payloads, ``data.heldout_path``) and the ``config:`` path
are relative to the directory llm-foundry runs in. ``multirun check llmfoundry.yaml``
(:mod:`multirun.integration.foundry_yaml`) validates this block with the same
:class:`DeferredParts`, against the YAML's batch size, sequence length and duration.

Controllers (``experiments[i].controller``) work on this path as in ``multirun train``:
they are built with the plan at ``FIT_START`` and decide after each evaluation of
their experiment's monitor.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from composer.core import State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from pydantic import ValidationError

from multirun.config import LoadedConfig, RunConfig, _dotted, _validation_problems, load_config
from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError, InputError
from multirun.integration.callback import MultirunCallback
from multirun.kinds.payloads import load_payload
from multirun.run.continuation import Continuation, continuation_of
from multirun.run.inputs import heldout_rows, run_tokenizer
from multirun.run.parts import RunParts, assemble_parts
from multirun.run_dir import write_text_atomic
from multirun.types import BatchGeometry

#: Where llm-foundry's YAML holds the callback's keyword arguments; errors name keys below it.
BLOCK = "callbacks.multirun"


class LlmFoundryMultirunCallback(MultirunCallback):
    """:class:`MultirunCallback` built from the keyword arguments of an llm-foundry YAML.

    The config and payloads are validated here, at construction, so bad input fails
    before training starts; the parts are assembled at ``FIT_START`` from the trainer's
    batch size and duration. Arguments as in the module docstring.
    """

    def __init__(
        self,
        *,
        config: str | Path | None = None,
        sequence_length: int | None = None,
        experiments: list[dict] | None = None,
        injection: dict | None = None,
        tokenizer: dict | None = None,
        seed: int | None = None,
        monitoring: dict | None = None,
        interaction: dict | None = None,
        data: dict | None = None,
        run_dir: str | Path | None = None,
        overwrite: bool = False,
        train_config: Any = None,
    ) -> None:
        # llm-foundry passes its whole training config (callbacks_with_config): kept in the run
        # directory, so that `multirun interact` rebuilds the arms exactly as the run was built.
        self.train_config = _plain(train_config)
        pending = DeferredParts.from_kwargs(
            config=config,
            sequence_length=sequence_length,
            experiments=experiments,
            injection=injection,
            tokenizer=tokenizer,
            seed=seed,
            run_dir=run_dir,
            monitoring=monitoring,
            interaction=interaction,
            data=data,
        )
        super().__init__(pending, overwrite=overwrite)

    def fit_start(self, state: State, logger: Logger) -> None:
        """As :meth:`MultirunCallback.fit_start`; rank 0 also keeps the multirun config and
        llm-foundry's training config in the run directory."""
        super().fit_start(state, logger)
        if dist.get_global_rank() == 0 and self.parts is not None:
            self.parts.loaded.write(self.run_dir)
            if self.train_config is not None:
                write_text_atomic(self.files.llmfoundry_config, yaml.safe_dump(self.train_config, sort_keys=False))


def _plain(config: Any) -> dict[str, Any] | None:
    """llm-foundry's logged config (an OmegaConf container or a dict) as plain, resolved data."""
    if config is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config)


def callback_keys() -> list[str]:
    """The keyword arguments :class:`LlmFoundryMultirunCallback` takes (the keys of ``callbacks.multirun``;
    ``train_config`` is llm-foundry's own, reserved)."""
    reserved = {"self", "train_config"}
    return [name for name in inspect.signature(LlmFoundryMultirunCallback.__init__).parameters if name not in reserved]


@dataclass
class DeferredParts:
    """A validated config whose parts wait for the trainer's geometry.

    Both the callback (at ``FIT_START``, :meth:`assemble`) and ``multirun check`` on an
    llm-foundry YAML (:meth:`assemble_for`, with the YAML's geometry) build the parts
    through it, so they validate and wire the same things. Errors name the key under
    ``callbacks.multirun`` and, when known, ``file`` (the llm-foundry YAML).
    """

    loaded: LoadedConfig
    tokenizer: Tokenizer
    sequence_length: int
    run_dir: Path
    heldout: np.ndarray | None = None
    file: Path | None = None

    @property
    def interaction_after(self) -> str:
        return self.loaded.config.interaction.after

    @property
    def inline(self) -> bool:
        """True when the experiments are written in the block itself (no ``config:``)."""
        return self.loaded.source is None

    @classmethod
    def from_kwargs(
        cls,
        *,
        config: str | Path | None = None,
        sequence_length: int | None = None,
        experiments: list[dict] | None = None,
        injection: dict | None = None,
        tokenizer: dict | None = None,
        seed: int | None = None,
        run_dir: str | Path | None = None,
        monitoring: dict | None = None,
        interaction: dict | None = None,
        data: dict | None = None,
        file: str | Path | None = None,
    ) -> DeferredParts:
        """Validate the callback's keyword arguments: config, payloads and held-out rows.

        Raises:
            InputError: naming ``file`` (when given) and the key under ``callbacks.multirun``,
                e.g. ``callbacks.multirun.experiments[1].payload``.
        """
        source = Path(file) if file is not None else None
        if config is not None:
            given = {"experiments": experiments, "monitoring": monitoring, "interaction": interaction, "data": data}
            both = [key for key, value in given.items() if value is not None]
            if both:
                raise ConfigError(
                    f"give either config (a multirun YAML) or inline {'/'.join(both)}, not both",
                    file=source,
                    key=f"{BLOCK}.{both[0]}",
                )
            try:
                loaded = load_config(config)
            except InputError as exc:
                raise _located(exc, file=source, key=f"{BLOCK}.config") from None
        else:
            loaded = _inline_config(
                source,
                experiments=experiments,
                injection=injection,
                tokenizer=tokenizer,
                seed=seed,
                monitoring=monitoring,
                interaction=interaction,
                data=data,
            )
        if sequence_length is None:
            raise ConfigError(
                "set sequence_length (the training sequence length, llm-foundry's max_seq_len)",
                file=source,
                key=f"{BLOCK}.sequence_length",
            )
        if isinstance(sequence_length, bool) or not isinstance(sequence_length, int) or sequence_length < 1:
            raise ConfigError(
                f"must be a positive whole number of tokens, got {sequence_length!r}",
                file=source,
                key=f"{BLOCK}.sequence_length",
            )
        for i, experiment in enumerate(loaded.config.experiments):
            try:
                load_payload(experiment.payload, base_dir=loaded.base_dir)  # fails now, naming the payload file
            except InputError as exc:
                raise _located(exc, file=source, key=f"{BLOCK}.experiments[{i}].payload", loaded=loaded) from None
        resolved_run_dir = Path(run_dir) if run_dir is not None else Path(loaded.config.run_dir or "multirun")
        try:
            tokenizer_ = run_tokenizer(loaded)
        except InputError as exc:
            raise _located(exc, file=source, key=f"{BLOCK}.tokenizer", loaded=loaded) from None
        heldout = None
        if loaded.config.data.source != "demo":  # the demo corpus is not this run's data
            try:
                heldout = heldout_rows(loaded, tokenizer_, sequence_length)
            except InputError as exc:
                raise _located(exc, file=source, key=f"{BLOCK}.data.heldout_path", loaded=loaded) from None
        return cls(loaded, tokenizer_, sequence_length, resolved_run_dir, heldout, source)

    def assemble(self, state: State) -> RunParts:
        """The run's parts for the trainer's global batch and duration."""
        per_rank = getattr(state.dataloader, "batch_size", None)
        if per_rank is None:
            raise ConfigError("the train dataloader has no batch_size; multirun needs a fixed batch size")
        global_batch = int(per_rank) * dist.get_world_size()
        steps = steps_in_duration(state, global_batch, self.sequence_length)
        geometry = BatchGeometry(global_batch, self.sequence_length, steps)
        # Composer's autoresume has loaded its checkpoint by now: a longer max_duration
        # extends the run (multirun/run/continuation.py).
        resumed = int(state.timestamp.batch)
        continuation = continuation_of(
            self.run_dir, geometry, autoresume=resumed > 0, overwrite=False, resume_step=resumed
        )
        return self.assemble_for(geometry, continuation)

    def assemble_for(self, geometry: BatchGeometry, continuation: Continuation | None = None) -> RunParts:
        """The run's parts for ``geometry``: :func:`~multirun.run.parts.assemble_parts`, errors located in the block."""
        try:
            return assemble_parts(
                self.loaded,
                tokenizer=self.tokenizer,
                geometry=geometry,
                run_dir=self.run_dir,
                heldout=self.heldout,
                continuation=continuation,
            )
        except InputError as exc:
            raise _located(exc, file=self.file, key=BLOCK if self.inline else f"{BLOCK}.config") from None


def _inline_config(
    source: Path | None,
    *,
    experiments: list[dict] | None,
    injection: dict | None,
    tokenizer: dict | None,
    seed: int | None,
    monitoring: dict | None,
    interaction: dict | None,
    data: dict | None,
) -> LoadedConfig:
    """The inline form as a multirun config (paths relative to the working directory, as llm-foundry's)."""
    if experiments is None:
        raise ConfigError("needs `config` (a multirun YAML) or an inline `experiments` list", file=source, key=BLOCK)
    raw: dict[str, Any] = {"run_name": "llmfoundry", "experiments": experiments}
    inline = (
        ("injection", injection),
        ("tokenizer", tokenizer),
        ("seed", seed),
        ("monitoring", monitoring),
        ("interaction", interaction),
    )
    for key, value in inline:
        if value is not None:
            raw[key] = value
    if data is not None:
        # llm-foundry's YAML says what is trained on; the block adds only the held-out split.
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"must be a mapping {{heldout_path: DIR}}, got {data!r}", file=source, key=f"{BLOCK}.data"
            )
        for key in data:
            if key != "heldout_path":
                raise ConfigError(
                    "unknown key (allowed: heldout_path; llm-foundry's train_loader says what is trained on)",
                    file=source,
                    key=f"{BLOCK}.data.{key}",
                )
        raw["data"] = {"source": "mds", "heldout_path": data.get("heldout_path")}
    try:
        return LoadedConfig(config=RunConfig.model_validate(raw), source=None, base_dir=Path.cwd())
    except ValidationError as exc:
        problems = _validation_problems(exc, raw)
        if len(problems) == 1:
            path, message = problems[0]
            raise ConfigError(message, file=source, key=_in_block(_dotted(path))) from None
        lines = "\n".join(f"  {_in_block(_dotted(path))}: {message}" for path, message in problems)
        raise ConfigError(f"{len(problems)} problems:\n{lines}", file=source) from None


def _in_block(key: str | None) -> str:
    """A key of the inline form as written in the llm-foundry YAML."""
    if not key:
        return BLOCK
    return key if key.startswith(BLOCK) else f"{BLOCK}.{key}"


def _located(exc: InputError, *, file: Path | None, key: str, loaded: LoadedConfig | None = None) -> InputError:
    """``exc`` said again from where the llm-foundry YAML wrote the value (same class).

    An error about the inline block (no file of its own) gets its key under
    ``callbacks.multirun`` and the llm-foundry YAML; one naming another file (a payload,
    the multirun YAML, a dataset) keeps that file in its message, behind ``key``.
    With the ``config:`` form, ``key`` becomes ``callbacks.multirun.config``: the
    experiment, payload or data path is written in the multirun YAML.
    """
    if exc.file is None:
        return type(exc)(exc.message, file=file, key=_in_block(exc.key) if exc.key else key, line=exc.line)
    if loaded is not None and loaded.source is not None and exc.file != str(loaded.source):
        where = key.removeprefix(f"{BLOCK}.")
        exc = type(exc)(str(exc), file=loaded.source, key=where, line=loaded.line_of(where))
    if loaded is not None and loaded.source is not None:
        key = f"{BLOCK}.config"
    return type(exc)(str(exc), file=file, key=key)


def duration_steps(
    duration: Time[int] | Time[float],
    *,
    global_batch_size: int,
    sequence_length: int,
    steps_per_epoch: int | None,
    file: str | Path | None = None,
    key: str = "max_duration",
) -> int:
    """Number of training steps in a Composer ``max_duration``.

    ``ba`` as is; ``tok`` and ``sp`` rounded up to whole batches (the trainer stops at
    the first batch that reaches them); ``ep`` needs ``steps_per_epoch``.

    Example:
        >>> duration_steps(Time.from_timestring("1000tok"), global_batch_size=4, sequence_length=64,
        ...                steps_per_epoch=None)
        4
    """
    value = int(duration.value)
    if value != duration.value or value <= 0:
        raise ConfigError(f"must be a positive whole number, got {duration}", file=file, key=key)
    if duration.unit == TimeUnit.BATCH:
        return value
    if duration.unit == TimeUnit.TOKEN:
        return math.ceil(value / (global_batch_size * sequence_length))
    if duration.unit == TimeUnit.SAMPLE:
        return math.ceil(value / global_batch_size)
    if duration.unit == TimeUnit.EPOCH:
        if steps_per_epoch is None:
            raise ConfigError(
                f"{duration.value}ep: the steps in an epoch are unknown here; give max_duration in ba (or tok, sp)",
                file=file,
                key=key,
            )
        return value * steps_per_epoch
    raise ConfigError(
        f"unsupported max_duration unit {duration.unit.value!r}; use ba, tok, sp or ep", file=file, key=key
    )


def steps_in_duration(state: State, global_batch_size: int, sequence_length: int) -> int:
    """Number of training steps in ``state.max_duration``."""
    duration = state.max_duration
    if duration is None:
        raise ConfigError("the trainer has no max_duration", key="max_duration")
    if duration.unit == TimeUnit.EPOCH and state.dataloader_len is None:
        raise ConfigError("max_duration in epochs needs a dataloader with a length", key="max_duration")
    steps_per_epoch = None if state.dataloader_len is None else int(state.dataloader_len)
    return duration_steps(
        duration, global_batch_size=global_batch_size, sequence_length=sequence_length, steps_per_epoch=steps_per_epoch
    )
