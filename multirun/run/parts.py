"""The composition root: the one place that builds a run's parts from its config.

``multirun train``, ``multirun check``, the llm-foundry callback and the interaction
arms all call :func:`assemble_parts`, so they validate and wire the same things: the
plan, every enabled monitor (with the held-out loss when there are held-out rows),
the controllers and the embedding-noise specs. A mistyped monitor or controller
option therefore fails in ``multirun check`` exactly as it would in ``multirun train``.

Example::

    loaded = load_config(None)
    tokenizer = run_tokenizer(loaded)
    geometry = run_geometry(loaded, resolve_dataset(loaded, tokenizer))
    parts = assemble_parts(loaded, tokenizer=tokenizer, geometry=geometry, run_dir=run_dir_of(loaded))
    MultirunCallback(parts)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from multirun.config import ConfigWarning, LoadedConfig, MonitoringConfig
from multirun.control.loop import ControlLoop, build_control_loop
from multirun.data.tokenizers import Tokenizer
from multirun.inject.removal import removed_inserts
from multirun.measure.runner import MonitorRunner, build_monitors
from multirun.plan.run_plan import RunPlan, build_run_plan
from multirun.run.continuation import Continuation
from multirun.run.validate import check_run
from multirun.types import BatchGeometry, EmbeddingNoise


@dataclass
class RunParts:
    """Everything the callback needs for one run, validated and wired.

    Attributes:
        loaded: the validated config.
        tokenizer: the run's tokenizer.
        run_dir: where the ledger, manifest, metrics and summary go.
        plan: the experiments and their static schedule.
        monitors: every enabled monitor and the held-out loss, at the config's cadence.
        control: the controllers and their dynamic schedule; None when no experiment has one.
        interaction_after: when the run checkpoints the interaction tests' start
            (``none``, ``acquired`` or ``end``).
    """

    loaded: LoadedConfig
    tokenizer: Tokenizer
    run_dir: Path
    plan: RunPlan
    monitors: MonitorRunner
    control: ControlLoop | None
    interaction_after: str = "none"

    @property
    def noise_specs(self) -> list[EmbeddingNoise | None]:
        """Each experiment's embedding noise (None for most kinds), in plan order."""
        return [e.embedding_noise for e in self.plan.experiments]

    def fork(self, plan: RunPlan, *, run_dir: Path, monitoring: MonitoringConfig) -> RunParts:
        """The same monitors on another plan, writing to ``run_dir``, without controllers.

        Every monitor is scored when ``monitoring`` says (per-experiment cadences are
        dropped); the interaction arms use this, one fork per arm.
        """
        runner = self.monitors
        entries = [replace(entry, every=None) for entry in runner.entries]
        monitors = MonitorRunner(
            entries,
            monitoring,
            run_dir=run_dir,
            pad_token_id=runner.pad_token_id,
            sequence_length=runner.sequence_length,
            seed=runner.seed,
            heldout=runner.heldout,
        )
        return replace(
            self, run_dir=Path(run_dir), plan=plan, monitors=monitors, control=None, interaction_after="none"
        )


def assemble_parts(
    loaded: LoadedConfig,
    *,
    tokenizer: Tokenizer,
    geometry: BatchGeometry,
    run_dir: str | Path,
    heldout: np.ndarray | None = None,
    plan: RunPlan | None = None,
    controlled: bool = True,
    continuation: Continuation | None = None,
) -> RunParts:
    """Build and validate a run's parts; raises :class:`~multirun.errors.ConfigError` on bad options.

    Args:
        loaded: the validated config.
        tokenizer: the run's tokenizer.
        geometry: the global batch size, sequence length and number of steps.
        run_dir: the run directory (nothing is written here yet).
        heldout: token rows for the held-out loss (None: no held-out loss).
        plan: an already built plan (the interaction tests plan their own); default: the config's.
        controlled: build the experiments' controllers (the interaction arms run without).
        continuation: what the run directory already holds (an extension keeps its first
            duration's static schedule); None: a fresh run.
    """
    run_dir = Path(run_dir)
    check_run(
        loaded, geometry, run_dir, intervals=plan is None
    )  # run directory and intervals, as check and train both see them
    if plan is None:
        plan = build_run_plan(
            loaded,
            tokenizer=tokenizer,
            geometry=geometry,
            static_steps=None if continuation is None else continuation.static_steps,
            durations=() if continuation is None else continuation.durations,
        )
    for name, remover, hit, count in removed_inserts(plan.experiments):
        warnings.warn(
            f"experiment {name!r}: {hit} of its {count} sequences hold n-grams that the removal experiment "
            f"{remover!r} removes; they are injected, then overwritten where they hold them (both ledgers record it)",
            ConfigWarning,
            stacklevel=2,
        )
    entries = build_monitors(loaded, plan, tokenizer)
    control = None
    if controlled:
        control = build_control_loop(loaded, plan, {m.experiment: type(m.monitor) for m in entries}, run_dir=run_dir)
    config = loaded.config
    monitors = MonitorRunner(
        entries,
        config.monitoring,
        run_dir=run_dir,
        pad_token_id=tokenizer.pad_token_id,
        sequence_length=geometry.sequence_length,
        seed=config.seed,
        heldout=heldout,
    )
    return RunParts(loaded, tokenizer, run_dir, plan, monitors, control, config.interaction.after)
