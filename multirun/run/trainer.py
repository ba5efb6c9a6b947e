"""Build and run a Composer training run from a multirun config.

Everything that can fail on bad input (config, tokenizer, dataset, payloads,
placement) runs in :func:`prepare_run`, before the Trainer starts training.

Example (the embedded demo)::

    from multirun.config import load_config
    run = prepare_run(load_config(None))
    summary = run.fit()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.core import Callback
from composer.optim import DecoupledAdamW, LinearWithWarmupScheduler
from composer.utils import dist, reproducibility

from multirun.config import LoadedConfig
from multirun.data.mds import PreparedDataset, build_dataloader
from multirun.data.tokenizers import Tokenizer
from multirun.integration.callback import MultirunCallback
from multirun.plan.run_plan import RunPlan
from multirun.run.continuation import continuation_of
from multirun.run.inputs import heldout_rows, resolve_dataset, run_dir_of, run_geometry, run_tokenizer
from multirun.run.model import build_gpt2
from multirun.run.parts import RunParts, assemble_parts
from multirun.run.progress import ProgressLines, use_progress_bar
from multirun.run_dir import RunDir


@dataclass
class TrainingRun:
    """A prepared run: its parts, its dataset and a ready Trainer."""

    parts: RunParts
    dataset: PreparedDataset
    callback: MultirunCallback
    trainer: Trainer

    @property
    def loaded(self) -> LoadedConfig:
        return self.parts.loaded

    @property
    def run_dir(self) -> Path:
        return self.parts.run_dir

    @property
    def tokenizer(self) -> Tokenizer:
        return self.parts.tokenizer

    @property
    def plan(self) -> RunPlan:
        return self.parts.plan

    def fit(self) -> dict[str, Any]:
        """Train to the configured duration; return ``summary.json``'s content (rank 0) or {}."""
        self.trainer.fit()
        summary_path = RunDir(self.run_dir).summary
        if dist.get_global_rank() == 0 and summary_path.exists():
            import json

            return json.loads(summary_path.read_text())
        return {}

    def close(self) -> None:
        self.trainer.close()


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
    run_dir = run_dir_of(loaded, run_dir)
    tokenizer = run_tokenizer(loaded)
    dataset = resolve_dataset(loaded, tokenizer, progress=progress)
    geometry = run_geometry(loaded, dataset)
    continuation = continuation_of(run_dir, geometry, autoresume=config.train.autoresume, overwrite=overwrite)
    parts = assemble_parts(
        loaded,
        tokenizer=tokenizer,
        geometry=geometry,
        run_dir=run_dir,
        heldout=heldout_rows(loaded, tokenizer, dataset.sequence_length),
        continuation=continuation,
    )
    if dist.get_global_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        loaded.write(run_dir)

    train = config.train
    dataloader = train_dataloader(loaded, dataset)
    model = build_model(loaded, tokenizer, dataset.sequence_length)
    optimizer = build_optimizer(loaded, model)
    scheduler = LinearWithWarmupScheduler(t_warmup=train.warmup, alpha_f=0.1)
    callback = MultirunCallback(parts, overwrite=overwrite)
    # The bar only on a terminal; elsewhere (a log file, --no-progress) plain lines.
    progress_bar = use_progress_bar(progress)
    lines = (
        []
        if progress_bar
        else [ProgressLines(train.log_interval, tokens_per_step=geometry.global_batch_size * geometry.sequence_length)]
    )
    trainer = Trainer(
        model=model,
        train_dataloader=dataloader,
        max_duration=f"{geometry.num_steps}ba",
        optimizers=optimizer,
        schedulers=scheduler,
        callbacks=[callback, *extra_callbacks, *lines],
        run_name=config.run_name,
        save_folder=str(RunDir(run_dir).checkpoints),
        save_interval=train.save_interval or f"{geometry.num_steps}ba",
        save_num_checkpoints_to_keep=train.save_num_checkpoints_to_keep,
        save_overwrite=overwrite,
        autoresume=train.autoresume,
        progress_bar=progress_bar,
        console_log_interval=train.log_interval,
        **trainer_settings(loaded),
    )
    return TrainingRun(parts, dataset, callback, trainer)


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
    return DecoupledAdamW(model.parameters(), lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)


def trainer_settings(loaded: LoadedConfig) -> dict[str, Any]:
    """Trainer arguments every run of this config shares (training and interaction arms)."""
    train = loaded.config.train
    return {
        "device": train.device if train.device != "auto" else ("gpu" if torch.cuda.is_available() else "cpu"),
        "precision": train.precision,
        "device_train_microbatch_size": train.device_microbatch_size
        or train.global_batch_size // dist.get_world_size(),
        "seed": loaded.config.seed,
        "loggers": [],
        "log_to_console": False,
        "python_log_level": None,
    }
