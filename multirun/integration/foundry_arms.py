"""The interaction arms of a run trained through llm-foundry, trained by llm-foundry.

A run made by llm-foundry keeps its training config in ``llmfoundry.yaml`` (written by
:class:`multirun.integration.llmfoundry.LlmFoundryMultirunCallback` at ``FIT_START``).
Each arm is llm-foundry's own ``train`` on that config, changed only where an arm
differs from the run: it loads the checkpoint (without the run's callback and
scheduler state), trains ``steps`` more batches at a constant learning rate, saves,
logs and evaluates nothing of its own, and its only callback is multirun's, with the
arm's parts. So the arms rebuild the model, tokenizer, dataloader and optimizer exactly
as the run did.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from composer.core import Callback

from multirun.errors import ConfigError, ResumeError
from multirun.integration.callback import MultirunCallback
from multirun.run.parts import RunParts
from multirun.run.reload import recorded_geometry
from multirun.run_dir import RunDir
from multirun.types import BatchGeometry

#: The name the arms' callback is registered under in llm-foundry's callback registry.
ARM_CALLBACK = "multirun_interaction_arm"
# Arm parts waiting for llm-foundry to build their callback, by arm name.
_WAITING: dict[str, RunParts] = {}
# Keys of the run's config an arm does without: evaluation, logging and saving of its own.
_DROPPED_KEYS = (
    "eval_loader",
    "eval_loaders",
    "icl_tasks",
    "icl_tasks_str",
    "eval_gauntlet",
    "eval_gauntlet_str",
    "loggers",
    "save_folder",
    "save_interval",
    "save_num_checkpoints_to_keep",
    "save_latest_filename",
    "save_filename",
    "load_weights_only",
    "autoresume",
)


class InteractionArmCallback(MultirunCallback):
    """multirun's callback for one interaction arm, built by llm-foundry's callback registry."""

    def __init__(self, *, arm: str) -> None:
        if arm not in _WAITING:
            raise ConfigError(f"no interaction arm {arm!r} is waiting to be trained", key=f"callbacks.{ARM_CALLBACK}")
        super().__init__(_WAITING.pop(arm), overwrite=True)


class FoundryArms:
    """Trains interaction arms with llm-foundry from the run's ``llmfoundry.yaml``."""

    def __init__(self, run_dir: Path, train_config: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.train_config = train_config

    @classmethod
    def of_run(cls, run_dir: str | Path) -> FoundryArms | None:
        """The arms' trainer when ``run_dir`` was trained through llm-foundry, else None."""
        path = RunDir(run_dir).llmfoundry_config
        if not path.is_file():
            return None
        config = yaml.safe_load(path.read_text())
        if not isinstance(config, dict):
            raise ConfigError("not an llm-foundry training config", file=path)
        return cls(Path(run_dir), config)

    def geometry(self) -> BatchGeometry:
        """The run's global batch and sequence length (from its ``manifest.json``)."""
        return recorded_geometry(self.run_dir)

    def latest_checkpoint(self) -> Path | None:
        """Rank 0's newest checkpoint in the run's ``save_folder``, if it has one."""
        folder = self.train_config.get("save_folder")
        if not folder:
            return None
        latest = Path(str(folder)) / str(self.train_config.get("save_latest_filename") or "latest-rank{rank}.pt")
        latest = latest.with_name(latest.name.format(rank=0))
        return latest.resolve() if latest.exists() else None

    def fit(
        self,
        parts: RunParts,
        *,
        name: str,
        checkpoint: Path,
        start: int,
        steps: int,
        lr: float | None,
        callbacks: list[Callback],
    ) -> None:
        """Train one arm through llm-foundry's ``train`` from ``checkpoint`` for ``steps`` batches."""
        from llmfoundry.command_utils.train import train
        from llmfoundry.registry import callbacks as callback_registry
        from omegaconf import OmegaConf

        if callbacks:
            raise ConfigError("extra callbacks are not supported for arms trained through llm-foundry")
        callback_registry.register(ARM_CALLBACK, func=InteractionArmCallback)
        config = _as_given(self.train_config)
        for key in _DROPPED_KEYS:
            config.pop(key, None)
        optimizer = dict(config.get("optimizer") or {})
        optimizer["lr"] = lr if lr is not None else checkpoint_lr(checkpoint)
        config.update(
            run_name=f"{config.get('run_name') or 'run'}-interaction-{name}",
            load_path=str(checkpoint),
            # The arm trains another plan at a constant rate: the run's callback and scheduler state stay behind.
            load_ignore_keys=["state/callbacks", "state/schedulers"],
            max_duration=f"{start + steps}ba",
            optimizer=optimizer,
            scheduler={"name": "constant_with_warmup", "t_warmup": "0ba"},
            callbacks={ARM_CALLBACK: {"arm": name}},
            eval_interval=f"{start + steps + 1}ba",
        )
        _WAITING[name] = parts
        try:
            trainer = train(OmegaConf.create(config))
        finally:
            _WAITING.pop(name, None)
        if int(trainer.state.timestamp.batch) != start + steps:
            raise ResumeError(
                f"the arm ended at step {int(trainer.state.timestamp.batch)}, expected {start + steps}",
                file=checkpoint,
            )
        trainer.close()


def _as_given(logged: dict[str, Any]) -> dict[str, Any]:
    """The training config as a user could have written it, from llm-foundry's logged copy: without
    what its transforms derived (per-device batch size and accumulation, GPU count, bookkeeping),
    which its ``train`` derives again and would otherwise refuse as unused."""
    import dataclasses

    from llmfoundry.utils.config_utils import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {
        "n_gpus",
        "device_train_batch_size",
        "device_train_grad_accum",
    }
    return {k: copy.deepcopy(v) for k, v in logged.items() if k in fields}


def checkpoint_lr(checkpoint: Path) -> float:
    """The learning rate the run's optimizer had when ``checkpoint`` was written."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]
    for optimizer in state.get("optimizers", {}).values():
        for group in optimizer.get("param_groups", []):
            return float(group["lr"])
    raise ResumeError("the checkpoint holds no optimizer learning rate; pass --lr", file=checkpoint)
