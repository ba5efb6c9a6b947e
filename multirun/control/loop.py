"""The closed loop inside the running trainer: monitor results -> controller decisions -> spans.

After every monitor evaluation (identical on every rank), each controlled experiment's
controller decides how many spans each item gets in the next window; the decision is
placed into the same occupancy as the static plan (no overlap, same cap) and takes
effect from the next step, without restarting. Decisions are logged to
``controller.jsonl`` and to Composer's logger, and kept in the checkpoint; on resume
they are replayed, which rebuilds the dynamic spans exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from composer.utils import dist

from multirun.config import LoadedConfig
from multirun.control.controllers import Controller, ControllerDecision, acquisition_record, build_controller
from multirun.errors import ConfigError, PlacementError, ResumeError
from multirun.measure.records import EvaluationRecord
from multirun.plan.dynamic import DynamicSchedule
from multirun.plan.run_plan import RunPlan
from multirun.run_dir import RunDir, append_jsonl, truncate_jsonl, write_json_atomic
from multirun.types import SpanTable


def build_controllers(loaded: LoadedConfig, plan: RunPlan, monitor_classes: dict[str, type]) -> dict[str, Controller]:
    """Validate and build every experiment's controller before training starts."""
    config = loaded.config
    controllers: dict[str, Controller] = {}
    experiments = {e.name: e for e in plan.experiments}
    for index, spec in enumerate(config.experiments):
        if spec.controller is None:
            continue
        where = f"experiments[{index}]"
        every = config.monitor_every(spec)
        if every is None:
            raise ConfigError(
                "a controller needs a monitoring cadence (monitoring.every or this experiment's monitor.every)",
                file=loaded.source,
                key=f"{where}.controller",
            )
        monitor_class = monitor_classes.get(spec.name)
        if monitor_class is None:
            raise ConfigError(
                "a controller needs the experiment's monitor (monitor.enabled is false)",
                file=loaded.source,
                key=f"{where}.controller",
            )
        try:
            controllers[spec.name] = build_controller(
                spec.controller.name,
                spec.controller.options,
                experiment=experiments[spec.name],
                metrics_available=list(getattr(monitor_class, "metrics", ())),
                window_steps=every,
                num_steps=plan.geometry.num_steps,
            )
        except ConfigError as exc:
            raise ConfigError(exc.message, file=loaded.source, key=f"{where}.{exc.key}" if exc.key else where) from None
    return controllers


def build_control_loop(
    loaded: LoadedConfig, plan: RunPlan, monitor_classes: dict[str, type], *, run_dir: Path
) -> ControlLoop | None:
    """The run's control loop, or None when no experiment has a controller."""
    controllers = build_controllers(loaded, plan, monitor_classes)
    if not controllers:
        return None
    return ControlLoop(
        controllers,
        plan,
        run_dir=run_dir,
        max_modified_fraction=loaded.config.injection.max_modified_fraction,
        on_unplaceable=loaded.config.injection.on_unplaceable,
    )


class ControlLoop:
    """Controllers plus the dynamic schedule they fill.

    ``on_unplaceable`` (the run's ``injection.on_unplaceable``): when a decision's spans
    cannot all be placed in its window (per-step cap or collisions), ``"warn"`` goes on
    with the spans that were placed (:class:`~multirun.plan.static.UnplacedSpansWarning`,
    and ``unplaced`` in ``controller.jsonl``); ``"error"`` logs the decision and raises
    :class:`~multirun.errors.PlacementError` naming the experiment and the step, which
    stops training (Composer closes the run: the ledger up to that step is flushed).
    """

    def __init__(
        self,
        controllers: dict[str, Controller],
        plan: RunPlan,
        *,
        run_dir: Path,
        max_modified_fraction: float,
        on_unplaceable: Literal["error", "warn"] = "warn",
    ) -> None:
        self.controllers = controllers
        self.plan = plan
        self.run_dir = Path(run_dir)
        self.max_modified_fraction = max_modified_fraction
        self.on_unplaceable = on_unplaceable
        self.schedule = self._fresh_schedule()

    @property
    def log_path(self) -> Path:
        return RunDir(self.run_dir).controller_log

    def _fresh_schedule(self) -> DynamicSchedule:
        return DynamicSchedule(
            self.plan.experiments,
            self.plan.spans,
            self.plan.geometry,
            max_modified_fraction=self.max_modified_fraction,
            seed=self.plan.seed,
        )

    # ------------------------------------------------------------------ state
    def state_json(self) -> str:
        """One string under one fixed key: FSDP checkpoints need a fixed key set."""
        return json.dumps(
            {"states": {name: c.state_dict() for name, c in self.controllers.items()}, "decisions": self.schedule.log()}
        )

    def restore(self, state_json: str | None, *, resumed_step: int) -> None:
        """Fresh start (no state) or resume: replay the decisions, restore controller states."""
        if dist.get_global_rank() == 0:
            truncate_jsonl(self.log_path, lambda r: resumed_step > 0 and int(r["step"]) <= resumed_step)
        if not state_json:
            if resumed_step > 0:
                raise ResumeError("the checkpoint holds no controller state, but this run has controllers")
            return
        state = json.loads(state_json)
        decisions = [ControllerDecision.from_dict(d) for d in state["decisions"]]
        self.schedule = DynamicSchedule.from_decisions(
            decisions,
            self.plan.experiments,
            self.plan.spans,
            self.plan.geometry,
            max_modified_fraction=self.max_modified_fraction,
            seed=self.plan.seed,
        )
        for name, controller in self.controllers.items():
            if name not in state["states"]:
                raise ResumeError(f"the checkpoint holds no state for the controller of {name!r}")
            controller.load_state_dict(state["states"][name])

    # -------------------------------------------------------------- decisions
    def decide(
        self,
        *,
        step: int,
        records: Sequence[EvaluationRecord],
        evaluated: Sequence[str] | None = None,
        logger: Any = None,
    ) -> list[ControllerDecision]:
        """Let each controller whose experiment was scored (``evaluated``; None = all) decide
        after an evaluation at ``step`` completed steps."""
        by_name = {e.name: e for e in self.plan.experiments}
        decisions, lines = [], []
        failed: str | None = None
        for name, controller in self.controllers.items():
            if evaluated is not None and name not in evaluated:
                continue
            decision = controller.decide(
                step=step, records=records, experiment=by_name[name], num_steps=self.plan.geometry.num_steps
            )
            spans, unplaced = self.schedule.apply(decision, warn=self.on_unplaceable == "warn")
            decisions.append(decision)
            lines.append(decision.log_record(placed=len(spans), unplaced=unplaced, tokens=int(spans.length.sum())))
            if logger is not None:
                logger.log_metrics({f"multirun/{name}/controller/{k}": v for k, v in decision.scalars().items()})
            if unplaced and self.on_unplaceable == "error":
                window = decision.window
                failed = (
                    f"experiment {name!r}, step {step}: {unplaced} of {decision.num_spans} spans its "
                    f"{decision.controller} controller asked for could not be placed in steps "
                    f"[{window[0]}, {window[1]}) (per-step cap or collisions with other spans), and "
                    "injection.on_unplaceable is 'error'. Raise injection.max_modified_fraction, lower the "
                    "controller's rates, or set injection.on_unplaceable: warn to go on with fewer spans"
                )
                break  # every rank decides the same: every rank stops here
        if dist.get_global_rank() == 0:
            append_jsonl(self.log_path, lines)  # the failed decision too: controller.jsonl shows what happened
        if failed is not None:
            raise PlacementError(failed)
        return decisions

    def all_acquired(self) -> bool:
        """Every experiment whose controller acquires items (``acquired_at`` is not None)
        has acquired every treated item."""
        acquired = [c.acquired_at for c in self.controllers.values()]
        acquirers = [a for a in acquired if a is not None]
        return bool(acquirers) and all(step is not None for a in acquirers for step in a.values())

    def spans_at(self, step: int) -> SpanTable:
        return self.schedule.spans_at(step)

    # ---------------------------------------------------------------- results
    def summary(self) -> dict[str, Any]:
        return {"dynamic_placed": dict(self.schedule.placed), "dynamic_unplaced": dict(self.schedule.unplaced)}

    def write_acquisition(self, ledger_table: Any) -> dict[str, Any]:
        """``acquisition.json``: per acquire-controlled item, the step and exposures to acquisition."""
        acquired = {name: controller.acquired_at for name, controller in self.controllers.items()}
        record = {name: acquisition_record(ledger_table, name, at) for name, at in acquired.items() if at is not None}
        if record:
            write_json_atomic(RunDir(self.run_dir).acquisition, record)
        return record
