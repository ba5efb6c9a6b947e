"""The Composer callback that injects experiment payloads and records provenance.

Events (see ARCHITECTURE.md, "Data flow"):

- ``FIT_START``: build the plan if it was not given (llm-foundry path), check a
  resumed checkpoint belongs to this plan, cut the ledger back to the resumed step.
- ``AFTER_DATALOADER``: overwrite this step's spans in the host batch, before
  Composer splits microbatches, and append them to this rank's ledger buffer.
- ``BATCH_CHECKPOINT`` / ``EPOCH_CHECKPOINT``: flush the ledger when a checkpoint is
  about to be written, so a checkpoint never covers steps the ledger lacks.
- ``FIT_END``: flush, then rank 0 writes ``summary.json``.

Example (Python)::

    trainer = Trainer(..., callbacks=[MultirunCallback(plan=plan, run_dir="runs/x")])

Example (llm-foundry YAML, through the ``llmfoundry_callbacks`` entry point)::

    callbacks:
      multirun:
        config: experiments.yaml      # a multirun YAML with `experiments:` (and optionally injection, tokenizer, seed)
        run_dir: ${save_folder}/multirun
        sequence_length: 2048
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from composer.callbacks import CheckpointSaver
from composer.core import Callback, Event, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from multirun.inject.batch import (
    apply_spans,
    flat_token_positions,
    global_rows,
    input_ids_of,
    sample_ids_of,
)
from multirun.control.loop import ControlLoop
from multirun.errors import ConfigError, MultirunError, ResumeError
from multirun.run.files import append_jsonl, truncate_jsonl
from multirun.ledger import Ledger, LedgerWriter, truncate_ledger
from multirun.measure.runner import MonitorRunner
from multirun.measure.live_model import unwrap_model
from multirun.inject.noise import EmbeddingNoiseHook, noised_spans
from multirun.plan.run_plan import RunPlan, write_json_atomic
from multirun.types import BatchGeometry, SpanTable

STATE_FORMAT = 1
TRAINING_LOG = "training.jsonl"
INTERACTION_TRIGGER = "interaction_trigger.json"


class MultirunCallback(Callback):
    """Inject many experiments into one Composer run with exact provenance.

    Args:
        plan: a ready :class:`~multirun.plan.run_plan.RunPlan` (what ``multirun train`` passes).
        monitors: scores the experiments on the live model at fit start, every N steps
            and at fit end (built from the config on the llm-foundry path).
        run_dir: where the ledger, manifest and summary go.
        overwrite: allow a fresh start in a run directory whose earlier run finished.
        config: llm-foundry path: a multirun YAML (``experiments:``, optionally
            ``injection:``, ``tokenizer:``, ``seed:``); the plan is built at FIT_START
            from the trainer's batch size and duration.
        sequence_length: llm-foundry path: the training sequence length.
        experiments, injection, tokenizer, seed, monitoring, interaction: llm-foundry path,
            inline instead of ``config``.
    """

    def __init__(
        self,
        plan: RunPlan | None = None,
        *,
        monitors: MonitorRunner | None = None,
        control: ControlLoop | None = None,
        interaction_after: str = "none",
        run_dir: str | Path | None = None,
        overwrite: bool = False,
        config: str | Path | None = None,
        sequence_length: int | None = None,
        experiments: list[dict] | None = None,
        injection: dict | None = None,
        tokenizer: dict | None = None,
        seed: int | None = None,
        monitoring: dict | None = None,
        interaction: dict | None = None,
    ) -> None:
        self.plan = plan
        self.monitors = monitors
        self.control = control
        self.interaction_after = interaction_after
        self._interaction_trigger: dict[str, Any] | None = None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.overwrite = overwrite
        self._deferred = None
        if plan is None:
            # Validate payloads and config now, so bad input fails before training starts.
            from multirun.integration.llmfoundry import DeferredPlan

            self._deferred = DeferredPlan.from_kwargs(
                config=config,
                sequence_length=sequence_length,
                experiments=experiments,
                injection=injection,
                tokenizer=tokenizer,
                seed=seed,
                run_dir=run_dir,
                monitoring=monitoring,
                interaction=interaction,
            )
            self.interaction_after = self._deferred.loaded.config.interaction.after
            if self.run_dir is None:
                self.run_dir = self._deferred.run_dir
        if self.run_dir is None:
            raise ConfigError("MultirunCallback needs run_dir", key="run_dir")
        self._writer: LedgerWriter | None = None
        self._loaded_state: dict[str, Any] | None = None
        self._missed_spans: dict[str, int] = {}
        self._checked_geometry = False
        self._injection_seconds = 0.0
        self._noise_hook: EmbeddingNoiseHook | None = None
        self._fit_started = time.perf_counter()
        self._microbatch_first_row = 0
        self._losses: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # Plain types only, identical on every rank: Composer saves rank 0's copy.
        return {
            "format": STATE_FORMAT,
            "plan_fingerprint": self.plan.fingerprint if self.plan is not None else None,
            "missed_spans": dict(self._missed_spans),
            "controllers": self.control.state_json() if self.control is not None else "",
            "interaction_trigger": json.dumps(self._interaction_trigger) if self._interaction_trigger else "",
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded_state = dict(state)
        self._missed_spans = {str(k): int(v) for k, v in state.get("missed_spans", {}).items()}
        trigger = state.get("interaction_trigger")
        self._interaction_trigger = json.loads(trigger) if trigger else None

    # ----------------------------------------------------------------- events
    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state)
        elif event == Event.AFTER_DATALOADER:
            self._after_dataloader(state, logger)
        elif event == Event.BEFORE_FORWARD and self._noise_hook is not None:
            rows = int(input_ids_of(state.batch).shape[0])
            self._noise_hook.set_microbatch(self._microbatch_first_row, rows)
            self._microbatch_first_row += rows
        elif event == Event.BATCH_END:
            if self._noise_hook is not None:
                self._noise_hook.clear()
            self._record_loss(state)
            self._evaluate_if_due(state, logger)
        elif event in (Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT):
            if self._checkpoint_due(state, event):
                self._flush()
        elif event == Event.FIT_END:
            self._fit_end(state, logger)

    def close(self, state: State, logger: Logger) -> None:
        # Training raised or the trainer closed: keep what was trained on. Rows after
        # the last checkpoint are cut again on resume, so flushing here is safe.
        self._flush()

    def _fit_start(self, state: State) -> None:
        self._fit_started = time.perf_counter()
        if self.plan is None:
            assert self._deferred is not None
            self.plan = self._deferred.build(state)
            self.monitors = self._deferred.build_monitors(self.plan)
            self.control = self._deferred.build_control(self.plan, self.monitors)
        self._check_resume()
        self._order_before_checkpoint_savers(state)
        rank = dist.get_global_rank()
        step = int(state.timestamp.batch)
        run_dir = self.run_dir
        assert run_dir is not None
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._prepare_ledger_dir(run_dir, step)
            self.plan.write(run_dir)
        dist.barrier()
        self._writer = LedgerWriter(
            run_dir,
            rank=rank,
            experiment_names=self.plan.experiment_names,
            item_ids=[e.item_ids for e in self.plan.experiments],
        )
        if any(e.embedding_noise is not None for e in self.plan.experiments):
            embedding = unwrap_model(state.model).get_input_embeddings()
            self._noise_hook = EmbeddingNoiseHook(embedding)
        if self.control is not None:
            self.control.restore((self._loaded_state or {}).get("controllers"), resumed_step=step)
            if step == 0 and (self.monitors is None or not self.monitors.config.at_fit_start):
                self.control.decide(step=0, records=[])  # the first window gets its spans too
        if self.monitors is not None:
            if rank == 0:
                # Evaluations after the checkpoint (or all, on a fresh start) run again.
                self.monitors.truncate(after_step=step if step > 0 else -1)
            if step == 0 and self.monitors.config.at_fit_start:
                self._evaluate(state, None, step=0, when="fit_start")

    def _check_resume(self) -> None:
        assert self.plan is not None
        loaded = self._loaded_state
        if loaded is None:
            return
        if loaded.get("format") != STATE_FORMAT:
            raise ResumeError(f"checkpoint holds multirun state format {loaded.get('format')}, expected {STATE_FORMAT}")
        if loaded.get("plan_fingerprint") != self.plan.fingerprint:
            raise ResumeError(
                "the checkpoint was written by a run with other experiments, payloads, seed or geometry "
                f"(plan {loaded.get('plan_fingerprint')} vs {self.plan.fingerprint}); resume with the original config "
                "or start a new run_dir"
            )

    def _prepare_ledger_dir(self, run_dir: Path, step: int) -> None:
        if step > 0:
            # Steps >= step are trained again after the resume: drop rows written after the checkpoint.
            truncate_ledger(run_dir, from_step=step)
            truncate_jsonl(run_dir / TRAINING_LOG, lambda r: int(r["step"]) <= step)
            return
        if not (run_dir / "ledger").exists():
            return
        if (run_dir / "summary.json").exists() and not self.overwrite:
            raise ResumeError(
                f"{run_dir} holds a finished run (summary.json); choose another run_dir or pass overwrite",
                file=run_dir,
            )
        removed = truncate_ledger(run_dir, from_step=0)
        (run_dir / TRAINING_LOG).unlink(missing_ok=True)
        if removed:
            warnings.warn(f"{run_dir}: starting from step 0, removed {removed} ledger rows of an earlier attempt")

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

    def _after_dataloader(self, state: State, logger: Logger) -> None:
        plan, writer = self.plan, self._writer
        assert plan is not None and writer is not None
        started = time.perf_counter()
        step = int(state.timestamp.batch)
        self._microbatch_first_row = 0
        if self._noise_hook is not None:
            self._noise_hook.clear()
        batch = state.batch
        input_ids = input_ids_of(batch)
        local_rows, sequence_length = int(input_ids.shape[0]), int(input_ids.shape[1])
        sample_ids = sample_ids_of(batch)
        world = dist.get_world_size()
        gathered = None
        if world > 1 and sample_ids is not None:
            gathered = [np.asarray(g, dtype=np.int64) for g in dist.all_gather_object(sample_ids.tolist())]
        rank = dist.get_global_rank()
        rows = global_rows(sample_ids, rank=rank, gathered_sample_ids=gathered, local_rows=local_rows)
        total_rows = rows.total_rows if rows.total_rows >= 0 else local_rows * world
        if not self._checked_geometry:
            self._check_geometry(plan.geometry, total_rows, sequence_length)

        spans = plan.spans_at(step)
        if self.control is not None:
            spans = SpanTable.concat([spans, self.control.spans_at(step)])
        if len(spans):
            self._count_missed(spans.row, spans.experiment, total_rows)
            local = rows.local_rows_of(spans.row.astype(np.int64)) if rows.total_rows >= 0 else _rank_major_local(
                spans.row, rank, local_rows
            )
            mine = local >= 0
            if mine.any():
                spans = spans.take(mine)
                local = local[mine]
                tokens = plan.tokens_of(spans.experiment, spans.sequence)
                positions = flat_token_positions(local, spans.offset, spans.length, sequence_length)
                apply_spans(batch, positions=positions, tokens=tokens, eos_token_id=plan.eos_token_id, rows_touched=local)
                state.batch = batch
                items = plan.items_of(spans.experiment, spans.sequence)
                if self._noise_hook is not None:
                    specs = [e.embedding_noise for e in plan.experiments]
                    self._noise_hook.set_step(noised_spans(local, spans.offset, spans.length, specs, items, spans.experiment))
                writer.append(
                    step=np.full(len(spans), step, dtype=np.int64),
                    global_row=spans.row,
                    local_row=local.astype(np.int32),
                    sample_id=sample_ids[local] if sample_ids is not None else np.full(len(spans), -1, dtype=np.int64),
                    offset=spans.offset,
                    length=spans.length,
                    experiment=spans.experiment,
                    item_index=items,
                    sequence=spans.sequence,
                    repetition=spans.repetition,
                    token_hash=plan.hashes_of(spans.experiment, spans.sequence),
                )
                logger.log_metrics({"multirun/injected_tokens_rank0": int(spans.length.sum()) if rank == 0 else 0})
        self._injection_seconds += time.perf_counter() - started

    def _check_geometry(self, geometry: BatchGeometry, total_rows: int, sequence_length: int) -> None:
        if sequence_length != geometry.sequence_length or total_rows != geometry.global_batch_size:
            raise MultirunError(
                f"the training batch has {total_rows} rows x {sequence_length} tokens across ranks, but the plan "
                f"was built for {geometry.global_batch_size} x {geometry.sequence_length}; set the global batch size "
                "and sequence length the plan expects"
            )
        self._checked_geometry = True

    def _count_missed(self, span_rows: np.ndarray, span_experiments: np.ndarray, total_rows: int) -> None:
        # A short final batch has fewer rows than planned: those spans are reported, never dropped silently.
        missed = span_rows >= total_rows
        if not missed.any():
            return
        assert self.plan is not None
        for e in np.unique(span_experiments[missed]):
            name = self.plan.experiments[int(e)].name
            count = int(np.count_nonzero(span_experiments[missed] == e))
            self._missed_spans[name] = self._missed_spans.get(name, 0) + count
            warnings.warn(f"multirun: {count} spans of {name!r} target rows beyond this step's {total_rows} rows")

    def _record_loss(self, state: State) -> None:
        # Rank 0 keeps the all-reduced training loss; written with the ledger at checkpoints.
        losses = state.total_loss_dict
        if dist.get_global_rank() == 0 and losses:
            total = losses.get("loss/train/total", next(iter(losses.values())))
            self._losses.append({"step": int(state.timestamp.batch), "loss": float(total)})

    def _flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        if self._losses and self.run_dir is not None:
            append_jsonl(self.run_dir / TRAINING_LOG, self._losses)
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
        self, state: State, logger: Logger | None, *, step: int, when: str,
        experiments: list[str] | None = None, heldout: bool = True,
    ) -> None:
        assert self.monitors is not None
        from composer.core.precision import get_precision_context

        records = self.monitors.evaluate(
            unwrap_model(state.model), step=step, when=when, experiments=experiments, heldout=heldout,
            precision_context=lambda: get_precision_context(state.precision),
        )
        with self.monitors.follow_up("logging and control"):
            if logger is not None:
                self.monitors.log(logger, records)
            if self.control is not None:
                self.control.decide(step=step, records=records, evaluated=self.monitors.last_evaluated, logger=logger)
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
        path = save_checkpoint(state, str(self.run_dir / "checkpoints" / f"interaction-ba{step}-rank{{rank}}.pt"))
        self._interaction_trigger["checkpoint"] = str(path) if path else None
        if dist.get_global_rank() == 0:
            write_json_atomic(self.run_dir / INTERACTION_TRIGGER, self._interaction_trigger)

    def _fit_end(self, state: State, logger: Logger | None = None) -> None:
        if self.monitors is not None and self.monitors.config.at_fit_end:
            self._evaluate(state, logger, step=int(state.timestamp.batch), when="fit_end")
        if self.interaction_after in ("acquired", "end"):
            self._record_interaction_trigger(state, "end_of_training")
        self._flush()
        dist.barrier()
        if dist.get_global_rank() == 0:
            self._write_summary(state)
        dist.barrier()

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
            "injection_seconds_rank0": round(self._injection_seconds, 6),
            "fit_seconds": round(time.perf_counter() - self._fit_started, 3),
        }
        if self.control is not None:
            summary.update(self.control.summary())
            summary["acquisition"] = acquisition
        if self.monitors is not None:
            from multirun.measure.records import RunMetricRecord

            # Effects and monitor failures without per-item scores; run-level metrics apart.
            summary["effects"] = [
                {k: v for k, v in r.to_json().items() if k != "items"}
                for r in self.monitors.last_records if not isinstance(r, RunMetricRecord)
            ]
            heldout = [
                r.value for r in self.monitors.last_records if isinstance(r, RunMetricRecord) and r.metric == "heldout_loss"
            ]
            summary["heldout_loss"] = heldout[0] if heldout else None
            summary["monitor_seconds"] = round(self.monitors.seconds, 6)
            summary["monitor_evaluations"] = self.monitors.evaluations
            summary["monitor_seconds_by_part"] = {k: round(v, 6) for k, v in sorted(self.monitors.seconds_by_part.items())}
            summary["alpha"] = self.monitors.config.alpha
        write_json_atomic(self.run_dir / "summary.json", summary)

    @property
    def injection_seconds(self) -> float:
        """Wall time this rank spent in injection (for benchmarks)."""
        return self._injection_seconds


def _rank_major_local(span_rows: np.ndarray, rank: int, local_rows: int) -> np.ndarray:
    local = span_rows.astype(np.int64) - rank * local_rows
    local[(local < 0) | (local >= local_rows)] = -1
    return local


def steps_in_duration(state: State, global_batch_size: int, sequence_length: int) -> int:
    """Number of training steps in ``state.max_duration``."""
    duration = state.max_duration
    if duration is None:
        raise ConfigError("the trainer has no max_duration", key="max_duration")
    value = int(duration.value)
    if duration.unit == TimeUnit.BATCH:
        return value
    if duration.unit == TimeUnit.TOKEN:
        return math.ceil(value / (global_batch_size * sequence_length))
    if duration.unit == TimeUnit.SAMPLE:
        return math.ceil(value / global_batch_size)
    if duration.unit == TimeUnit.EPOCH:
        if state.dataloader_len is None:
            raise ConfigError("max_duration in epochs needs a dataloader with a length", key="max_duration")
        return value * int(state.dataloader_len)
    raise ConfigError(f"unsupported max_duration unit {duration.unit}", key="max_duration")
