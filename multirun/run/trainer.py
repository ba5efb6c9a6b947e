"""Build and run a Composer training run from a multirun config.

Everything that can fail on bad input (config, tokenizer, dataset, payloads,
placement) runs in :func:`prepare_run`, before the Trainer starts training.

Example (the embedded demo)::

    from multirun.config import load_config
    run = prepare_run(load_config(None))
    summary = run.fit()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer import Trainer
from composer.core import Callback
from composer.optim import DecoupledAdamW, LinearWithWarmupScheduler
from composer.utils import dist, reproducibility

from multirun.integration.callback import MultirunCallback
from multirun.config import LoadedConfig, parse_duration_steps
from multirun.control.loop import build_control_loop
from multirun.data.mds import (
    PreparedDataset,
    build_dataloader,
    build_demo_dataset,
    demo_heldout_rows,
    read_dataset_info,
    read_rows,
)
from multirun.errors import ConfigError
from multirun.run.model import build_gpt2
from multirun.measure.runner import MonitorRunner, build_monitors
from multirun.plan.run_plan import RunPlan, build_run_plan
from multirun.data.tokenizers import Tokenizer, load_tokenizer
from multirun.types import BatchGeometry


@dataclass
class TrainingRun:
    """A prepared run: validated inputs, the plan and a ready Trainer."""

    loaded: LoadedConfig
    run_dir: Path
    tokenizer: Tokenizer
    dataset: PreparedDataset
    plan: RunPlan
    callback: MultirunCallback
    trainer: Trainer

    def fit(self) -> dict[str, Any]:
        """Train to the configured duration; return ``summary.json``'s content (rank 0) or {}."""
        self.trainer.fit()
        summary_path = self.run_dir / "summary.json"
        if dist.get_global_rank() == 0 and summary_path.exists():
            import json

            return json.loads(summary_path.read_text())
        return {}

    def close(self) -> None:
        self.trainer.close()


def resolve_dataset(loaded: LoadedConfig, tokenizer: Tokenizer, *, progress: bool = True) -> PreparedDataset:
    """The run's MDS dataset: the cached demo corpus, or a prepared dataset checked against the config."""
    data = loaded.config.data
    if data.source == "demo":
        return build_demo_dataset(tokenizer, data.sequence_length, max_bytes=data.demo_max_bytes, progress=progress)
    info = read_dataset_info(_resolve(loaded, data.path))
    if info.sequence_length != data.sequence_length:
        raise ConfigError(
            f"the dataset at {info.path} has sequences of {info.sequence_length} tokens, the config says "
            f"{data.sequence_length}",
            file=loaded.source,
            key="data.sequence_length",
        )
    if info.tokenizer != tokenizer.name:
        raise ConfigError(
            f"the dataset at {info.path} was tokenized with {info.tokenizer!r}, the run uses {tokenizer.name!r}",
            file=loaded.source,
            key="data.path",
        )
    return info


def run_geometry(loaded: LoadedConfig, dataset: PreparedDataset) -> BatchGeometry:
    train = loaded.config.train
    world = dist.get_world_size()
    if train.global_batch_size % world:
        raise ConfigError(
            f"global_batch_size {train.global_batch_size} is not divisible by the world size {world}",
            file=loaded.source,
            key="train.global_batch_size",
        )
    per_rank = train.global_batch_size // world
    steps_per_epoch = math.ceil(dataset.num_samples / world) // per_rank
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the dataset has {dataset.num_samples} sequences, fewer than one global batch",
            file=loaded.source,
            key="train.global_batch_size",
        )
    num_steps = parse_duration_steps(
        train.max_duration,
        global_batch_size=train.global_batch_size,
        sequence_length=dataset.sequence_length,
        steps_per_epoch=steps_per_epoch,
    )
    return BatchGeometry(train.global_batch_size, dataset.sequence_length, num_steps)


def prepare_run(
    loaded: LoadedConfig,
    *,
    extra_callbacks: Sequence[Callback] = (),
    overwrite: bool = False,
    progress: bool = True,
    run_dir: str | Path | None = None,
) -> TrainingRun:
    """Validate everything, plan the spans and build the Trainer (no training yet)."""
    config = loaded.config
    run_dir = Path(run_dir) if run_dir is not None else Path(config.run_dir or f"runs/{config.run_name}")
    tokenizer = run_tokenizer(loaded)
    dataset = resolve_dataset(loaded, tokenizer, progress=progress)
    geometry = run_geometry(loaded, dataset)
    plan = build_run_plan(loaded, tokenizer=tokenizer, geometry=geometry)
    if dist.get_global_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        loaded.write(run_dir)

    train = config.train
    dataloader = train_dataloader(loaded, dataset)
    model = build_model(loaded, tokenizer, dataset.sequence_length)
    optimizer = build_optimizer(loaded, model)
    scheduler = LinearWithWarmupScheduler(t_warmup=train.warmup, alpha_f=0.1)
    monitor_entries = build_monitors(loaded, plan, tokenizer)
    control = build_control_loop(loaded, plan, {m.experiment: type(m.monitor) for m in monitor_entries}, run_dir=run_dir)
    monitors = MonitorRunner(
        monitor_entries,
        config.monitoring,
        run_dir=run_dir,
        pad_token_id=tokenizer.pad_token_id,
        sequence_length=dataset.sequence_length,
        seed=config.seed,
        heldout=heldout_rows(loaded, tokenizer, dataset.sequence_length),
    )
    callback = MultirunCallback(
        plan=plan, monitors=monitors, control=control, interaction_after=config.interaction.after,
        run_dir=run_dir, overwrite=overwrite,
    )
    trainer = Trainer(
        model=model,
        train_dataloader=dataloader,
        max_duration=f"{geometry.num_steps}ba",
        optimizers=optimizer,
        schedulers=scheduler,
        callbacks=[callback, *extra_callbacks],
        run_name=config.run_name,
        save_folder=str(run_dir / "checkpoints"),
        save_interval=train.save_interval or f"{geometry.num_steps}ba",
        save_num_checkpoints_to_keep=train.save_num_checkpoints_to_keep,
        save_overwrite=overwrite,
        autoresume=train.autoresume,
        progress_bar=progress,
        console_log_interval=train.log_interval,
        **trainer_settings(loaded),
    )
    return TrainingRun(loaded, run_dir, tokenizer, dataset, plan, callback, trainer)


def train_dataloader(loaded: LoadedConfig, dataset: PreparedDataset) -> Any:
    """The run's Streaming dataloader (this rank's share of the global batch)."""
    config = loaded.config
    return build_dataloader(
        dataset.path,
        batch_size=config.train.global_batch_size // dist.get_world_size(),
        shuffle=config.data.shuffle,
        shuffle_seed=config.data.shuffle_seed,
        num_canonical_nodes=config.data.num_canonical_nodes,
        num_workers=config.data.num_workers,
    )


def build_model(loaded: LoadedConfig, tokenizer: Tokenizer, sequence_length: int) -> Any:
    """The run's model, with the same initial weights on every rank and in every repeat."""
    config = loaded.config
    reproducibility.seed_all(config.seed)
    return build_gpt2(
        vocab_size=tokenizer.vocab_size,
        sequence_length=sequence_length,
        n_layer=config.model.n_layer,
        n_head=config.model.n_head,
        n_embd=config.model.n_embd,
        eos_token_id=tokenizer.eos_token_id,
        overrides=dict(config.model.config_overrides),
    )


def build_optimizer(loaded: LoadedConfig, model: torch.nn.Module) -> DecoupledAdamW:
    train = loaded.config.train
    return DecoupledAdamW(model.parameters(), lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def trainer_settings(loaded: LoadedConfig) -> dict[str, Any]:
    """Trainer arguments every run of this config shares (training and interaction arms)."""
    train = loaded.config.train
    return {
        "device": train.device if train.device != "auto" else ("gpu" if torch.cuda.is_available() else "cpu"),
        "precision": train.precision,
        "device_train_microbatch_size": train.device_microbatch_size or train.global_batch_size // dist.get_world_size(),
        "seed": loaded.config.seed,
        "loggers": [],
        "log_to_console": False,
        "python_log_level": None,
    }


def run_tokenizer(loaded: LoadedConfig) -> Tokenizer:
    """The config's tokenizer (a path relative to the config file's directory)."""
    tokenizer = loaded.config.tokenizer
    return load_tokenizer(tokenizer.kind, _resolve(loaded, tokenizer.path))


def heldout_rows(loaded: LoadedConfig, tokenizer: Tokenizer, sequence_length: int) -> np.ndarray | None:
    """Rows for the held-out loss: the demo's unused stdlib files, or ``data.heldout_path``."""
    count = loaded.config.monitoring.heldout_rows
    data = loaded.config.data
    if count == 0:
        return None
    if data.source == "demo":
        return demo_heldout_rows(tokenizer, sequence_length, count=count, train_max_bytes=data.demo_max_bytes)
    if data.heldout_path is None:
        return None
    return read_rows(_resolve(loaded, data.heldout_path), count)


def _resolve(loaded: LoadedConfig, path: str | None) -> str | None:
    """Paths in a config file are relative to that file's directory."""
    if path is None:
        return None
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else loaded.base_dir / candidate)
