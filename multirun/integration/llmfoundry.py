"""Building the callback from an llm-foundry YAML's ``callbacks:`` entry.

llm-foundry constructs callbacks as ``MultirunCallback(**kwargs)`` with the YAML's
keyword arguments; the trainer's batch size and duration are only known later. So
the config and payloads are validated at construction (before training starts) and
the plan is built at ``FIT_START`` from the trainer's state (still before the first
batch).

Two forms are accepted::

    callbacks:
      multirun:                          # a multirun YAML; its seed, tokenizer, injection
        config: /path/multirun.yaml      # and experiments are used, the rest is ignored
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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer.core import State
from composer.utils import dist
from pydantic import ValidationError

from multirun.config import LoadedConfig, RunConfig, load_config
from multirun.control.loop import ControlLoop, build_control_loop
from multirun.errors import ConfigError
from multirun.measure.runner import MonitorRunner, build_monitors
from multirun.kinds.payloads import load_payload
from multirun.plan.run_plan import RunPlan, build_run_plan
from multirun.data.tokenizers import Tokenizer
from multirun.run.trainer import run_tokenizer
from multirun.types import BatchGeometry


@dataclass
class DeferredPlan:
    """A validated config whose plan waits for the trainer's geometry."""

    loaded: LoadedConfig
    tokenizer: Tokenizer
    sequence_length: int
    run_dir: Path

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
    ) -> "DeferredPlan":
        if config is not None:
            if experiments is not None or monitoring is not None or interaction is not None:
                raise ConfigError(
                    "give either config or inline experiments/monitoring/interaction, not both", key="callbacks.multirun"
                )
            loaded = load_config(config)
        else:
            if experiments is None:
                raise ConfigError(
                    "needs `config` (a multirun YAML) or an inline `experiments` list", key="callbacks.multirun"
                )
            raw: dict[str, Any] = {"run_name": "llmfoundry", "experiments": experiments}
            inline = (
                ("injection", injection), ("tokenizer", tokenizer), ("seed", seed),
                ("monitoring", monitoring), ("interaction", interaction),
            )
            for key, value in inline:
                if value is not None:
                    raw[key] = value
            try:
                loaded = LoadedConfig(config=RunConfig.model_validate(raw), source=None, base_dir=Path.cwd())
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
                )
                raise ConfigError(problems, key="callbacks.multirun") from None
        if sequence_length is None:
            raise ConfigError(
                "set sequence_length (the training sequence length, llm-foundry's max_seq_len)",
                key="callbacks.multirun.sequence_length",
            )
        for experiment in loaded.config.experiments:
            load_payload(experiment.payload, base_dir=loaded.base_dir)  # fails now, naming the payload file
        resolved_run_dir = Path(run_dir) if run_dir is not None else Path(loaded.config.run_dir or "multirun")
        return cls(loaded, run_tokenizer(loaded), int(sequence_length), resolved_run_dir)

    def build(self, state: State) -> RunPlan:
        """Plan the spans for the trainer's global batch and duration."""
        from multirun.integration.callback import steps_in_duration

        per_rank = getattr(state.dataloader, "batch_size", None)
        if per_rank is None:
            raise ConfigError("the train dataloader has no batch_size; multirun needs a fixed batch size")
        global_batch = int(per_rank) * dist.get_world_size()
        steps = steps_in_duration(state, global_batch, self.sequence_length)
        geometry = BatchGeometry(global_batch, self.sequence_length, steps)
        return build_run_plan(self.loaded, tokenizer=self.tokenizer, geometry=geometry)

    def build_control(self, plan: RunPlan, monitors: MonitorRunner) -> ControlLoop | None:
        """The experiments' controllers (None when there are none); bad options raise ConfigError."""
        classes = {entry.experiment: type(entry.monitor) for entry in monitors.entries}
        return build_control_loop(self.loaded, plan, classes, run_dir=self.run_dir)

    def build_monitors(self, plan: RunPlan) -> MonitorRunner:
        """The experiments' monitors, with the config's monitoring cadence."""
        config = self.loaded.config
        return MonitorRunner(
            build_monitors(self.loaded, plan, self.tokenizer),
            config.monitoring,
            run_dir=self.run_dir,
            pad_token_id=self.tokenizer.pad_token_id,
            sequence_length=plan.geometry.sequence_length,
            seed=config.seed,
        )
