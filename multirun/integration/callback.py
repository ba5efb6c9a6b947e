"""The Composer callback that injects experiment payloads and records provenance.

One method per Composer event (see docs/architecture.md, "One batch through the pipeline"):

- ``FIT_START``: assemble the parts if they wait for the trainer (llm-foundry path),
  check a resumed checkpoint belongs to this plan, cut the ledger back to the resumed step.
- ``AFTER_DATALOADER``: :class:`multirun.inject.step.StepSchedule` says what this rank
  injects (what :func:`multirun.inject.step.plan_step` computes, from arrays prepared a
  window of steps ahead); the callback overwrites it in the host batch, before Composer
  splits microbatches, and keeps it in an :class:`~multirun.inject.step.InjectionLog`,
  expanded into ledger rows at each flush.
- ``BEFORE_FORWARD``: tell the embedding-noise hook which rows the microbatch holds.
- ``BATCH_END``: evaluate the monitors that are due; controllers decide.
- ``BATCH_CHECKPOINT`` / ``EPOCH_CHECKPOINT``: flush the ledger when a checkpoint is
  about to be written, so a checkpoint never covers steps the ledger lacks.
- ``FIT_END``: flush, then rank 0 writes ``summary.json``.

Example (Python; :func:`multirun.run.parts.assemble_parts` builds the parts)::

    trainer = Trainer(..., callbacks=[MultirunCallback(parts)])

On llm-foundry, :class:`multirun.integration.llmfoundry.LlmFoundryMultirunCallback`
(the ``llmfoundry_callbacks_with_config`` entry point) gives the callback parts that are
assembled at ``FIT_START`` from the trainer's batch size and duration.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from composer.callbacks import CheckpointSaver
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist, reproducibility

from multirun.control.loop import ControlLoop
from multirun.data.order import DataOrder, data_order
from multirun.errors import MultirunError, ResumeError
from multirun.inject.batch import (
    BatchRows,
    DerivedKeys,
    check_batch,
    input_ids_of,
    key_buffer,
    row_lookup,
)
from multirun.inject.boundary import boundary_experiments, insert_at_boundaries
from multirun.inject.noise import EmbeddingNoiseHook
from multirun.inject.removal import StreamRemoval, remove_from_batch
from multirun.inject.step import InjectionLog, StepSchedule
from multirun.ledger import Ledger, LedgerWriter, truncate_ledger
from multirun.measure.live_model import unwrap_model
from multirun.measure.runner import MonitorRunner
from multirun.plan.run_plan import RunPlan
from multirun.run.parts import RunParts
from multirun.run_dir import RunDir, append_jsonl, read_jsonl, truncate_jsonl, write_json_atomic
from multirun.types import BatchGeometry

STATE_FORMAT = 1


class PartsAtFitStart(Protocol):
    """Parts that can only be assembled once the trainer exists (the llm-foundry path)."""

    @property
    def run_dir(self) -> Path: ...

    @property
    def interaction_after(self) -> str: ...

    def assemble(self, state: State) -> RunParts:
        """Build the run's parts from the trainer's batch size and duration."""
        ...


class MultirunCallback(Callback):
    """Inject many experiments into one Composer run with exact provenance.

    Args:
        parts: the run's parts (:func:`multirun.run.parts.assemble_parts`), or an
            object that assembles them at ``FIT_START`` from the trainer's geometry.
        overwrite: allow a fresh start in a run directory whose earlier run finished.
    """

    def __init__(self, parts: RunParts | PartsAtFitStart, *, overwrite: bool = False) -> None:
        self.parts: RunParts | None = parts if isinstance(parts, RunParts) else None
        self._pending = None if isinstance(parts, RunParts) else parts
        self.run_dir = Path(parts.run_dir)
        self.files = RunDir(self.run_dir)
        self.interaction_after = parts.interaction_after
        self.overwrite = overwrite
        self._interaction_trigger: dict[str, Any] | None = None
        self._writer: LedgerWriter | None = None
        self._loaded_state: dict[str, Any] | None = None
        self._rng_at_first_batch: list[dict[str, Any]] | None = None
        self._finished = False
        self._missed_spans: dict[str, int] = {}
        self._checked_geometry = False
        self._injection_seconds = 0.0
        self._noise_hook: EmbeddingNoiseHook | None = None
        self._fit_started = time.perf_counter()
        self._microbatch_first_row = 0
        self._losses: list[dict[str, Any]] = []
        self._savers: list[CheckpointSaver] = []
        self._rows_per_rank = 0
        self._data_order: DataOrder | None = None
        self._rows_keyed_by: str | None = None
        self._derived = DerivedKeys()
        self._checked_batch = False
        self._steps: StepSchedule | None = None
        self._boundary: np.ndarray | None = None
        self._log: InjectionLog | None = None
        self._removal: StreamRemoval | None = None  # None: no removal experiment, no work per step
        self._removal_writer: LedgerWriter | None = None
        self._rank = 0
        self._world_size = 1

    @property
    def plan(self) -> RunPlan | None:
        """The run plan (None on the llm-foundry path until ``FIT_START``)."""
        return self.parts.plan if self.parts is not None else None

    @property
    def monitors(self) -> MonitorRunner | None:
        return self.parts.monitors if self.parts is not None else None

    @property
    def control(self) -> ControlLoop | None:
        return self.parts.control if self.parts is not None else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # Plain types only, identical on every rank: Composer saves rank 0's copy.
        return {
            "format": STATE_FORMAT,
            "plan_fingerprint": self.plan.fingerprint if self.plan is not None else None,
            "schedule_fingerprint": self.plan.schedule_fingerprint if self.plan is not None else None,
            "missed_spans": dict(self._missed_spans),
            "controllers": self.control.state_json() if self.control is not None else "",
            "interaction_trigger": json.dumps(self._interaction_trigger) if self._interaction_trigger else "",
            # Every rank's RNG states, gathered as Composer gathers its own for the checkpoint
            # (state_dict runs on every rank at a save). Composer restores its copy only when
            # a run resumes at an epoch boundary, or while spinning a dataloader; a Streaming
            # dataset resumes mid-epoch without spinning, so dropout would draw other masks
            # after the resume. See after_dataloader.
            "rng": reproducibility.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded_state = dict(state)
        self._missed_spans = {str(k): int(v) for k, v in state.get("missed_spans", {}).items()}
        trigger = state.get("interaction_trigger")
        self._interaction_trigger = json.loads(trigger) if trigger else None

    # ----------------------------------------------------------------- events
    def fit_start(self, state: State, logger: Logger) -> None:
        """Assemble pending parts, check a resumed checkpoint, cut the ledger back to the resumed step."""
        self._fit_started = time.perf_counter()
        self._finished = False
        if self.parts is None:
            assert self._pending is not None
            self.parts = self._pending.assemble(state)
        parts = self.parts
        self._check_resume(parts.plan)
        self._order_before_checkpoint_savers(state)
        rank = dist.get_global_rank()
        self._rank, self._world_size = rank, dist.get_world_size()
        self._rows_per_rank = int(
            getattr(state.dataloader, "batch_size", None) or parts.plan.geometry.global_batch_size
        )
        self._data_order = data_order(getattr(state.dataloader, "dataset", None))
        self._derived = DerivedKeys.of_collator(
            getattr(state.dataloader, "collate_fn", None), eos_token_id=parts.plan.eos_token_id
        )
        if rank == 0 and not self._data_order.world_size_independent:
            warnings.warn(
                f"multirun: global rows may depend on the world size: {self._data_order.reason}", stacklevel=2
            )
        step = int(state.timestamp.batch)
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._prepare_ledger_dir(step)
            parts.plan.write(self.run_dir)
        dist.barrier()
        self._writer = LedgerWriter(
            self.run_dir,
            rank=rank,
            experiment_names=parts.plan.experiment_names,
            item_ids=[e.item_ids for e in parts.plan.experiments],
        )
        self._removal = StreamRemoval.of_experiments(parts.plan.experiments)
        if self._removal is not None:
            self._removal_writer = LedgerWriter(
                self.run_dir,
                rank=rank,
                experiment_names=parts.plan.experiment_names,
                item_ids=[e.item_ids for e in parts.plan.experiments],
                removals=True,
            )
        self._steps = StepSchedule(parts.plan, noise_specs=parts.noise_specs)
        self._log = InjectionLog(parts.plan)
        self._boundary = boundary_experiments(parts.plan)  # at: boundary experiments (None: none)
        if any(spec is not None for spec in parts.noise_specs):
            model: Any = unwrap_model(state.model)  # a Hugging Face model: input embeddings by method
            self._noise_hook = EmbeddingNoiseHook(model.get_input_embeddings())
        control, monitors = parts.control, parts.monitors
        if control is not None:
            control.restore((self._loaded_state or {}).get("controllers"), resumed_step=step)
            if step == 0 and not monitors.config.at_fit_start:
                control.decide(step=0, records=[])  # the first window gets its spans too
        if rank == 0:
            # Evaluations after the checkpoint (or all, on a fresh start) run again.
            monitors.truncate(after_step=step if step > 0 else -1)
        if step == 0 and monitors.config.at_fit_start:
            self._evaluate(state, None, step=0, when="fit_start")
        rng = (self._loaded_state or {}).get("rng")
        if step > 0 and int(state.timestamp.batch_in_epoch) > 0 and rng:
            self._rng_at_first_batch = rng

    def after_dataloader(self, state: State, logger: Logger) -> None:
        """Overwrite this step's spans in the host batch (before Composer splits
        microbatches) and keep them for this rank's ledger.

        A step without spans on any rank costs a window lookup; one with spans costs the
        row identity (one small collective with several processes), a few vectorised
        operations on the prepared window, and the overwrite. Ledger rows are built from
        the kept steps in bulk at the next flush.
        """
        assert self.parts is not None and self._steps is not None and self._log is not None
        plan = self.parts.plan
        started = time.perf_counter()
        step = int(state.timestamp.batch)
        if self._rng_at_first_batch is not None:
            # Resumed mid-epoch: the new dataloader iterator has drawn its base seed from
            # torch's RNG, which the uninterrupted run drew at the epoch's start. Restoring
            # here, once the batch is drawn, leaves the RNG as the uninterrupted run has it
            # at this point (Composer restores before the draw only at an epoch boundary).
            reproducibility.load_rng_state(self._rng_at_first_batch)
            self._rng_at_first_batch = None
        self._microbatch_first_row = 0
        if self._noise_hook is not None:
            self._noise_hook.clear()
        batch = state.batch
        if not self._checked_batch:  # before anything is overwritten
            check_batch(batch, self._derived)
            self._checked_batch = True
        steps = self._steps
        if self.control is not None:
            steps.set_dynamic(self.control.schedule.spans)  # an identity check unless a decision came
        # The plan and the decisions are the same on every rank, so every rank skips the
        # same steps (and the collective of the row identity with them).
        removing = self._removal is not None and self._removal.active_at(step)
        if self._checked_geometry and not steps.has_spans(step) and not removing:
            self._injection_seconds += time.perf_counter() - started
            return
        rows = BatchRows.of_batch(batch)  # before anything is overwritten
        self._rows_keyed_by = self._rows_keyed_by or rows.keyed_by
        lookup = self._row_lookup(rows, state)
        if not self._checked_geometry:
            self._check_geometry(plan.geometry, len(lookup), int(rows.tokens.shape[1]))
        work = steps.at(step, lookup, every_row_here=self._world_size == 1)
        if self._boundary is not None and len(work) and plan.eos_token_id is not None:
            work = insert_at_boundaries(work, rows.tokens, self._boundary, plan.eos_token_id)
        if work.missed:
            self._record_missed(work.missed, len(lookup))
        injected_rows: dict[int, int] = {}  # local row -> original fingerprint, for a removal
        if len(work):
            local = work.local_rows
            # Before the overwrite. Hashing the original rows waits for the log's bulk pass
            # (one per flush or memory bound, not one per step), unless the fingerprints are
            # known already (content keys) or this step's removal needs them.
            if rows.fingerprint is not None or removing:
                fingerprints = rows.fingerprints_of(local)
                self._log.record(work, sample_ids=rows.sample_ids_of(local), row_fingerprints=fingerprints)
                injected_rows = dict(zip(local, fingerprints.tolist()))
            else:
                self._log.record(work, sample_ids=rows.sample_ids_of(local), original_rows=rows.copies_of(local))
            state.batch = work.write(batch, derived=self._derived)
            if self._noise_hook is not None:
                self._noise_hook.set_step(work.noise())
            injected = sum(work.run_lengths) if self._rank == 0 else 0
            logger.log_metrics({"multirun/injected_tokens_rank0": injected})
        if removing:
            # After the injection: removal scans the inserts too (multirun/inject/removal.py).
            self._remove(state, rows, np.asarray(lookup, dtype=np.int64), step=step, injected_rows=injected_rows)
        self._injection_seconds += time.perf_counter() - started

    def _remove(
        self, state: State, rows: BatchRows, lookup: np.ndarray, *, step: int, injected_rows: dict[int, int]
    ) -> None:
        """Overwrite the rows holding a removed n-gram; buffer one removals-ledger row per span."""
        assert self._removal is not None and self._removal_writer is not None and self.parts is not None
        state.batch, columns = remove_from_batch(
            self._removal,
            state.batch,
            rows,
            lookup,
            step=step,
            injected_rows=injected_rows,
            derived=self._derived,
            plan=self.parts.plan,
        )
        if columns is not None:
            self._removal_writer.append(**columns)

    def before_forward(self, state: State, logger: Logger) -> None:
        """Tell the embedding-noise hook which rows of the step's batch this microbatch holds."""
        if self._noise_hook is not None:
            rows = int(input_ids_of(state.batch).shape[0])
            self._noise_hook.set_microbatch(self._microbatch_first_row, rows)
            self._microbatch_first_row += rows

    def batch_end(self, state: State, logger: Logger) -> None:
        """Keep the step's loss; evaluate the monitors that are due."""
        if self._noise_hook is not None:
            self._noise_hook.clear()
        self._record_loss(state)
        self._evaluate_if_due(state, logger)
        if self.plan is not None and int(state.timestamp.batch) >= self.plan.geometry.num_steps:
            # The last step: finish here, before Composer writes the final checkpoint at this
            # step's BATCH_CHECKPOINT. A kill after that checkpoint then leaves a finished run
            # (summary written), never one whose relaunch has nothing left to train.
            self._finish(state, logger)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        """Flush the ledger when a checkpoint is about to be written, so a checkpoint
        never covers steps the ledger lacks."""
        if self._checkpoint_due(state, Event.BATCH_CHECKPOINT):
            self._flush()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        if self._checkpoint_due(state, Event.EPOCH_CHECKPOINT):
            self._flush()

    def fit_end(self, state: State, logger: Logger) -> None:
        """Finish the run if its last step did not (training stopped before the planned steps)."""
        self._finish(state, logger)

    def _finish(self, state: State, logger: Logger) -> None:
        """Score every monitor, flush, and (rank 0) write ``summary.json``; once."""
        if self._finished:
            return
        self._finished = True
        if self.monitors is not None and self.monitors.config.at_fit_end:
            self._evaluate(state, logger, step=int(state.timestamp.batch), when="fit_end")
        if self.interaction_after in ("acquired", "end"):
            self._record_interaction_trigger(state, "end_of_training")
        self._flush()
        dist.barrier()
        if dist.get_global_rank() == 0:
            self._write_summary(state)
        dist.barrier()

    def close(self, state: State, logger: Logger) -> None:
        # Training raised or the trainer closed: keep what was trained on. Rows after
        # the last checkpoint are cut again on resume, so flushing here is safe.
        self._flush()
        if self._noise_hook is not None:
            self._noise_hook.remove()
            self._noise_hook = None

    # ---------------------------------------------------------------- helpers
    def _row_lookup(self, rows: BatchRows, state: State) -> list[int]:
        """The local row of each of the step's global rows (-1: another rank's)."""
        if self._world_size == 1:
            return rows.order
        # One small int64 tensor per step, [row count, each row's key, padding]: every rank
        # passes the same shape (a short final batch is padded), and nothing is pickled.
        buffer = key_buffer(rows.key, self._rows_per_rank)
        gathered = dist.all_gather(state.device.tensor_to_device(buffer))
        return row_lookup(torch.stack(list(gathered)).cpu().numpy(), self._rank).tolist()

    def _check_resume(self, plan: RunPlan) -> None:
        loaded = self._loaded_state
        if loaded is None:
            return
        if loaded.get("format") != STATE_FORMAT:
            raise ResumeError(f"checkpoint holds multirun state format {loaded.get('format')}, expected {STATE_FORMAT}")
        if loaded.get("plan_fingerprint") != plan.fingerprint:
            raise ResumeError(
                "the checkpoint was written by a run with other experiments, payloads, seed or geometry "
                f"(plan {loaded.get('plan_fingerprint')} vs {plan.fingerprint}); resume with the original config "
                "or start a new run_dir"
            )
        # Checkpoints from before the schedule fingerprint lack it: the inputs' check above holds.
        saved_schedule = loaded.get("schedule_fingerprint")
        if saved_schedule is not None and saved_schedule != plan.schedule_fingerprint:
            raise ResumeError(
                "the checkpoint's run was planned with other spans from the same config and payloads "
                f"(schedule {saved_schedule} vs {plan.schedule_fingerprint}): a multirun version whose planner "
                "draws differently; resume with the version that started the run, or start a new run_dir"
            )

    def _prepare_ledger_dir(self, step: int) -> None:
        files = self.files
        if step > 0:
            # Steps >= step are trained again after the resume: drop rows written after the checkpoint.
            truncate_ledger(files.root, from_step=step)
            truncate_ledger(files.root, from_step=step, removals=True)
            truncate_jsonl(files.training_log, lambda r: int(r["step"]) <= step)
            return
        if not files.ledger.exists():
            return
        if files.summary.exists() and not self.overwrite:
            raise ResumeError(
                f"{files.root} holds a finished run (summary.json); choose another run_dir or pass overwrite",
                file=files.root,
            )
        removed = truncate_ledger(files.root, from_step=0)
        truncate_ledger(files.root, from_step=0, removals=True)
        files.training_log.unlink(missing_ok=True)
        if removed:
            warnings.warn(
                f"{files.root}: starting from step 0, removed {removed} ledger rows of an earlier attempt", stacklevel=2
            )

    def _order_before_checkpoint_savers(self, state: State) -> None:
        # The ledger must be flushed before a checkpoint is written at the same event;
        # callbacks run in list order, so stand before every CheckpointSaver.
        callbacks = list(state.callbacks)
        savers = [i for i, cb in enumerate(callbacks) if isinstance(cb, CheckpointSaver)]
        mine = callbacks.index(self)
        if savers and min(savers) < mine:
            callbacks.pop(mine)
            callbacks.insert(min(savers), self)
            state.callbacks = callbacks
        self._savers = [cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)]

    def _checkpoint_due(self, state: State, event: Event) -> bool:
        # CheckpointSaver's interval function gives the same answer when asked twice
        # within one event, so asking it first tells whether it is about to save.
        return any(saver.save_interval(state, event) for saver in getattr(self, "_savers", []))

    def _check_geometry(self, geometry: BatchGeometry, total_rows: int, sequence_length: int) -> None:
        if sequence_length != geometry.sequence_length or total_rows != geometry.global_batch_size:
            raise MultirunError(
                f"the training batch has {total_rows} rows x {sequence_length} tokens across ranks, but the plan "
                f"was built for {geometry.global_batch_size} x {geometry.sequence_length}; set the global batch size "
                "and sequence length the plan expects"
            )
        self._checked_geometry = True

    def _record_missed(self, missed: dict[int, int], total_rows: int) -> None:
        # A short final batch has fewer rows than planned: those spans are reported, never dropped silently.
        assert self.plan is not None
        for e, count in missed.items():
            name = self.plan.experiments[e].name
            self._missed_spans[name] = self._missed_spans.get(name, 0) + count
            warnings.warn(
                f"multirun: {count} spans of {name!r} target rows beyond this step's {total_rows} rows", stacklevel=2
            )

    def _record_loss(self, state: State) -> None:
        # Rank 0 keeps the all-reduced training loss; written with the ledger at checkpoints.
        losses = state.total_loss_dict
        if dist.get_global_rank() == 0 and losses:
            total = losses.get("loss/train/total", next(iter(losses.values())))
            self._losses.append({"step": int(state.timestamp.batch), "loss": float(total)})

    def _flush(self) -> None:
        if self._writer is not None:
            columns = self._log.drain() if self._log is not None else None
            if columns is not None:
                self._writer.append(**columns)
            self._writer.flush()
        if self._removal_writer is not None:
            self._removal_writer.flush()
        if self._losses and self.run_dir is not None:
            append_jsonl(self.files.training_log, self._losses)
            self._losses = []

    def _evaluate_if_due(self, state: State, logger: Logger) -> None:
        if self.monitors is None or self.plan is None:
            return
        completed = int(state.timestamp.batch)
        final = completed >= self.plan.geometry.num_steps and self.monitors.config.at_fit_end
        if final:
            return  # fit end scores everything
        experiments, heldout = self.monitors.due_experiments(completed), self.monitors.heldout_due(completed)
        if experiments or heldout:
            self._evaluate(state, logger, step=completed, when="interval", experiments=experiments, heldout=heldout)

    def _evaluate(
        self,
        state: State,
        logger: Logger | None,
        *,
        step: int,
        when: str,
        experiments: list[str] | None = None,
        heldout: bool = True,
    ) -> None:
        assert self.monitors is not None
        from composer.core.precision import get_precision_context

        records = self.monitors.evaluate(
            unwrap_model(state.model),
            step=step,
            when=when,
            experiments=experiments,
            heldout=heldout,
            precision_context=lambda: get_precision_context(state.precision),
        )
        with self.monitors.follow_up("logging and control"):
            if logger is not None:
                self.monitors.log(logger, records)
            if self.control is not None:
                self.control.decide(step=step, records=records, evaluated=self.monitors.last_evaluated, logger=logger)
                if self._steps is not None:
                    # Merge the decision's spans now, not at the next step's overwrite.
                    self._steps.set_dynamic(self.control.schedule.spans)
                    self._steps.window(step)
        if self.control is not None and self.interaction_after == "acquired" and self.control.all_acquired():
            self._record_interaction_trigger(state, "all_acquired")

    def _record_interaction_trigger(self, state: State, trigger: str) -> None:
        """Checkpoint now and record it as the interaction tests' starting point (once)."""
        if self._interaction_trigger is not None or self.run_dir is None:
            return
        step = int(state.timestamp.batch)
        from composer.utils.checkpoint import save_checkpoint

        self._flush()  # the ledger must cover every step the checkpoint does
        self._interaction_trigger = {"trigger": trigger, "step": step}  # before saving: the checkpoint holds it
        path = save_checkpoint(state, str(self.files.checkpoints / f"interaction-ba{step}-rank{{rank}}.pt"))
        self._interaction_trigger["checkpoint"] = str(path) if path else None
        if dist.get_global_rank() == 0:
            write_json_atomic(self.files.interaction_trigger, self._interaction_trigger)

    def _write_summary(self, state: State) -> None:
        assert self.plan is not None and self.run_dir is not None
        geometry = self.plan.geometry
        steps_trained = int(state.timestamp.batch)
        ledger = Ledger.open(self.run_dir)
        acquisition = self.control.write_acquisition(ledger.table) if self.control is not None else {}
        summary = {
            "plan_fingerprint": self.plan.fingerprint,
            "steps_trained": steps_trained,
            "tokens_trained": steps_trained * geometry.tokens_per_step,
            "experiments": ledger.summary(total_training_tokens=steps_trained * geometry.tokens_per_step),
            "planned": dict(self.plan.result.placed),
            "unplaced": dict(self.plan.result.unplaced),
            "missed_spans": dict(self._missed_spans),
            "row_identity": {
                "keyed_by": self._rows_keyed_by,
                "world_size": dist.get_world_size(),
                **(self._data_order.to_json() if self._data_order is not None else {}),
            },
            "injection_seconds_rank0": round(self._injection_seconds, 6),
            "fit_seconds": round(time.perf_counter() - self._fit_started, 3),
        }
        if self._removal is not None:
            summary["removals"] = Ledger.open_removals(self.run_dir).summary()
        if self.control is not None:
            summary.update(self.control.summary())
            summary["acquisition"] = acquisition
        if self.monitors is not None:
            from multirun.measure.records import RunMetricRecord

            # Effects and monitor failures without per-item scores; run-level metrics apart.
            summary["effects"] = [
                {k: v for k, v in r.to_json().items() if k != "items"}
                for r in self.monitors.last_records
                if not isinstance(r, RunMetricRecord)
            ]
            heldout = [
                r.value
                for r in self.monitors.last_records
                if isinstance(r, RunMetricRecord) and r.metric == "heldout_loss"
            ]
            summary["heldout_loss"] = heldout[0] if heldout else None
            summary["monitor_seconds"] = round(self.monitors.seconds, 6)
            # Counted from metrics.jsonl, not this process's evaluations: a resumed run
            # reports the same number as an uninterrupted one.
            summary["monitor_evaluations"] = len(
                {(r.get("step"), r.get("when")) for r in read_jsonl(self.files.metrics)}
            )
            summary["monitor_seconds_by_part"] = {
                k: round(v, 6) for k, v in sorted(self.monitors.seconds_by_part.items())
            }
            summary["alpha"] = self.monitors.config.alpha
        write_json_atomic(self.files.summary, summary)

    @property
    def injection_seconds(self) -> float:
        """Wall time this rank spent in injection (for benchmarks)."""
        return self._injection_seconds
