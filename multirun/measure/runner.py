"""Runs every experiment's monitor at the configured cadence and tests the results.

Per evaluation: each monitor scores its items on the live model; each metric's treated
items are compared with the controls (and each group of treated items with all
controls) by the test that fits it; primary metrics are Holm-corrected across the
run's experiments; results go to Composer's logger (``multirun/<experiment>/<metric>/...``)
and to ``metrics.jsonl`` in the run directory (rank 0).

A monitor that raises is recorded in ``metrics.jsonl`` and warned about; training goes
on unless ``monitoring.on_error: raise``.

Evaluations return typed records (:mod:`multirun.measure.records`); ``metrics.jsonl``
holds their ``to_json()`` form.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.utils import dist

from multirun.config import LoadedConfig, MonitoringConfig, cadence_steps
from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError
from multirun.kinds.registry import monitors as monitor_registry
from multirun.measure.live_model import LiveModel, MetricScores, Monitor
from multirun.measure.membership import DEFAULT_FPR, compare_membership
from multirun.measure.records import (
    EffectRecord,
    EvaluationRecord,
    FailureRecord,
    ItemScore,
    RunMetricRecord,
)
from multirun.measure.stats import EffectResult, compare_means, compare_rates, holm_adjust, one_sample_z
from multirun.plan.run_plan import RunPlan
from multirun.run_dir import RunDir, append_jsonl, read_jsonl, truncate_jsonl


@dataclass
class ExperimentMonitor:
    experiment: str
    monitor_name: str
    monitor: Monitor
    every: int | None = None  # steps between interval evaluations (None: fit start and end only)


def build_monitors(loaded: LoadedConfig, plan: RunPlan, tokenizer: Tokenizer) -> list[ExperimentMonitor]:
    """Construct each enabled experiment's monitor now, so bad options fail before training."""
    out = []
    by_name = {e.name: e for e in plan.experiments}
    for index, spec in enumerate(loaded.config.experiments):
        if not spec.monitor.enabled:
            continue
        experiment = by_name[spec.name]
        name = spec.monitor.name or experiment.kind
        key = f"experiments[{index}].monitor"
        monitor_class: type[Monitor] = monitor_registry.get(name, file=loaded.source, key=f"{key}.name")
        try:
            monitor = monitor_class.from_experiment(
                experiment,
                tokenizer=tokenizer,
                options=dict(spec.monitor.options),
                sequence_length=plan.geometry.sequence_length,
            )
        except ConfigError as exc:
            inner = f".{exc.key}" if exc.key else ""
            raise ConfigError(
                exc.message, file=loaded.source, key=f"{key}{inner}".replace(".monitor.monitor", ".monitor")
            ) from None
        out.append(ExperimentMonitor(spec.name, name, monitor, loaded.config.monitor_every(spec)))
    return out


def effects_of(
    scores: MetricScores, *, n_resamples: int, seed: int, ci_resamples: int | None = None
) -> list[tuple[str | None, EffectResult]]:
    """The metric's effect over all treated items, then per group of treated items, against all
    controls (with ``scores.group_controls``: against the controls of the same group)."""
    valid = ~np.isnan(scores.scores)
    controls = valid & ~scores.treated
    selections: list[tuple[str | None, np.ndarray, np.ndarray]] = [(None, valid & scores.treated, controls)]
    if scores.groups is not None:
        labels = np.asarray(scores.groups, dtype=object)
        for label in sorted({g for g, t in zip(scores.groups, scores.treated) if t}):
            in_group = labels == label
            group_controls = controls & in_group if scores.group_controls else controls
            selections.append((str(label), valid & scores.treated & in_group, group_controls))
    out: list[tuple[str | None, EffectResult]] = []
    for group, mask, control_mask in selections:
        treated, control = scores.scores[mask], scores.scores[control_mask]
        out.append(
            (group, _compare(scores, treated, control, n_resamples=n_resamples, ci_resamples=ci_resamples, seed=seed))
        )
    return out


def _compare(
    scores: MetricScores,
    treated: np.ndarray,
    control: np.ndarray,
    *,
    n_resamples: int,
    ci_resamples: int | None,
    seed: int,
) -> EffectResult:
    if scores.test == "rates":
        return compare_rates(
            int(treated.sum()),
            int(treated.size),
            int(control.sum()),
            int(control.size),
            metric=scores.metric,
            alternative=scores.alternative,
        )
    if scores.test in ("auc", "tpr"):
        return compare_membership(
            treated,
            control,
            metric=scores.metric,
            statistic="auc" if scores.test == "auc" else "tpr",
            fpr=float(scores.extra.get("fpr", DEFAULT_FPR)),
            alternative=scores.alternative,
            n_resamples=ci_resamples or n_resamples,
            seed=seed,
        )
    if scores.test == "z":
        return one_sample_z(treated, metric=scores.metric, alternative=scores.alternative, control_values=control)
    return compare_means(
        treated,
        control,
        metric=scores.metric,
        alternative=scores.alternative,
        n_resamples=n_resamples,
        ci_resamples=ci_resamples,
        seed=seed,
    )


class MonitorRunner:
    """Evaluates all monitors; identical results and decisions on every rank."""

    def __init__(
        self,
        entries: list[ExperimentMonitor],
        config: MonitoringConfig,
        *,
        run_dir: Path,
        pad_token_id: int,
        sequence_length: int,
        seed: int,
        heldout: np.ndarray | None = None,
    ) -> None:
        self.entries = entries
        self.heldout = heldout
        self.config = config
        self.run_dir = Path(run_dir)
        self.pad_token_id = pad_token_id
        self.sequence_length = sequence_length
        self.seed = seed
        self.every = cadence_steps(config.every)
        self.evaluation_seconds: list[tuple[int, int, float]] = []  # (step, experiments scored, seconds)
        self.last_records: list[EvaluationRecord] = []
        self.last_evaluated: list[str] = []
        self.seconds_by_part: dict[str, float] = {}  # experiment names, "heldout_loss", "statistics", follow-ups

    @property
    def seconds(self) -> float:
        """Wall time of all evaluations so far."""
        return sum(seconds for _, _, seconds in self.evaluation_seconds)

    @property
    def evaluations(self) -> int:
        return len(self.evaluation_seconds)

    @property
    def path(self) -> Path:
        return RunDir(self.run_dir).metrics

    def due_experiments(self, completed_steps: int) -> list[str]:
        """Experiments whose own cadence divides ``completed_steps``."""
        return [e.experiment for e in self.entries if _due(e.every, completed_steps)]

    def heldout_due(self, completed_steps: int) -> bool:
        """Whether the held-out loss (the run's cadence) is due after ``completed_steps`` steps."""
        return _due(self.every, completed_steps)

    def evaluate(
        self,
        module: Any,
        *,
        step: int,
        when: str,
        precision_context: Any = None,
        experiments: Collection[str] | None = None,
        heldout: bool = True,
    ) -> list[EvaluationRecord]:
        """Score monitors on ``module`` (the unwrapped causal LM) after ``step`` completed steps.

        ``experiments``: only these (None: all; the callback passes :meth:`due_experiments`
        at interval evaluations); ``heldout``: also the held-out loss. Holm's family is the
        primary metrics scored in this evaluation, so the fit-end evaluation, which scores
        every experiment, corrects over the whole run.

        Returns the held-out loss (a :class:`RunMetricRecord`) first, then per experiment
        a :class:`FailureRecord` or its :class:`EffectRecord` s; ``metrics.jsonl`` gets
        their ``to_json()`` (rank 0).
        """
        entries = [e for e in self.entries if experiments is None or e.experiment in experiments]
        self.last_evaluated = [e.experiment for e in entries]
        live = LiveModel(
            module,
            pad_token_id=self.pad_token_id,
            max_length=self.sequence_length,
            batch_tokens=self.config.batch_tokens,
            batch_size=self.config.batch_size,
            precision_context=precision_context,
        )
        if live.device.type == "cuda":
            # The training step's kernels may still be queued; without this the monitor's
            # first synchronising call would wait for them on the monitor's clock.
            torch.cuda.synchronize(live.device)
        started = time.perf_counter()
        # One eval-mode switch, no_grad and precision context for the whole evaluation:
        # every LiveModel call inside would otherwise switch them again.
        with live.evaluating():
            records = self._score(live, entries, step=step, when=when, heldout=heldout)
        records = with_holm(records)
        self.last_records = records
        if dist.get_global_rank() == 0:
            self._append(records)
        self.evaluation_seconds.append((step, len(entries), time.perf_counter() - started))
        return records

    def _score(
        self, live: LiveModel, entries: list[ExperimentMonitor], *, step: int, when: str, heldout: bool
    ) -> list[EvaluationRecord]:
        """The held-out loss and each entry's effect records (or its failure), before Holm."""
        records: list[EvaluationRecord] = []
        if heldout and self.heldout is not None and len(self.heldout):
            with self._timed("heldout_loss"):
                loss = heldout_loss(live, self.heldout)
            records.append(RunMetricRecord(step=step, when=when, metric="heldout_loss", value=loss))
        for entry in entries:
            try:
                with self._timed(entry.experiment):
                    results = entry.monitor.evaluate(live)
            except Exception as exc:  # a broken monitor must not silently vanish, nor stop training by default
                if self.config.on_error == "raise":
                    raise
                warnings.warn(
                    f"multirun: monitor {entry.monitor_name!r} of {entry.experiment!r} failed at step {step}: {exc!r}",
                    stacklevel=2,
                )
                records.append(
                    FailureRecord(
                        step=step, when=when, experiment=entry.experiment, monitor=entry.monitor_name, error=repr(exc)
                    )
                )
                continue
            with self._timed("statistics"):
                # One seed for every evaluation: the same random splits and resamples
                # (common random numbers), so a p-value moves between evaluations with
                # the scores, not with the draws; and the splits are drawn only once.
                effects = [
                    (
                        scores,
                        effects_of(
                            scores,
                            n_resamples=self.config.n_resamples,
                            ci_resamples=self.config.ci_resamples,
                            seed=self.seed,
                        ),
                    )
                    for scores in results
                ]
            for scores, by_group in effects:
                for group, effect in by_group:
                    records.append(
                        EffectRecord(
                            step=step,
                            when=when,
                            experiment=entry.experiment,
                            monitor=entry.monitor_name,
                            group=group,
                            primary=bool(scores.primary and group is None),
                            effect=effect,
                            items=ItemScore.of(scores.item_ids, scores.treated, scores.scores)
                            if group is None
                            else None,
                        )
                    )
        return records

    @contextlib.contextmanager
    def follow_up(self, part: str) -> Iterator[None]:
        """Time work that acts on the last evaluation's records (logging them, controller
        decisions) as part of that evaluation's cost, under ``part``."""
        before = self.seconds_by_part.get(part, 0.0)
        try:
            with self._timed(part):
                yield
        finally:
            if self.evaluation_seconds:
                step, scored, total = self.evaluation_seconds[-1]
                self.evaluation_seconds[-1] = (step, scored, total + self.seconds_by_part[part] - before)

    @contextlib.contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds_by_part[part] = self.seconds_by_part.get(part, 0.0) + time.perf_counter() - started

    def log(self, logger: Any, records: Sequence[EvaluationRecord]) -> None:
        """Send an evaluation's numbers to Composer's logger: ``multirun/<run metric>`` and
        ``multirun/<experiment>/<metric>[/<group>]/<statistic>`` (finite values only)."""
        metrics: dict[str, float] = {}
        for r in records:
            if isinstance(r, RunMetricRecord):
                metrics[f"multirun/{r.metric}"] = float(r.value)
                continue
            if not isinstance(r, EffectRecord):
                continue
            prefix = f"multirun/{r.experiment}/{r.metric}" + (f"/{r.group}" if r.group else "")
            e = r.effect
            for key, value in (
                ("treated_mean", e.treated_mean),
                ("control_mean", e.control_mean),
                ("effect", e.effect),
                ("p_value", e.p_value),
                ("p_holm", e.p_holm),
            ):
                if value is not None and math.isfinite(value):  # metrics.jsonl has null there
                    metrics[f"{prefix}/{key}"] = float(value)
        if metrics:
            logger.log_metrics(metrics)

    def _append(self, records: Sequence[EvaluationRecord]) -> None:
        append_jsonl(self.path, [r.to_json() for r in records])

    def truncate(self, after_step: int) -> None:
        """Drop records of evaluations after ``after_step`` (they are repeated after a resume)."""
        truncate_jsonl(self.path, lambda r: int(r.get("step", 1 << 62)) <= after_step)


def _due(every: int | None, completed_steps: int) -> bool:
    return every is not None and completed_steps > 0 and completed_steps % every == 0


def heldout_loss(live: LiveModel, rows: np.ndarray) -> float:
    """Mean next-token cross-entropy (nats) over held-out rows."""
    scores = live.score_targets([r[:1] for r in rows], [r[1:] for r in rows])
    return float(-scores.logprob_sum.sum() / scores.n_tokens.sum())


def with_holm(records: Sequence[EvaluationRecord]) -> list[EvaluationRecord]:
    """``records`` with Holm's p-value set on the primary effect records (one family).

    Example:
        >>> from multirun.measure.stats import compare_rates
        >>> def rec(name, hits, primary=True):
        ...     return EffectRecord(0, "fit_end", name, "m", None, primary, compare_rates(hits, 10, 1, 10, metric="x"))
        >>> out = with_holm([rec("a", 9), rec("b", 5), rec("c", 9, primary=False)])
        >>> [None if r.p_holm is None else round(r.p_holm, 4) for r in out]
        [0.0011, 0.0704, None]
    """
    out = list(records)
    family = [(i, r) for i, r in enumerate(out) if isinstance(r, EffectRecord) and r.primary]
    for (i, record), result in zip(family, holm_adjust([r.effect for _, r in family])):
        out[i] = replace(record, effect=result)
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``metrics.jsonl`` as JSON dicts, verified and without their checksum field
    (:func:`~multirun.run_dir.read_jsonl`: a torn last line of a killed run is dropped with a
    warning; a damaged line is a CorruptionError naming it)."""
    return read_jsonl(RunDir(run_dir).metrics)
