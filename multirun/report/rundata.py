"""Read a run directory back for the report, tolerating an interrupted run.

Only files in the run directory are read (never the config's dataset or payloads),
so a report can be built on another machine from a copied run directory. Every
file but ``manifest.json``/``resolved_config.yaml`` may be missing: a run killed
early has no ``summary.json``, no ``training.jsonl`` before its first checkpoint,
and the optional analyses (controllers, acquisition, interaction) may never have run.

Example::

    run = load_run("runs/demo")
    run.finished, run.steps_reached   # (True, 200)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from multirun.errors import InputError
from multirun.ledger import Ledger
from multirun.measure.records import (
    EffectRecord,
    EvaluationRecord,
    FailureRecord,
    RunMetricRecord,
    effect_records,
    record_from_json,
    records_from_lines,
)
from multirun.run_dir import RunDir, read_jsonl_lines

DEFAULT_ALPHA = 0.01  # MonitoringConfig's default, for runs whose config says nothing


@dataclass
class Series:
    """A curve over training steps (sorted by step, one value per step)."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    @classmethod
    def from_pairs(cls, pairs: list[tuple[int, float | None]]) -> Series:
        # A step may appear twice (e.g. a record repeated after a resume): the last one wins.
        last: dict[int, float] = {}
        for step, value in pairs:
            last[int(step)] = math.nan if value is None else float(value)
        steps = np.array(sorted(last), dtype=np.int64)
        return cls(steps, np.array([last[int(s)] for s in steps], dtype=np.float64))

    def at(self, step: int) -> float:
        hit = np.flatnonzero(self.steps == step)
        return float(self.values[hit[-1]]) if hit.size else math.nan


@dataclass
class ProvenanceCounts:
    """What the ledger says, reduced to the numbers the report shows."""

    steps: dict[str, np.ndarray]  # experiment -> step of each span
    lengths: dict[str, np.ndarray]  # experiment -> tokens of each span
    exposures: dict[str, np.ndarray]  # experiment -> spans per exposed item

    def tokens(self, experiment: str) -> int:
        lengths = self.lengths.get(experiment)
        return int(lengths.sum(dtype=np.int64)) if lengths is not None else 0

    def spans(self, experiment: str) -> int:
        steps = self.steps.get(experiment)
        return int(steps.shape[0]) if steps is not None else 0

    @property
    def last_step(self) -> int | None:
        ends = [int(s.max()) for s in self.steps.values() if s.size]
        return max(ends) if ends else None


@dataclass
class RunData:
    """Everything the report needs from one run directory."""

    path: Path
    manifest: dict[str, Any] | None
    config: dict[str, Any] | None
    summary: dict[str, Any] | None
    provenance: ProvenanceCounts | None  # None: no ledger directory yet
    metrics: list[EvaluationRecord]  # metrics.jsonl, typed
    training: list[dict[str, Any]]
    controller: list[dict[str, Any]] | None = None  # None: file absent (not run)
    acquisition: dict[str, dict[str, dict[str, Any]]] | None = None
    interaction: dict[str, Any] | None = None
    experiment_names: list[str] = field(default_factory=list)
    #: the removals ledger's counts per experiment (Ledger.summary), empty without removals;
    #: read from the ledger, so an interrupted run (no summary.json) has them too
    removals: list[dict[str, Any]] = field(default_factory=list)
    #: sentences on records that could not be read and were left out (a torn last line of a
    #: JSON-lines log, which a killed run leaves): the report shows them as warnings.
    dropped: dict[str, str] = field(default_factory=dict)  # file name -> sentence

    # ------------------------------------------------------------- run facts
    @property
    def finished(self) -> bool:
        """A run is finished when its callback wrote ``summary.json`` at FIT_END."""
        return self.summary is not None

    @property
    def run_name(self) -> str:
        name = (self.config or {}).get("run_name")
        return str(name) if name else self.path.name

    @property
    def geometry(self) -> dict[str, int | None]:
        """global_batch_size, sequence_length, num_steps (num_steps None when unknown)."""
        if self.manifest and isinstance(self.manifest.get("geometry"), dict):
            g = self.manifest["geometry"]
            return {k: _int_or_none(g.get(k)) for k in ("global_batch_size", "sequence_length", "num_steps")}
        cfg = self.config or {}
        return {
            "global_batch_size": _int_or_none(_get(cfg, "train", "global_batch_size")),
            "sequence_length": _int_or_none(_get(cfg, "data", "sequence_length")),
            "num_steps": None,
        }

    @property
    def tokens_per_step(self) -> int | None:
        g = self.geometry
        if g["global_batch_size"] is None or g["sequence_length"] is None:
            return None
        return int(g["global_batch_size"]) * int(g["sequence_length"])

    @property
    def steps_reached(self) -> int:
        """Steps trained (summary), else the furthest step any record reaches.

        Ledger steps count from 0 (the step being trained); metrics and training-loss
        steps count completed steps, hence the ``+ 1`` for the ledger.
        """
        if self.summary is not None and self.summary.get("steps_trained") is not None:
            return int(self.summary["steps_trained"])
        reached = [0]
        if self.provenance is not None and self.provenance.last_step is not None:
            reached.append(self.provenance.last_step + 1)
        reached += [r.step for r in self.metrics]
        reached += [int(r["step"]) for r in self.training]
        return max(reached)

    @property
    def tokens_trained(self) -> int | None:
        if self.summary is not None and self.summary.get("tokens_trained") is not None:
            return int(self.summary["tokens_trained"])
        tps = self.tokens_per_step
        return None if tps is None else self.steps_reached * tps

    @property
    def alpha(self) -> float:
        for source in (self.summary or {}).get("alpha"), _get(self.config or {}, "monitoring", "alpha"):
            if isinstance(source, (int, float)):
                return float(source)
        return DEFAULT_ALPHA

    @property
    def max_modified_fraction(self) -> float | None:
        value = _get(self.config or {}, "injection", "max_modified_fraction")
        return float(value) if isinstance(value, (int, float)) else None

    def manifest_experiment(self, name: str) -> dict[str, Any]:
        for e in (self.manifest or {}).get("experiments", []):
            if e.get("name") == name:
                return e
        return {}

    # ------------------------------------------------------------- metrics
    def metric_records(self) -> list[EffectRecord]:
        """Effect records of experiments (no held-out loss, no monitor errors)."""
        return effect_records(self.metrics)

    def monitor_errors(self) -> list[FailureRecord]:
        return [r for r in self.metrics if isinstance(r, FailureRecord)]

    def last_effects(self) -> tuple[int | None, list[EffectRecord]]:
        """The records of the last evaluation (metrics.jsonl, else summary.json's effects)."""
        records = self.metric_records()
        if not records and self.summary and self.summary.get("effects"):
            records = _summary_effects(self.summary["effects"], RunDir(self.path).summary)
        if not records:
            return None, []
        last = max(r.step for r in records)
        return last, [r for r in records if r.step == last]

    def heldout_loss(self) -> Series:
        pairs: list[tuple[int, float | None]] = [
            (r.step, r.value) for r in self.metrics if isinstance(r, RunMetricRecord) and r.metric == "heldout_loss"
        ]
        return Series.from_pairs(pairs)

    def training_loss(self) -> Series:
        return Series.from_pairs([(int(r["step"]), r.get("loss")) for r in self.training])


# ------------------------------------------------------------------ loading


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; raises :class:`InputError` if it is not one.

    Missing optional files are empty/None; a torn last JSON line (a killed
    process) is dropped, with a warning and a sentence in ``dropped``; malformed JSON
    elsewhere, a JSON-lines record that fails its checksum, or a ledger shard that fails
    its checksum is an error naming the file (and line).

    Raises:
        CorruptionError: a damaged ledger shard or JSON-lines record.
        InputError: not a run directory, or a malformed file.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise InputError("run directory not found", file=path)
    files = RunDir(path)
    manifest = _read_json(files.manifest)
    config = _read_yaml(files.resolved_config)
    summary = _read_json(files.summary)
    if manifest is None and config is None and summary is None:
        expected = ", ".join(f.name for f in (files.manifest, files.resolved_config, files.summary))
        raise InputError(f"not a multirun run directory: none of {expected} is there", file=path)
    for file, value in ((files.manifest, manifest), (files.resolved_config, config), (files.summary, summary)):
        if value is not None and not isinstance(value, dict):
            raise InputError("expected a mapping at the top level", file=file)
    provenance = _provenance(path)
    dropped: dict[str, str] = {}
    metrics_lines = read_jsonl_lines(files.metrics)
    metrics = records_from_lines(metrics_lines)
    if metrics_lines.torn_message:
        dropped[files.metrics.name] = (
            f"{metrics_lines.torn_message}: the metric curves and effects miss that evaluation record."
        )
    training = _read_jsonl(files.training_log, required=("step", "loss"), dropped=dropped)
    controller_path = files.controller_log
    controller = (
        _read_jsonl(controller_path, required=("step", "experiment"), dropped=dropped)
        if controller_path.exists()
        else None
    )
    acquisition = _read_acquisition(files.acquisition)
    interaction = _read_interaction(files.interaction_matrix)

    names = [str(e.get("name")) for e in (manifest or {}).get("experiments", []) if e.get("name") is not None]
    extra_sources: list[list[str]] = [list(provenance.steps) if provenance else []]
    extra_sources.append([r.experiment for r in metrics if not isinstance(r, RunMetricRecord)])
    for source in extra_sources:
        for name in source:
            if name not in names:
                names.append(name)
    return RunData(
        path=path,
        manifest=manifest,
        config=config,
        summary=summary,
        provenance=provenance,
        metrics=metrics,
        training=training,
        controller=controller,
        acquisition=acquisition,
        interaction=interaction,
        experiment_names=names,
        dropped=dropped,
        removals=Ledger.open_removals(path).summary() if provenance is not None else [],
    )


def _provenance(run_dir: Path) -> ProvenanceCounts | None:
    if not RunDir(run_dir).ledger.is_dir():
        return None
    ledger = Ledger.open(run_dir)
    table = ledger.table
    steps: dict[str, np.ndarray] = {name: np.empty(0, np.int64) for name in ledger.experiments}
    lengths: dict[str, np.ndarray] = {name: np.empty(0, np.int64) for name in ledger.experiments}
    exposures: dict[str, np.ndarray] = {name: np.empty(0, np.int64) for name in ledger.experiments}
    if table.num_rows == 0:
        return ProvenanceCounts(steps, lengths, exposures)
    # Work on dictionary codes: one vectorised pass, whatever the ledger's size.
    exp_codes, exp_names = _codes(table.column("experiment"))
    item_codes, _ = _codes(table.column("item"))
    step = table.column("step").to_numpy()
    length = table.column("length").to_numpy().astype(np.int64)
    for code, name in enumerate(exp_names):
        mask = exp_codes == code
        if not mask.any():
            continue
        steps[name] = step[mask]
        lengths[name] = length[mask]
        counts = np.bincount(item_codes[mask])
        exposures[name] = counts[counts > 0]
    return ProvenanceCounts(steps, lengths, exposures)


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Indices and dictionary of a (unified, single-chunk) dictionary column."""
    array = column.combine_chunks()
    return np.asarray(array.indices.to_numpy(zero_copy_only=False), dtype=np.int64), array.dictionary.to_pylist()


def _read_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg}", file=path, line=exc.lineno) from None


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(f"not valid YAML: {exc}", file=path, line=mark.line + 1 if mark else None) from None


def _read_jsonl(path: Path, *, required: tuple[str, ...], dropped: dict[str, str]) -> list[dict[str, Any]]:
    """Records of a JSON-lines log, verified (:func:`~multirun.run_dir.read_jsonl_lines`); a
    torn *last* line (a killed writer) is dropped and said in ``dropped``.

    A malformed line anywhere else is an error naming the file and line: it is not
    something a crash leaves behind, and silently dropping it would hide data.
    """
    content = read_jsonl_lines(path)
    if content.torn_message:
        dropped[path.name] = f"{content.torn_message}."
    out = []
    for number, record in content.lines:
        if not isinstance(record, dict):
            raise InputError("expected a JSON object", file=path, line=number)
        for key in required:
            if key not in record:
                raise InputError("missing field", file=path, line=number, key=key)
        if not isinstance(record["step"], int) or isinstance(record["step"], bool):
            raise InputError(f"step must be an integer, got {record['step']!r}", file=path, line=number, key="step")
        out.append(record)
    return out


def _summary_effects(effects: Any, path: Path) -> list[EffectRecord]:
    """``summary.json``'s effects (records without per-item scores; failures left out)."""
    out = []
    for index, entry in enumerate(effects if isinstance(effects, list) else []):
        if isinstance(entry, dict) and "error" in entry:
            continue
        try:
            record = record_from_json(entry)
        except ValueError as exc:
            raise InputError(f"not an effect record: {exc}", file=path, key=f"effects[{index}]") from None
        if isinstance(record, EffectRecord):
            out.append(record)
    return out


def _read_acquisition(path: Path) -> dict[str, dict[str, dict[str, Any]]] | None:
    data = _read_json(path)
    if data is None:
        return None
    if not isinstance(data, dict):
        raise InputError("expected {experiment: {item: {...}}}", file=path)
    for experiment, items in data.items():
        if not isinstance(items, dict):
            raise InputError(
                "expected {item: {acquired_at_step, exposures_to_acquisition}}", file=path, key=str(experiment)
            )
        for item, entry in items.items():
            if not isinstance(entry, dict):
                raise InputError("expected an object", file=path, key=f"{experiment}.{item}")
            for key in ("acquired_at_step", "exposures_to_acquisition"):
                value = entry.get(key)
                if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                    raise InputError(
                        f"must be an integer or null, got {value!r}", file=path, key=f"{experiment}.{item}.{key}"
                    )
    return data


def _read_interaction(path: Path) -> dict[str, Any] | None:
    data = _read_json(path)
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise InputError("expected an object with a 'cells' list", file=path, key="cells")
    for index, cell in enumerate(data["cells"]):
        if not isinstance(cell, dict):
            raise InputError("expected an object", file=path, key=f"cells[{index}]")
        for key in ("arm", "experiment", "metric"):
            if not isinstance(cell.get(key), str):
                raise InputError("missing or not a string", file=path, key=f"cells[{index}].{key}")
    return data


def _get(mapping: dict[str, Any], *keys: str) -> Any:
    value: Any = mapping
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def finite(value: Any) -> float:
    """``value`` as a float, NaN for None/non-numbers (JSON stores NaN as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)
