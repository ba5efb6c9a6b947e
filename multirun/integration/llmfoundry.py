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

Controllers (``experiments[i].controller``) work on this path as in ``multirun train``:
they are built with the plan at ``FIT_START`` and decide after each evaluation of
their experiment's monitor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from composer.core import State, TimeUnit
from composer.utils import dist
from pydantic import ValidationError

from multirun.config import LoadedConfig, RunConfig, load_config
from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError
from multirun.integration.callback import MultirunCallback
from multirun.kinds.payloads import load_payload
from multirun.run.inputs import heldout_rows, run_tokenizer
from multirun.run.parts import RunParts, assemble_parts
from multirun.types import BatchGeometry


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
        run_dir: str | Path | None = None,
        overwrite: bool = False,
    ) -> None:
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
        )
        super().__init__(pending, overwrite=overwrite)


@dataclass
class DeferredParts:
    """A validated config whose parts wait for the trainer's geometry."""

    loaded: LoadedConfig
    tokenizer: Tokenizer
    sequence_length: int
    run_dir: Path
    heldout: np.ndarray | None = None

    @property
    def interaction_after(self) -> str:
        return self.loaded.config.interaction.after

    @classmethod
    def from_kwargs(
        cls,
        *,
        config: str | Path | None,
        sequence_length: int | None,
        experiments: list[dict] | None,
        injection: dict | None,
        tokenizer: dict | None,
        seed: int | None,
        run_dir: str | Path | None,
        monitoring: dict | None = None,
        interaction: dict | None = None,
    ) -> DeferredParts:
        if config is not None:
            if experiments is not None or monitoring is not None or interaction is not None:
                raise ConfigError(
                    "give either config or inline experiments/monitoring/interaction, not both",
                    key="callbacks.multirun",
                )
            loaded = load_config(config)
        else:
            if experiments is None:
                raise ConfigError(
                    "needs `config` (a multirun YAML) or an inline `experiments` list", key="callbacks.multirun"
                )
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
            try:
                loaded = LoadedConfig(config=RunConfig.model_validate(raw), source=None, base_dir=Path.cwd())
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
                raise ConfigError(problems, key="callbacks.multirun") from None
        if sequence_length is None:
            raise ConfigError(
                "set sequence_length (the training sequence length, llm-foundry's max_seq_len)",
                key="callbacks.multirun.sequence_length",
            )
        for experiment in loaded.config.experiments:
            load_payload(experiment.payload, base_dir=loaded.base_dir)  # fails now, naming the payload file
        resolved_run_dir = Path(run_dir) if run_dir is not None else Path(loaded.config.run_dir or "multirun")
        tokenizer_ = run_tokenizer(loaded)
        heldout = None
        if loaded.config.data.source != "demo":  # the demo corpus is not this run's data
            heldout = heldout_rows(loaded, tokenizer_, int(sequence_length))
        return cls(loaded, tokenizer_, int(sequence_length), resolved_run_dir, heldout)

    def assemble(self, state: State) -> RunParts:
        """The run's parts for the trainer's global batch and duration."""
        per_rank = getattr(state.dataloader, "batch_size", None)
        if per_rank is None:
            raise ConfigError("the train dataloader has no batch_size; multirun needs a fixed batch size")
        global_batch = int(per_rank) * dist.get_world_size()
        steps = steps_in_duration(state, global_batch, self.sequence_length)
        geometry = BatchGeometry(global_batch, self.sequence_length, steps)
        return assemble_parts(
            self.loaded, tokenizer=self.tokenizer, geometry=geometry, run_dir=self.run_dir, heldout=self.heldout
        )


def steps_in_duration(state: State, global_batch_size: int, sequence_length: int) -> int:
    """Number of training steps in ``state.max_duration``."""
    duration = state.max_duration
    if duration is None:
        raise ConfigError("the trainer has no max_duration", key="max_duration")
    value = int(duration.value)
    if duration.unit == TimeUnit.BATCH:
        return value
    if duration.unit == TimeUnit.TOKEN:
        return math.ceil(value / (global_batch_size * sequence_length))
    if duration.unit == TimeUnit.SAMPLE:
        return math.ceil(value / global_batch_size)
    if duration.unit == TimeUnit.EPOCH:
        if state.dataloader_len is None:
            raise ConfigError("max_duration in epochs needs a dataloader with a length", key="max_duration")
        return value * int(state.dataloader_len)
    raise ConfigError(f"unsupported max_duration unit {duration.unit}", key="max_duration")
