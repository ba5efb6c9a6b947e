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
from composer.callbacks import LRMonitor
from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination
from composer.optim import (
    ComposerScheduler,
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    DecoupledAdamW,
    LinearWithWarmupScheduler,
)
from composer.utils import dist

from multirun.config import LoadedConfig
from multirun.data.mds import PreparedDataset, build_dataloader
from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError
from multirun.integration.callback import MultirunCallback
from multirun.plan.run_plan import RunPlan
from multirun.run.checkpoints import KeepNewestCheckpoints, prepare_checkpoint_folder
from multirun.run.continuation import continuation_of
from multirun.run.inputs import heldout_rows, resolve_dataset, run_dir_of, run_geometry, run_tokenizer
from multirun.run.model import build_run_model, load_init_weights, record_weights_source
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
    if dist.get_world_size() > 1:
        # Rank 0 decides how the run continues and tells the others, before the Trainer
        # exists: the process group is made here (the Trainer keeps it; same timeout).
        dist.initialize_dist(trainer_settings(loaded)["device"])
    if config.train.autoresume and not overwrite:
        # Before the latest checkpoint is read: a torn one (a kill while saving) is moved aside.
        prepare_checkpoint_folder(RunDir(run_dir).checkpoints)
    continuation = continuation_of(run_dir, geometry, autoresume=config.train.autoresume, overwrite=overwrite)
    parts = assemble_parts(
        loaded,
        tokenizer=tokenizer,
        geometry=geometry,
        run_dir=run_dir,
        heldout=heldout_rows(loaded, tokenizer, dataset.sequence_length),
        continuation=continuation,
    )
    train = config.train
    dataloader = train_dataloader(loaded, dataset)
    model = build_model(loaded, tokenizer, dataset.sequence_length)
    # Continual pretraining: the weights of another run or model, in a new run from step 0.
    load_init_weights(loaded, model)
    record_weights_source(loaded)
    settings = trainer_settings(loaded)
    logging = run_logging(loaded, run_dir, progress=progress)  # a missing logger package fails here
    if dist.get_global_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        loaded.write(run_dir)

    optimizer = build_optimizer(loaded, model)
    callback = MultirunCallback(parts, overwrite=overwrite)
    # The bar only on a terminal; elsewhere (a log file, --no-progress) plain lines, unless
    # Composer's console logger prints the metrics already.
    progress_bar = use_progress_bar(progress) and bool(logging["progress_bar"])
    lines = (
        []
        if progress_bar or logging["log_to_console"]
        else [ProgressLines(train.log_interval, tokens_per_step=geometry.global_batch_size * geometry.sequence_length)]
    )
    # With a logger, the learning rate is logged too: the schedule is a setting to check.
    watch = [LRMonitor()] if logging["loggers"] or logging["log_to_console"] else []
    trainer = Trainer(
        model=model,
        train_dataloader=dataloader,
        max_duration=f"{geometry.num_steps}ba",
        optimizers=optimizer,
        schedulers=build_scheduler(loaded),
        # KeepNewestCheckpoints: the rotation counts the checkpoints of earlier launches too.
        callbacks=[callback, *watch, *extra_callbacks, *lines, KeepNewestCheckpoints(RunDir(run_dir).checkpoints)],
        run_name=config.run_name,
        save_folder=str(RunDir(run_dir).checkpoints),
        save_interval=train.save_interval or f"{geometry.num_steps}ba",
        save_num_checkpoints_to_keep=train.save_num_checkpoints_to_keep,
        save_overwrite=overwrite,
        autoresume=train.autoresume,
        **{**settings, **logging, "progress_bar": progress_bar},
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
    """The run's model (without ``model.init_from``'s weights), the same on every rank and in every repeat."""
    return build_run_model(loaded, tokenizer, sequence_length)


def build_optimizer(loaded: LoadedConfig, model: torch.nn.Module) -> DecoupledAdamW:
    train = loaded.config.train
    return DecoupledAdamW(model.parameters(), lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)


def build_scheduler(loaded: LoadedConfig) -> ComposerScheduler:
    """The learning-rate schedule of ``train.scheduler``, over the whole run (``t_max`` 1dur).

    The default, linear with ``alpha_f`` 0.1, is the schedule every run had before the
    choice existed: ``LinearWithWarmupScheduler(t_warmup=train.warmup, alpha_f=0.1)``.
    """
    train = loaded.config.train
    scheduler = train.scheduler
    if scheduler.name == "constant":
        return ConstantWithWarmupScheduler(t_warmup=train.warmup_duration)
    if scheduler.name == "cosine":
        return CosineAnnealingWithWarmupScheduler(t_warmup=train.warmup_duration, alpha_f=scheduler.alpha_f)
    return LinearWithWarmupScheduler(t_warmup=train.warmup_duration, alpha_f=scheduler.alpha_f)


def trainer_settings(loaded: LoadedConfig) -> dict[str, Any]:
    """Trainer arguments every run of this config shares (training and interaction arms).

    Device, precision, microbatches, seed, gradient clipping and FSDP: an arm continues
    the run's training as the run did. Loggers are the run's alone (:func:`run_logging`);
    the arms log nothing.

    Raises:
        ConfigError: ``train.fsdp`` has a key or value Composer's ``FSDPConfig`` refuses.
    """
    train = loaded.config.train
    algorithms: list[Algorithm] = []
    if train.clipping is not None:
        from composer.algorithms import GradientClipping

        algorithms.append(
            GradientClipping(clipping_type=train.clipping.type, clipping_threshold=train.clipping.threshold)
        )
    settings: dict[str, Any] = {
        "device": train.device if train.device != "auto" else ("gpu" if torch.cuda.is_available() else "cpu"),
        "precision": train.precision,
        "device_train_microbatch_size": train.device_microbatch_size
        or train.global_batch_size // dist.get_world_size(),
        "seed": loaded.config.seed,
        "algorithms": algorithms,
        "loggers": [],
        "log_to_console": False,
        "python_log_level": None,
    }
    if train.fsdp is not None:
        settings["parallelism_config"] = {"fsdp": _checked_fsdp(loaded, train.fsdp)}
    return settings


def _checked_fsdp(loaded: LoadedConfig, fsdp: dict[str, Any]) -> dict[str, Any]:
    """``train.fsdp`` as given, once Composer's ``FSDPConfig`` accepts it (Composer builds its own from the dict)."""
    import dataclasses

    from composer.utils.parallelism import FSDPConfig

    known = [f.name for f in dataclasses.fields(FSDPConfig) if not f.name.startswith("_")]
    for key in fsdp:
        if key not in known:
            raise ConfigError(
                f"unknown FSDP setting (Composer's FSDPConfig has: {', '.join(known)})",
                file=loaded.source,
                key=f"train.fsdp.{key}",
            )
    try:
        FSDPConfig(**fsdp)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Composer's FSDPConfig refuses it: {exc}", file=loaded.source, key="train.fsdp") from exc
    return dict(fsdp)


def run_logging(loaded: LoadedConfig, run_dir: Path, *, progress: bool) -> dict[str, Any]:
    """Trainer arguments for the run's metric logging: ``train.loggers`` as Composer loggers.

    Relative logger paths (the file logger's file, TensorBoard's folder) are inside the
    run directory. The console logger replaces the progress bar (Composer would print both).

    Raises:
        ConfigError: a logger's package is not installed (key ``train.loggers.<name>``,
            with the ``pip install`` that adds it).
    """
    train = loaded.config.train
    config = train.loggers
    loggers: list[LoggerDestination] = []
    if config.file is not None:
        from composer.loggers import FileLogger

        file = config.file
        loggers.append(
            FileLogger(
                filename=str(run_dir / file.filename),
                capture_stdout=file.capture_stdout,
                capture_stderr=file.capture_stderr,
                flush_interval=file.flush_interval,
                overwrite=True,
            )
        )
    if config.tensorboard is not None:
        _require(loaded, "tensorboard", "tensorboard")
        from composer.loggers import TensorboardLogger

        board = config.tensorboard
        loggers.append(
            TensorboardLogger(
                log_dir=str(run_dir / board.log_dir),
                flush_interval=board.flush_interval,
                rank_zero_only=board.rank_zero_only,
            )
        )
    if config.mlflow is not None:
        _require(loaded, "mlflow", "mlflow")
        from composer.loggers import MLFlowLogger

        flow = config.mlflow
        loggers.append(
            MLFlowLogger(
                tracking_uri=flow.tracking_uri,
                experiment_name=flow.experiment_name,
                run_name=flow.run_name or loaded.config.run_name,
                tags=flow.tags,
                synchronous=flow.synchronous,
                log_system_metrics=flow.log_system_metrics,
                rank_zero_only=flow.rank_zero_only,
            )
        )
    if config.wandb is not None:
        _require(loaded, "wandb", "wandb")
        wandb = config.wandb
        loggers.append(
            _metrics_only_wandb_logger()(
                project=wandb.project,
                entity=wandb.entity,
                group=wandb.group,
                name=wandb.name or loaded.config.run_name,
                tags=wandb.tags,
                init_kwargs=wandb.init_kwargs,
                rank_zero_only=wandb.rank_zero_only,
            )
        )
    return {
        "loggers": loggers,
        "log_to_console": config.console,
        "console_log_interval": train.log_interval,
        "progress_bar": progress and not config.console,
    }


def _metrics_only_wandb_logger() -> type[LoggerDestination]:
    """Composer's ``WandBLogger`` for metrics only, which autoresume does not ask for checkpoints.

    Composer's autoresume asks every logger for the latest checkpoint when the run folder
    has none (a fresh run); ``WandBLogger`` then calls the W&B API, which fails before
    ``wandb.init`` and without a network (offline mode). multirun keeps checkpoints in
    the run directory and never uploads them as W&B artifacts, so there is nothing to find.
    """
    from composer.loggers import WandBLogger

    class MetricsOnlyWandBLogger(WandBLogger):
        def download_file(
            self, remote_file_name: str, destination: str, overwrite: bool = False, progress_bar: bool = True
        ) -> None:
            raise FileNotFoundError(f"{remote_file_name}: multirun does not upload checkpoints to W&B")

    return MetricsOnlyWandBLogger


def _require(loaded: LoadedConfig, logger: str, module: str) -> None:
    """Refuse a logger whose package is missing, naming the extra that installs it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"the {logger} logger needs the {module!r} package, which is not installed: "
            f"pip install 'multirun-composer[{logger}]' (or pip install {module})",
            file=loaded.source,
            key=f"train.loggers.{logger}",
        )
