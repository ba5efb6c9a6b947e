"""``multirun export``: a finished run's model and tokenizer in Hugging Face format, and what it inserted.

Written to ``RUN_DIR/export`` (or ``--out``)::

    model/                  save_pretrained: config, weights (and the tokenizer, when there is one)
    inserts.parquet         one row per item of every experiment (see INSERT_COLUMNS)
    inserts.jsonl           the same rows as JSON lines
    export_manifest.json    run name, checkpoint, step, plan fingerprint, tokenizer, files

The inserts are the paper's released-inserts format (``experiment``, ``text``) plus the
arms and the ledger's counts: treated items with the text that was injected (decoded
from the exact token sequences the run's injectors prepared, each checked against the
ledger's ``token_hash``) and control items (never injected, so without text and with 0
exposures). A ``removal`` experiment's items hold the texts kept out of training, with
the removals ledger's counts (``removals``, ``tokens_removed``) instead of exposures.
An exposure is one ledger row: one span of one of the item's sequences on one row of
one step, written once, by the rank that held the row; ``summary.json``'s
``exposures_per_item`` counts the same rows. With a checkpoint of step ``k`` only the
spans of steps ``< k`` count: those are the ones the exported weights were trained on.

Example::

    result = export_run("runs/demo")
    AutoModelForCausalLM.from_pretrained(result.model_dir)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from multirun.config import LoadedConfig, load_config
from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError, InputError, ResumeError
from multirun.ledger import Ledger, token_hash
from multirun.run_dir import RunDir, atomic_path, write_json_atomic
from multirun.types import BatchGeometry, PreparedExperiment

__all__ = ["INSERT_COLUMNS", "ExportResult", "RunContents", "export_run", "inserts_table", "open_run", "save_tokenizer"]

#: The inserts dataset's columns, in order.
INSERT_COLUMNS: dict[str, pa.DataType] = {
    "experiment": pa.string(),
    "kind": pa.string(),
    "item": pa.string(),
    "arm": pa.string(),
    "text": pa.string(),  # the item's injected sequences decoded, joined by a blank line; null for controls
    "texts": pa.list_(pa.string()),  # each injected sequence decoded (knowledge items have several paraphrases)
    "sequences": pa.int32(),
    "token_count": pa.int64(),  # tokens of the item's sequences (EOS wrapping included), each counted once
    "exposures": pa.int64(),  # ledger rows (spans trained on) of the item
    "tokens_trained": pa.int64(),  # sum of those spans' lengths
    "first_step": pa.int64(),  # null when never exposed
    "last_step": pa.int64(),
    "removals": pa.int64(),  # removal experiments: removals-ledger rows (spans overwritten) of the item
    "tokens_removed": pa.int64(),  # sum of those spans' lengths
}
INSERTS_SCHEMA = pa.schema(list(INSERT_COLUMNS.items()))
NO_TOKENIZER_NOTE = (
    "no Hugging Face tokenizer was written: the checkpoint holds none and the run's tokenizer ({name}) has no "
    "Hugging Face equivalent; load the model with multirun's tokenizer of the run's config"
)


@dataclass
class RunContents:
    """A run directory read back: its config, tokenizer, prepared experiments and ledger.

    The experiments are prepared again from ``resolved_config.yaml`` exactly as the run
    prepared them (same payloads, seed and geometry); each one's fingerprint is checked
    against ``manifest.json``, so a payload changed since the run is an error, not a
    silently different text.
    """

    run_dir: Path
    loaded: LoadedConfig
    tokenizer: Tokenizer
    geometry: BatchGeometry
    experiments: list[PreparedExperiment]
    ledger: Ledger
    manifest: dict[str, Any]
    summary: dict[str, Any] | None
    _hashes: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def experiment(self, name: str) -> PreparedExperiment:
        for experiment in self.experiments:
            if experiment.name == name:
                return experiment
        raise InputError(
            f"the ledger names experiment {name!r}, which the run's config does not have "
            f"({', '.join(e.name for e in self.experiments) or 'none'})",
            file=RunDir(self.run_dir).resolved_config,
        )

    def sequence_hashes(self, name: str) -> np.ndarray:
        """:func:`multirun.ledger.token_hash` of each sequence of experiment ``name``."""
        if name not in self._hashes:
            e = self.experiment(name)
            self._hashes[name] = np.array(
                [token_hash(e.sequence_tokens(s)) for s in range(e.seq_lengths.shape[0])], dtype=np.uint64
            )
        return self._hashes[name]

    def check_span_tokens(self, table: pa.Table) -> None:
        """Every span of ``table`` (ledger rows) must be one of its experiment's sequences, whole.

        Raises:
            InputError: a span's sequence does not exist, or its length or ``token_hash``
                differs from the sequence prepared now (the payload or tokenizer changed).
        """
        problems: list[str] = []
        for name in sorted(set(table.column("experiment").cast(pa.string()).to_pylist())):
            rows = table.filter(pc.equal(table.column("experiment").cast(pa.string()), name))
            experiment = self.experiment(name)
            sequence = rows.column("sequence").to_numpy()
            count = experiment.seq_lengths.shape[0]
            outside = (sequence < 0) | (sequence >= count)
            if outside.any():
                problems.append(f"{name}: sequence {int(sequence[outside][0])} does not exist ({count} sequences)")
                continue
            bad = (self.sequence_hashes(name)[sequence] != rows.column("token_hash").to_numpy()) | (
                experiment.seq_lengths[sequence] != rows.column("length").to_numpy()
            )
            if bad.any():
                first = rows.slice(int(np.flatnonzero(bad)[0]), 1).to_pylist()[0]
                problems.append(
                    f"{name}: {int(bad.sum())} span(s) differ from the payload's sequences, e.g. step "
                    f"{first['step']} row {first['global_row']} item {first['item']!r} sequence {first['sequence']}"
                )
        if problems:
            raise InputError(
                "the ledger's token hashes do not match the experiments prepared from the run's config (did a payload "
                "or the tokenizer change since the run?): " + "; ".join(problems),
                file=RunDir(self.run_dir).ledger,
            )


def open_run(run_dir: str | os.PathLike[str]) -> RunContents:
    """Read a run directory's config, manifest, ledger and prepared experiments.

    Raises:
        ConfigError: not a run directory (no ``resolved_config.yaml``), or its config is invalid.
        InputError: no ``manifest.json`` (the run never started training), no ledger, or an
            experiment whose payload changed since the run (its fingerprint differs).
    """
    from multirun.kinds.experiments import build_experiments
    from multirun.run.inputs import run_tokenizer

    root = Path(run_dir)
    files = RunDir(root)
    if not files.resolved_config.is_file():
        raise ConfigError("not a run directory (no resolved_config.yaml)", file=root)
    if not files.manifest.is_file():
        raise InputError("the run has no manifest.json: it never started training", file=files.manifest)
    manifest = json.loads(files.manifest.read_text(encoding="utf-8"))
    loaded = load_config(files.resolved_config)
    tokenizer = run_tokenizer(loaded)
    geometry = BatchGeometry(**manifest["geometry"])
    # An extended run prepared its experiments over its first duration (the static horizon).
    horizon = replace(geometry, num_steps=int(manifest.get("static_steps", geometry.num_steps)))
    experiments = build_experiments(loaded, tokenizer=tokenizer, geometry=horizon)
    recorded = {e["name"]: e["fingerprint"] for e in manifest["experiments"]}
    for experiment in experiments:
        if recorded.get(experiment.name) != experiment.fingerprint:
            raise InputError(
                f"experiment {experiment.name!r} prepared now has fingerprint {experiment.fingerprint}, the run's "
                f"manifest records {recorded.get(experiment.name)}: its payload or settings changed since the run",
                file=files.manifest,
            )
    summary = json.loads(files.summary.read_text(encoding="utf-8")) if files.summary.is_file() else None
    return RunContents(root, loaded, tokenizer, geometry, experiments, Ledger.open(root), manifest, summary)


def inserts_table(contents: RunContents, *, before_step: int | None = None) -> pa.Table:
    """One row per item of every experiment (:data:`INSERT_COLUMNS`), in config and payload order.

    Args:
        contents: the run (:func:`open_run`).
        before_step: count only spans of steps ``< before_step`` (a checkpoint's step); None: all.
    """
    table = contents.ledger.table
    if before_step is not None:
        table = _before(table, before_step)
    contents.check_span_tokens(table)
    counts = _item_counts(table)
    removals = Ledger.open_removals(contents.run_dir).table
    removed = _item_counts(removals if before_step is None else _before(removals, before_step))
    columns: dict[str, list[Any]] = {name: [] for name in INSERT_COLUMNS}
    decode = contents.tokenizer.decode
    for experiment in contents.experiments:
        sequences_of: dict[int, list[int]] = {}
        for s, item in enumerate(experiment.seq_items.tolist()):
            sequences_of.setdefault(int(item), []).append(s)
        for index, item_id in enumerate(experiment.item_ids):
            treated = bool(experiment.treated[index])
            mine = sequences_of.get(index, [])
            texts = [decode(experiment.sequence_tokens(s).tolist()) for s in mine]
            seen = counts.get((experiment.name, item_id))
            columns["experiment"].append(experiment.name)
            columns["kind"].append(experiment.kind)
            columns["item"].append(item_id)
            columns["arm"].append("treated" if treated else "control")
            columns["text"].append("\n\n".join(texts) if texts else None)
            columns["texts"].append(texts)
            columns["sequences"].append(len(mine))
            columns["token_count"].append(int(sum(int(experiment.seq_lengths[s]) for s in mine)))
            columns["exposures"].append(int(seen["step_count"]) if seen else 0)
            columns["tokens_trained"].append(int(seen["length_sum"]) if seen else 0)
            columns["first_step"].append(int(seen["step_min"]) if seen else None)
            columns["last_step"].append(int(seen["step_max"]) if seen else None)
            taken = removed.get((experiment.name, item_id))
            columns["removals"].append(int(taken["step_count"]) if taken else 0)
            columns["tokens_removed"].append(int(taken["length_sum"]) if taken else 0)
    return pa.table(columns, schema=INSERTS_SCHEMA)


def _before(table: pa.Table, step: int) -> pa.Table:
    return table.filter(pc.less(table.column("step"), pa.scalar(step, pa.int64())))


def _item_counts(table: pa.Table) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (experiment, item) of a ledger table: its rows, first and last step, tokens."""
    plain = pa.table(
        {
            "experiment": table.column("experiment").cast(pa.string()),
            "item": table.column("item").cast(pa.string()),
            "step": table.column("step"),
            "length": table.column("length").cast(pa.int64()),
        }
    )
    grouped = plain.group_by(["experiment", "item"]).aggregate(
        [("step", "count"), ("step", "min"), ("step", "max"), ("length", "sum")]
    )
    return {(r["experiment"], r["item"]): r for r in grouped.to_pylist()}  # one entry per item seen: small


@dataclass
class ExportResult:
    """What :func:`export_run` wrote."""

    out_dir: Path
    model_dir: Path
    checkpoint: Path
    step: int | None
    tokenizer_source: str | None
    inserts: pa.Table
    manifest: dict[str, Any]

    @property
    def tokenizer_written(self) -> bool:
        return self.tokenizer_source is not None


def export_run(
    run_dir: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
) -> ExportResult:
    """Export a run's model, tokenizer and inserted data (see the module docstring).

    Args:
        run_dir: the run directory.
        checkpoint: a Composer checkpoint file or a ``save_pretrained`` folder; default the
            run's latest checkpoint (``checkpoints/latest-rank0.pt``, resolved).
        out: the output folder (default ``RUN_DIR/export``); an earlier export there is
            replaced, any other non-empty folder is refused.

    Raises:
        ResumeError: no checkpoint, or one that is not a Hugging Face model's.
        InputError: see :func:`open_run`; an output folder that holds something else.
    """
    from multirun.run.weights import load_weights

    root = Path(run_dir)
    files = RunDir(root)
    contents = open_run(root)
    source = _checkpoint_path(files, checkpoint)
    out_dir = Path(out) if out is not None else root / "export"
    _prepare_out(out_dir)

    weights = load_weights(source)
    model_dir = out_dir / "model"
    weights.model.save_pretrained(model_dir)
    tokenizer_source = save_tokenizer(weights.tokenizer, contents.tokenizer, model_dir)

    inserts = inserts_table(contents, before_step=weights.step)
    with atomic_path(out_dir / "inserts.parquet") as tmp:
        pq.write_table(inserts, tmp, compression="zstd")
    with atomic_path(out_dir / "inserts.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in inserts.to_pylist())

    treated = pc.equal(inserts.column("arm"), "treated")
    manifest: dict[str, Any] = {
        "run_name": contents.loaded.config.run_name,
        "run_dir": str(root.resolve()),
        "checkpoint": str(weights.source),
        "step": weights.step,
        "finished_run": contents.summary is not None,
        "plan_fingerprint": contents.manifest.get("plan_fingerprint"),
        "spans_counted": "steps < step (those the exported weights trained on)" if weights.step is not None else "all",
        "model": {"dir": "model", "class": type(weights.model).__name__},
        "tokenizer": {
            "written": tokenizer_source is not None,
            "source": tokenizer_source,
            "run_tokenizer": contents.tokenizer.name,
            "note": None if tokenizer_source else NO_TOKENIZER_NOTE.format(name=contents.tokenizer.name),
        },
        "inserts": {
            "rows": inserts.num_rows,
            "treated_items": int(pc.sum(treated).as_py() or 0),
            "exposures": int(pc.sum(inserts.column("exposures")).as_py() or 0),
            "columns": list(INSERT_COLUMNS),
        },
        "files": sorted(
            {str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()} | {"export_manifest.json"}
        ),
    }
    write_json_atomic(out_dir / "export_manifest.json", manifest)
    return ExportResult(out_dir, model_dir, weights.source, weights.step, tokenizer_source, inserts, manifest)


def _checkpoint_path(files: RunDir, explicit: str | os.PathLike[str] | None) -> Path:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise ResumeError("no such checkpoint file or Hugging Face model folder", file=path)
        return path.resolve() if path.is_file() else path  # latest-rank0.pt links to the file naming the step
    latest = files.latest_checkpoint
    if not latest.exists():
        raise ResumeError(
            "the run has no checkpoint to export (no checkpoints/latest-rank0.pt); pass --checkpoint", file=files.root
        )
    return latest.resolve()


def _prepare_out(out_dir: Path) -> None:
    """Refuse a non-empty folder that is not an earlier export; empty an earlier export's model folder."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "export_manifest.json").is_file():
            raise InputError(
                "the output folder is not empty and holds no earlier export; choose another --out", file=out_dir
            )
        # An earlier export: its model folder goes whole, so no stale tokenizer or weight file stays.
        shutil.rmtree(out_dir / "model", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def save_tokenizer(saved: Any | None, run_tokenizer: Tokenizer, model_dir: Path) -> str | None:
    """Save the checkpoint's tokenizer, else the run's Hugging Face tokenizer; return which, or None."""
    if saved is not None:
        saved.save_pretrained(model_dir)
        return "checkpoint"
    # Any multirun tokenizer with a Hugging Face equivalent exposes it as ``hf_tokenizer``.
    hf = getattr(run_tokenizer, "hf_tokenizer", None)
    if hf is not None:
        hf.save_pretrained(model_dir)
        return f"run config ({run_tokenizer.name})"
    return None
