"""The run plan: prepared experiments plus their static span schedule.

A :class:`RunPlan` is everything the callback needs to inject: the geometry, the
experiments' token sequences, the spans of every step and the token fingerprints
the ledger records. It is built once, before training, from a validated config.

Example::

    plan = build_run_plan(loaded, tokenizer=tok, geometry=geo)
    plan.spans_at(0)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from multirun import __version__
from multirun.config import LoadedConfig, without_row_defaults
from multirun.data.tokenizers import Tokenizer
from multirun.kinds.experiments import arms_record, build_experiments
from multirun.ledger import token_hash
from multirun.plan.checks import check_experiments
from multirun.plan.static import PlanResult, plan_static
from multirun.run_dir import RunDir, write_json_atomic
from multirun.types import SPAN_COLUMNS, BatchGeometry, PreparedExperiment, SpanTable


@dataclass
class RunPlan:
    """Experiments and their static schedule for one run."""

    geometry: BatchGeometry
    experiments: list[PreparedExperiment]
    result: PlanResult
    seed: int
    eos_token_id: int | None
    config_fingerprint: str
    sequence_hashes: list[np.ndarray]
    # The static schedule's horizon: the run's first duration, kept when an extension adds
    # steps (multirun/run/continuation.py); None = geometry.num_steps.
    static_steps: int | None = None
    durations: tuple[int, ...] = ()

    @property
    def static_horizon(self) -> int:
        """Steps the static schedule was planned over (the run's first duration)."""
        return self.geometry.num_steps if self.static_steps is None else self.static_steps

    @property
    def spans(self) -> SpanTable:
        return self.result.spans

    @property
    def fingerprint(self) -> str:
        """Identifies what will be injected: config, payloads and geometry.

        A checkpoint taken under one plan cannot be resumed under another. The geometry
        enters with the static horizon as its step count, so an extension (more steps,
        the same static schedule) keeps the fingerprint.
        """
        h = xxhash.xxh64()
        h.update(self.config_fingerprint.encode())
        planned = {**self.geometry.__dict__, "num_steps": self.static_horizon}
        h.update(json.dumps(planned, sort_keys=True).encode())
        for experiment in self.experiments:
            h.update(experiment.fingerprint.encode())
        return h.hexdigest()

    @cached_property
    def schedule_fingerprint(self) -> str:
        """xxh64 of the static schedule itself: every span's step, row, offset and identity.

        :attr:`fingerprint` names the inputs; this names what the planner made of them,
        so a checkpoint resumed under a planner that draws differently (another multirun
        version) is refused instead of continuing with other spans.
        """
        h = xxhash.xxh64()
        for column in SPAN_COLUMNS:
            h.update(np.ascontiguousarray(getattr(self.spans, column)).tobytes())
        return h.hexdigest()

    def restricted(self, names: Sequence[str]) -> RunPlan:
        """The same plan with only the spans of the experiments in ``names``.

        Every experiment stays (its probes and arms are still measured); the others are
        simply not injected (a removal experiment among them removes nothing), and the kept
        spans are exactly those of the full plan.
        """
        kept = set(names)
        keep = np.isin(self.spans.experiment, [i for i, n in enumerate(self.experiment_names) if n in kept])

        def only(counts: dict[str, int]) -> dict[str, int]:
            return {n: (c if n in kept else 0) for n, c in counts.items()}

        result = replace(
            self.result,
            spans=self.spans.take(np.flatnonzero(keep)),
            requested=only(self.result.requested),
            placed=only(self.result.placed),
            unplaced=only(self.result.unplaced),
        )
        experiments = [e if e.name in kept or e.removal is None else replace(e, removal=None) for e in self.experiments]
        return replace(self, result=result, experiments=experiments)

    @property
    def experiment_names(self) -> list[str]:
        return [e.name for e in self.experiments]

    def spans_at(self, step: int) -> SpanTable:
        return self.spans.take(self.spans.step_slice(step))

    def tokens_of(self, experiment: np.ndarray, sequence: np.ndarray) -> np.ndarray:
        """Concatenated tokens of the given spans' sequences, in span order."""
        if experiment.shape[0] == 0:
            return np.empty(0, dtype=np.int32)
        parts = [self.experiments[int(e)].sequence_tokens(int(s)) for e, s in zip(experiment, sequence)]
        return np.concatenate(parts)

    @cached_property
    def _sequence_lookup(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every experiment's per-sequence items and hashes, concatenated, and where each
        experiment starts: one gather per step instead of a loop over experiments."""
        first = np.cumsum([0, *(e.seq_items.shape[0] for e in self.experiments)])[:-1].astype(np.int64)
        # The empty leading arrays make a plan without experiments work too.
        items = np.concatenate([np.zeros(0, np.int32), *(e.seq_items for e in self.experiments)]).astype(np.int32)
        hashes = np.concatenate([np.zeros(0, np.uint64), *self.sequence_hashes]).astype(np.uint64)
        return first, items, hashes

    def hashes_of(self, experiment: np.ndarray, sequence: np.ndarray) -> np.ndarray:
        first, _, hashes = self._sequence_lookup
        return hashes[first[experiment] + sequence]

    def items_of(self, experiment: np.ndarray, sequence: np.ndarray) -> np.ndarray:
        first, items, _ = self._sequence_lookup
        return items[first[experiment] + sequence]

    def manifest(self) -> dict[str, Any]:
        """Plain description of the plan, written to ``manifest.json``."""
        spans = self.spans
        experiments: list[dict[str, Any]] = []
        for index, e in enumerate(self.experiments):
            mine = spans.experiment == index
            experiments.append(
                {
                    "name": e.name,
                    "kind": e.kind,
                    "fingerprint": e.fingerprint,
                    "items": len(e.item_ids),
                    "treated_items": int(np.count_nonzero(e.treated)),
                    "control_items": int(np.count_nonzero(~e.treated)),
                    "sequences": int(e.seq_lengths.shape[0]),
                    "planned_spans": int(np.count_nonzero(mine)),
                    "planned_tokens": int(spans.length[mine].sum()),
                    "unplaced_spans": int(self.result.unplaced.get(e.name, 0)),
                    "placement": {
                        "mode": e.placement.mode,
                        "start_step": e.placement.start_step,
                        "end_step": e.placement.end_step,
                        "steps": list(e.placement.steps),
                    },
                    "metadata": e.metadata,
                }
            )
            if e.placement.by_row:  # only then, so manifests of other runs keep their form
                experiments[-1]["placement"].update(whole=e.placement.whole, at=e.placement.at)
                experiments[-1]["cap_exempt_tokens"] = (
                    experiments[-1]["planned_tokens"] if e.placement.whole is not None else 0
                )
        return {
            "multirun_version": __version__,
            "plan_fingerprint": self.fingerprint,
            "schedule_fingerprint": self.schedule_fingerprint,
            "config_fingerprint": self.config_fingerprint,
            "seed": self.seed,
            "geometry": dict(self.geometry.__dict__),
            "static_steps": self.static_horizon,
            "durations": list(self.durations or (self.geometry.num_steps,)),
            "experiments": experiments,
        }

    def write(self, run_dir: str | Path) -> None:
        """Write ``manifest.json`` and ``arms.json`` atomically into the run directory."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        files = RunDir(run_dir)
        write_json_atomic(files.manifest, self.manifest())
        write_json_atomic(files.arms, arms_record(self.experiments))


def build_run_plan(
    loaded: LoadedConfig,
    *,
    tokenizer: Tokenizer,
    geometry: BatchGeometry,
    static_steps: int | None = None,
    durations: Sequence[int] = (),
) -> RunPlan:
    """Prepare every experiment of the config and plan its spans.

    ``static_steps``: plan the static schedule over the first ``static_steps`` steps only
    (an extended run keeps its first duration's schedule; placements in fractions of
    the run resolve against it); ``durations``: the run's launches so far, for the manifest.
    """
    config = loaded.config
    if static_steps is not None and not 0 < static_steps <= geometry.num_steps:
        raise ValueError(f"static_steps={static_steps} outside 1..{geometry.num_steps}")
    horizon = geometry if static_steps is None else replace(geometry, num_steps=static_steps)
    experiments = build_experiments(loaded, tokenizer=tokenizer, geometry=horizon)
    for spec, experiment in zip(config.experiments, experiments):
        if not spec.inject or spec.controller is not None:
            # A negative control (its arms measured, its treated items never injected), or a
            # controlled experiment, whose spans its controller places while training runs.
            experiment.seq_repetitions = np.zeros_like(experiment.seq_repetitions)
    check_experiments(loaded, experiments, horizon)  # doses and arms, before the planner allocates spans
    plan = plan_experiments(loaded, experiments, tokenizer=tokenizer, geometry=horizon)
    return replace(plan, geometry=geometry, static_steps=horizon.num_steps, durations=tuple(durations))


def plan_experiments(
    loaded: LoadedConfig, experiments: list[PreparedExperiment], *, tokenizer: Tokenizer, geometry: BatchGeometry
) -> RunPlan:
    """Plan the spans of prepared experiments (their repetitions and placements as they are)."""
    config = loaded.config
    result = plan_static(
        experiments,
        geometry,
        seed=config.seed,
        max_modified_fraction=config.injection.max_modified_fraction,
        on_unplaceable=config.injection.on_unplaceable,
    )
    hashes = [
        np.array([token_hash(e.sequence_tokens(s)) for s in range(e.seq_lengths.shape[0])], dtype=np.uint64)
        for e in experiments
    ]
    return RunPlan(
        geometry=geometry,
        experiments=experiments,
        result=result,
        seed=config.seed,
        eos_token_id=tokenizer.eos_token_id,
        config_fingerprint=injection_fingerprint(loaded),
        sequence_hashes=hashes,
    )


def injection_fingerprint(loaded: LoadedConfig) -> str:
    """Fingerprint of the config sections that decide what is injected where.

    Run name, run directory, checkpoint cadence and the like are left out, so a run
    can be resumed from a moved directory or with another save interval; so are paths
    (payloads, tokenizer), which enter through the experiments' content fingerprints.
    """
    resolved = loaded.resolved_dict()
    relevant = {key: resolved[key] for key in ("seed", "injection")}
    # Paths enter by content: the tokenizer's and each payload's fingerprints are in every
    # experiment's fingerprint, which the plan fingerprint folds in; their spelling (a
    # config's relative path is absolute in resolved_config.yaml) must not matter. How an
    # experiment is measured does not change what is injected.
    relevant["tokenizer"] = resolved["tokenizer"]["kind"]
    relevant["experiments"] = [
        {
            k: (without_row_defaults(v) if k == "placement" else v)
            for k, v in e.items()
            if k not in ("monitor", "payload")
        }
        for e in resolved["experiments"]
    ]
    return xxhash.xxh64(json.dumps(relevant, sort_keys=True).encode()).hexdigest()
