"""Interaction tests: continual-pretraining dependence tests from one checkpoint.

From a checkpoint of a run, every *arm* continues training for ``steps`` steps on the
same data (the checkpoint's weights, optimizer state and data position), injecting a
subset of the run's experiments: ``none``, each experiment ``alone``, ``all`` and,
optionally, all but one (``without``). Each participating experiment gets the same
spans in every arm it is part of: they are planned once for ``all`` (at ``intensity``,
a fraction of the arm's tokens, uniformly over the window) and each arm keeps its own
experiments' spans. Every arm then scores every experiment's monitor on the same
probes, and :mod:`multirun.interaction_matrix` turns the scores into the matrix.

The arms train at a constant learning rate: the checkpoint's current one (its
optimizer state), or ``interaction.lr``. Outputs go to ``<run_dir>/interaction/``:
``matrix.json``, ``matrix.csv``, ``settings.json`` and one folder per arm with its
ledger, manifest and ``metrics.jsonl``.

Example::

    result = run_interaction("runs/demo")
    result.matrix["verdict"]
    # 'no interaction detected among 36 off-diagonal cell(s) at alpha 0.05 (Holm)'
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from composer import Trainer
from composer.core import Callback
from composer.utils import dist

from multirun.config import InteractionConfig, LoadedConfig, MonitoringConfig
from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError, ResumeError
from multirun.integration.callback import MultirunCallback
from multirun.interaction.matrix import build_matrix, design, write_matrix
from multirun.kinds.experiments import build_experiments
from multirun.measure.records import EvaluationRecord
from multirun.plan.run_plan import RunPlan, plan_experiments
from multirun.run.continuation import checkpoint_step
from multirun.run.inputs import resolve_dataset, run_geometry
from multirun.run.parts import RunParts
from multirun.run.reload import reload_run
from multirun.run.trainer import build_model, build_optimizer, train_dataloader, trainer_settings
from multirun.run_dir import RunDir, write_json_atomic
from multirun.types import BatchGeometry, Placement


@dataclass
class InteractionResult:
    """What :func:`run_interaction` produced (``matrix`` is only complete on rank 0's disk)."""

    out_dir: Path
    checkpoint: Path
    start_step: int
    arms: dict[str, tuple[str, ...]]
    matrix: dict[str, Any]
    seconds: float


def find_checkpoint(run_dir: Path, explicit: str | Path | None = None, *, latest: Path | None = None) -> Path:
    """The checkpoint the arms start from.

    ``explicit`` if given; else the one ``interaction_trigger.json`` records (taken when
    the run's ``interaction.after`` condition held); else the run's latest checkpoint
    (``latest``, or ``checkpoints/latest-rank0.pt`` of the run directory).
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ResumeError("no such checkpoint file", file=path)
        return path.resolve()  # latest-rank0.pt is a link to the file that names the step
    trigger = RunDir(run_dir).interaction_trigger
    if trigger.is_file():
        recorded = json.loads(trigger.read_text()).get("checkpoint")
        if recorded and Path(recorded).is_file():
            return Path(recorded)
    latest = latest if latest is not None else RunDir(run_dir).latest_checkpoint
    if latest.exists():
        return latest.resolve()
    raise ResumeError(
        "the run has no checkpoint to start the interaction tests from (no interaction_trigger.json, no "
        "checkpoints/latest-rank0.pt); pass --checkpoint",
        file=run_dir,
    )


def participants_of(loaded: LoadedConfig, settings: InteractionConfig) -> list[str]:
    """The experiments injected in the arms (default: every injected one, in config order)."""
    injectable = [e.name for e in loaded.config.experiments if e.inject]
    if settings.experiments is None:
        return injectable
    for index, name in enumerate(settings.experiments):
        if name not in injectable:
            known = ", ".join(injectable) or "none"
            raise ConfigError(
                f"{name!r} is not an injected experiment of this run (injected: {known})",
                file=loaded.source,
                key=f"interaction.experiments[{index}]",
            )
    if not settings.experiments:
        raise ConfigError("needs at least one experiment", file=loaded.source, key="interaction.experiments")
    return list(settings.experiments)


def interaction_plan(
    loaded: LoadedConfig,
    *,
    tokenizer: Tokenizer,
    geometry: BatchGeometry,
    start_step: int,
    settings: InteractionConfig,
    participants: Sequence[str],
) -> RunPlan:
    """Every participant's spans for the ``all`` arm, in steps ``[start_step, start_step + steps)``.

    Each participant's repetitions are scaled (keeping their proportions, e.g. a
    contamination experiment's groups) to ``intensity`` of the window's tokens;
    controllers do not run in the arms. Treated and control items are the run's own.
    """
    experiments = build_experiments(loaded, tokenizer=tokenizer, geometry=geometry)
    window = Placement("window", start_step, start_step + settings.steps)
    budget = settings.intensity * settings.steps * geometry.global_batch_size * geometry.sequence_length
    for experiment in experiments:
        repetitions = np.asarray(experiment.seq_repetitions, dtype=np.float64)
        tokens = float((repetitions * experiment.seq_lengths).sum())
        if experiment.name not in participants or tokens == 0:
            experiment.seq_repetitions = np.zeros_like(repetitions)
            continue
        experiment.seq_repetitions = repetitions * (budget / tokens)
        # Row placements stay row placements in the arm's window (whole batches as whole rows:
        # a window lists no steps to fill); their sequences are already fitted to rows.
        row = experiment.placement
        experiment.placement = replace(window, whole=None if row.whole is None else "row", at=row.at)
    return plan_experiments(loaded, experiments, tokenizer=tokenizer, geometry=geometry)


def _drop_run_state(state_dict: dict[str, Any]) -> None:
    """Checkpoint keys the arms must not restore: the run's callback state (another plan)
    and its schedulers (the arms train at a constant learning rate)."""
    state = state_dict.get("state", {})
    state.pop("callbacks", None)
    state.pop("schedulers", None)


def run_interaction(
    run_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    progress: bool = True,
    extra_callbacks: Callable[[str], Sequence[Callback]] | None = None,
) -> InteractionResult:
    """Run every arm from the checkpoint and write the interaction matrix.

    Args:
        run_dir: a run directory (its ``resolved_config.yaml`` and checkpoints are used).
        checkpoint: start here instead (see :func:`find_checkpoint`).
        overrides: ``key=value`` config overrides, e.g. ``interaction.steps=50``.
        out_dir: default ``<run_dir>/interaction``.
        progress: print one line per arm.
        extra_callbacks: per arm name, more Composer callbacks for that arm's trainer.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    run = reload_run(run_dir, overrides)
    loaded, tokenizer = run.loaded, run.tokenizer
    settings = loaded.config.interaction
    participants = participants_of(loaded, settings)
    cap = loaded.config.injection.max_modified_fraction
    if settings.intensity * len(participants) > cap * (1 + 1e-9):  # 3 x 0.1 is 0.30000000000000004
        raise ConfigError(
            f"the 'all' arm would modify {settings.intensity * len(participants):.3g} of its tokens "
            f"({len(participants)} experiments x {settings.intensity:g}), more than injection.max_modified_fraction "
            f"{cap:g}; lower the intensity or raise the cap",
            file=loaded.source,
            key="interaction.intensity",
        )
    trainer = _arm_trainer(run_dir, loaded, tokenizer)
    checkpoint_path = find_checkpoint(run_dir, checkpoint, latest=trainer.latest_checkpoint())
    start = checkpoint_step(checkpoint_path)
    out = Path(out_dir) if out_dir is not None else RunDir(run_dir).interaction

    geometry = replace(trainer.geometry(), num_steps=start + settings.steps)
    plan = interaction_plan(
        loaded, tokenizer=tokenizer, geometry=geometry, start_step=start, settings=settings, participants=participants
    )
    # Each arm scores every monitor once, at its end, on its own fork of these parts.
    parts = run.parts(geometry, run_dir=out, plan=plan, controlled=False)
    if not parts.monitors.entries:
        raise ConfigError(
            "no experiment has an enabled monitor: there is nothing to compare", file=loaded.source, key="experiments"
        )
    measured = [m.experiment for m in parts.monitors.entries]
    arms, comparisons = design(participants, measured=measured, leave_one_out=settings.leave_one_out)
    if dist.get_global_rank() == 0:
        # Arms of an earlier call (another start step, other arms) would mix into these ledgers.
        shutil.rmtree(out / "arms", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            out / "settings.json",
            {
                "run_dir": str(run_dir),
                "checkpoint": str(checkpoint_path),
                "start_step": start,
                **settings.model_dump(mode="json"),
                "participants": participants,
                "measured": measured,
                "arms": {name: list(members) for name, members in arms.items()},
            },
        )

    # No barrier needed (nor possible: the process group starts with the first Trainer): the
    # other ranks write into arms/ only after that Trainer's start-up and the callback's
    # FIT_START barrier, both after rank 0 cleared the folder.
    arm_records: dict[str, list[EvaluationRecord]] = {}
    for number, (name, members) in enumerate(arms.items(), start=1):
        arm_started = time.perf_counter()
        arm_records[name] = _run_arm(
            parts,
            trainer,
            name=name,
            members=members,
            checkpoint=checkpoint_path,
            start=start,
            settings=settings,
            arm_dir=out / "arms" / name,
            callbacks=list(extra_callbacks(name)) if extra_callbacks else [],
        )
        if progress and dist.get_global_rank() == 0:
            print(f"  arm {number}/{len(arms)} {name:<28} {time.perf_counter() - arm_started:6.1f} s", flush=True)

    matrix = build_matrix(
        arm_records, comparisons, alpha=settings.alpha, n_resamples=settings.n_resamples, seed=loaded.config.seed
    )
    matrix.update(start_step=start, steps=settings.steps, intensity=settings.intensity, checkpoint=str(checkpoint_path))
    if dist.get_global_rank() == 0:
        write_matrix(out, matrix)
    return InteractionResult(out, checkpoint_path, start, arms, matrix, time.perf_counter() - started)


class ArmTrainer(Protocol):
    """Trains one arm from the checkpoint: the run's own trainer, or llm-foundry for its runs."""

    def geometry(self) -> BatchGeometry:
        """The run's global batch size and sequence length."""
        ...

    def latest_checkpoint(self) -> Path | None:
        """The run's newest checkpoint, where its trainer saves them."""
        ...

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
        """Train ``parts``'s plan from ``checkpoint`` (at ``start``) for ``steps`` batches."""
        ...


def _arm_trainer(run_dir: Path, loaded: LoadedConfig, tokenizer: Tokenizer) -> ArmTrainer:
    from multirun.integration.foundry_arms import FoundryArms

    foundry = FoundryArms.of_run(run_dir)
    if foundry is not None:
        return foundry
    return OwnArms(loaded, tokenizer, resolve_dataset(loaded, tokenizer, progress=False))


class OwnArms:
    """Arms of a run made by ``multirun train``: the same model, data and optimizer settings."""

    def __init__(self, loaded: LoadedConfig, tokenizer: Tokenizer, dataset: Any) -> None:
        self.loaded, self.tokenizer, self.dataset = loaded, tokenizer, dataset

    def geometry(self) -> BatchGeometry:
        return run_geometry(self.loaded, self.dataset)

    def latest_checkpoint(self) -> Path | None:
        return None  # the run directory's own checkpoints/latest-rank0.pt

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
        loaded, config = self.loaded, self.loaded.config
        model = build_model(loaded, self.tokenizer, self.dataset.sequence_length)
        trainer = Trainer(
            model=model,
            train_dataloader=train_dataloader(loaded, self.dataset),
            max_duration=f"{start + steps}ba",
            optimizers=build_optimizer(loaded, model),
            callbacks=[MultirunCallback(parts, overwrite=True), *callbacks],
            run_name=f"{config.run_name}-interaction-{name}",
            load_path=str(checkpoint),
            load_ignore_keys=_drop_run_state,
            progress_bar=False,
            **trainer_settings(loaded),
        )
        if int(trainer.state.timestamp.batch) != start:
            raise ResumeError(
                f"the checkpoint is at step {int(trainer.state.timestamp.batch)}, expected {start}", file=checkpoint
            )
        if lr is not None:
            for optimizer in trainer.state.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
        trainer.fit()
        trainer.close()


def _run_arm(
    parts: RunParts,
    trainer: ArmTrainer,
    *,
    name: str,
    members: tuple[str, ...],
    checkpoint: Path,
    start: int,
    settings: InteractionConfig,
    arm_dir: Path,
    callbacks: list[Callback],
) -> list[EvaluationRecord]:
    """Train one arm from the checkpoint; the records of its final evaluation."""
    monitoring = MonitoringConfig(
        **{
            **parts.loaded.config.monitoring.model_dump(),
            "every": None,
            "at_fit_start": False,
            "at_fit_end": True,
        }
    )
    arm = parts.fork(parts.plan.restricted(members), run_dir=arm_dir, monitoring=monitoring)
    trainer.fit(
        arm, name=name, checkpoint=checkpoint, start=start, steps=settings.steps, lr=settings.lr, callbacks=callbacks
    )
    return arm.monitors.last_records
