"""A run rebuilt from its run directory, as its training built it: for work after (or beside) training.

``multirun interact`` and ``multirun evaluate`` start from a run directory, not a config:
:func:`reload_run` reads its ``resolved_config.yaml`` (``multirun train`` and the
llm-foundry callback both write it) and its tokenizer, and :meth:`ReloadedRun.parts`
assembles the parts through :func:`multirun.run.parts.assemble_parts` with the run's
held-out rows, the one wiring every caller shares. :func:`recorded_geometry` is the
geometry the run's plan was built for, from its ``manifest.json``.

:func:`evaluate_checkpoint` (``multirun evaluate``) scores saved weights with the run's
rebuilt monitors (:mod:`multirun.measure.evaluate`) and writes ``evaluations/<name>/``.

Example::

    run = reload_run("runs/demo")
    parts = run.parts(recorded_geometry(run.run_dir), run_dir="runs/demo/evaluations/x", controlled=False)
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multirun import __version__
from multirun.config import LoadedConfig, load_config
from multirun.data.tokenizers import Tokenizer
from multirun.errors import ConfigError, InputError, ResumeError
from multirun.kinds.experiments import arms_record
from multirun.measure.evaluate import (
    check_name,
    check_vocabulary,
    evaluation_name,
    evaluation_summary,
    score_weights,
    weights_fingerprint,
    write_evaluation,
)
from multirun.measure.records import EvaluationRecord
from multirun.plan.run_plan import RunPlan
from multirun.run.continuation import Continuation, recorded_continuation
from multirun.run.inputs import heldout_rows, run_tokenizer
from multirun.run.parts import RunParts, assemble_parts
from multirun.run.weights import load_weights
from multirun.run_dir import RunDir, plain
from multirun.types import BatchGeometry


@dataclass
class ReloadedRun:
    """A run directory's validated config and tokenizer.

    Attributes:
        run_dir: the run directory.
        loaded: its ``resolved_config.yaml``, loaded and validated (with any overrides).
        tokenizer: the run's tokenizer.
    """

    run_dir: Path
    loaded: LoadedConfig
    tokenizer: Tokenizer

    @property
    def trained_by_llmfoundry(self) -> bool:
        """Whether llm-foundry trained the run (its training config is kept as ``llmfoundry.yaml``)."""
        return RunDir(self.run_dir).llmfoundry_config.is_file()

    def heldout(self, sequence_length: int) -> np.ndarray | None:
        """The held-out rows the run's held-out loss is computed on (None: the run has none)."""
        return heldout_rows(self.loaded, self.tokenizer, sequence_length)

    def parts(
        self,
        geometry: BatchGeometry,
        *,
        run_dir: str | Path,
        plan: RunPlan | None = None,
        controlled: bool = False,
        continuation: Continuation | None = None,
    ) -> RunParts:
        """The run's parts for ``geometry``, writing to ``run_dir``, with the run's held-out rows.

        ``plan``: another plan (the interaction arms'); default the config's, as trained.
        ``controlled``: build the controllers too (work after training runs without them).
        ``continuation``: an extended run's static horizon (:func:`recorded_continuation`).
        """
        return assemble_parts(
            self.loaded,
            tokenizer=self.tokenizer,
            geometry=geometry,
            run_dir=run_dir,
            plan=plan,
            controlled=controlled,
            heldout=self.heldout(geometry.sequence_length),
            continuation=continuation,
        )


def reload_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> ReloadedRun:
    """Load a run directory's ``resolved_config.yaml`` (with ``key=value`` overrides) and its tokenizer.

    Raises:
        ConfigError: ``run_dir`` is not a run directory (no ``resolved_config.yaml``), or
            the config or an override is invalid (naming the file and key).
    """
    run_dir = Path(run_dir)
    config_path = RunDir(run_dir).resolved_config
    if not config_path.is_file():
        raise ConfigError("not a run directory (no resolved_config.yaml)", file=run_dir)
    loaded = load_config(config_path, list(overrides))
    return ReloadedRun(run_dir, loaded, run_tokenizer(loaded))


def recorded_geometry(run_dir: str | Path) -> BatchGeometry:
    """The global batch, sequence length and steps the run's plan was built for (``manifest.json``).

    Raises:
        ResumeError: the run has no readable ``manifest.json`` (it never reached ``FIT_START``).
    """
    manifest = RunDir(run_dir).manifest
    if not manifest.is_file():
        raise ResumeError("the run has no manifest.json (did it reach FIT_START?)", file=manifest)
    try:
        geometry = json.loads(manifest.read_text())["geometry"]
        return BatchGeometry(
            int(geometry["global_batch_size"]), int(geometry["sequence_length"]), int(geometry["num_steps"])
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ResumeError(f"no readable geometry in the manifest ({exc!r})", file=manifest) from None


@dataclass
class EvaluationResult:
    """What :func:`evaluate_checkpoint` scored and wrote.

    Attributes:
        folder: ``RUN_DIR/evaluations/<name>``.
        records: the evaluation's records (held-out loss first, then per experiment).
        summary: ``summary.json``'s content.
    """

    folder: Path
    records: list[EvaluationRecord]
    summary: dict[str, Any]


def evaluate_checkpoint(
    run_dir: str | Path,
    checkpoint: str | Path,
    *,
    name: str | None = None,
    step: int | None = None,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Score every experiment's monitor, the held-out loss and the statistics on saved weights.

    The run's parts are rebuilt from its directory (:func:`reload_run`, the geometry of its
    ``manifest.json``) and must fingerprint as the trained plan did; the weights are read by
    :func:`multirun.run.weights.load_weights` (a Composer checkpoint of a Hugging Face
    model, or a ``save_pretrained`` folder) and scored by
    :func:`multirun.measure.evaluate.score_weights`. Nothing of the run is modified.

    Args:
        run_dir: the run directory.
        checkpoint: a Composer checkpoint file or a Hugging Face model folder.
        name: the folder under ``evaluations/`` (default: the checkpoint's stem or folder name).
        step: the weights' training step, for a folder that does not record it (a
            checkpoint's own step wins; a different one is an error).
        device: ``cpu`` or ``gpu`` (default: the run's ``train.device``; ``auto`` picks a GPU if
            there is one).
        progress: called with a line per stage.

    Raises:
        ConfigError: ``run_dir`` is not a run directory.
        ResumeError: the checkpoint is missing or unreadable, or the run rebuilds another plan.
        InputError: the weights do not fit the run's tokenizer, or a bad name or step.
    """
    started = time.perf_counter()
    say = progress or (lambda _line: None)
    run_dir = Path(run_dir)
    run = reload_run(run_dir)
    source = Path(checkpoint).expanduser()
    name = check_name(name if name is not None else evaluation_name(source))
    geometry = recorded_geometry(run_dir)
    device, precision = _device_and_precision(run, device)

    say(f"loading weights from {source}")
    weights = load_weights(source)
    if weights.step is not None and step is not None and step != weights.step:
        raise InputError(f"--step {step}, but the checkpoint was written at step {weights.step}", file=source)
    step = weights.step if weights.step is not None else step
    if step is not None and step < 0:
        raise InputError(f"a step counts completed batches, got {step}", key="--step")
    check_vocabulary(weights.model, run.tokenizer, saved_tokenizer=weights.tokenizer, source=weights.source)
    fingerprint = weights_fingerprint(weights.model)

    folder = RunDir(run_dir).evaluations / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The runner appends its records to <its run dir>/metrics.jsonl as in training: here a
    # scratch folder; the evaluation's own files are written whole afterwards.
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=folder.parent) as scratch:
        say(f"rebuilding the run's monitors ({geometry.num_steps} steps x {geometry.global_batch_size} rows)")
        parts = run.parts(geometry, run_dir=scratch, controlled=False, continuation=recorded_continuation(run_dir))
        plan_fingerprint = _check_plan(run_dir, parts.plan)
        if not parts.monitors.entries and parts.monitors.heldout is None:
            raise ConfigError(
                "no experiment has an enabled monitor and there is no held-out loss: nothing to evaluate",
                file=run.loaded.source,
                key="experiments",
            )
        say(f"scoring {len(parts.monitors.entries)} experiment(s) on {device} ({precision})")
        records = score_weights(parts.monitors, weights.model, step=step, device=device, precision=precision)
    summary = evaluation_summary(
        records,
        name=name,
        run_dir=str(run_dir.resolve()),
        source=str(weights.source.resolve()),
        source_kind="huggingface_folder" if weights.source.is_dir() else "composer_checkpoint",
        step=step,
        weights_fingerprint=fingerprint,
        plan_fingerprint=plan_fingerprint,
        device=device,
        precision=precision,
        alpha=run.loaded.config.monitoring.alpha,
        seconds=round(time.perf_counter() - started, 3),
        multirun_version=__version__,
    )
    write_evaluation(folder, records, summary)
    return EvaluationResult(folder, records, summary)


def _device_and_precision(run: ReloadedRun, device: str | None) -> tuple[str, str]:
    """The device and Composer precision the run trained with (llm-foundry: its config's precision)."""
    import torch

    precision: str = run.loaded.config.train.precision
    if run.trained_by_llmfoundry:
        import yaml

        logged = yaml.safe_load(RunDir(run.run_dir).llmfoundry_config.read_text()) or {}
        precision = str(logged.get("precision") or "amp_bf16")  # llm-foundry's default
    wanted = device or run.loaded.config.train.device
    if wanted == "auto":
        wanted = "gpu" if torch.cuda.is_available() else "cpu"
    if wanted not in ("cpu", "gpu"):
        raise InputError(f"device must be cpu, gpu or auto, got {wanted!r}", key="--device")
    if wanted == "gpu" and not torch.cuda.is_available():
        raise InputError("no GPU is available; pass --device cpu", key="--device")
    return wanted, precision


def _check_plan(run_dir: Path, plan: RunPlan) -> str:
    """The rebuilt experiments must be the trained ones, else the probes or the split may
    differ: the manifest's entries (payload content fingerprints, kinds, items, sequences,
    planned spans) and ``arms.json`` (treated and control items). Returns the trained plan's
    fingerprint. Fingerprints of the config are not compared: they cover the config as
    written, and ``resolved_config.yaml`` spells relative paths absolute."""
    files = RunDir(run_dir)
    manifest = json.loads(files.manifest.read_text())

    def entries(experiments: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {str(e.get("name")): {k: v for k, v in e.items() if k != "fingerprint"} for e in experiments}

    trained = entries(manifest.get("experiments", []))
    rebuilt = entries(json.loads(json.dumps(plan.manifest()["experiments"], default=plain)))
    if trained != rebuilt:
        changed = sorted(n for n in set(trained) | set(rebuilt) if trained.get(n) != rebuilt.get(n))
        raise ResumeError(
            f"the run's config and payloads now prepare other experiments than it trained ({', '.join(changed)}): "
            "a payload or an input changed since, so the probes may differ",
            file=files.manifest,
        )
    if files.arms.is_file() and json.loads(files.arms.read_text()) != json.loads(
        json.dumps(arms_record(plan.experiments), default=plain)
    ):
        raise ResumeError(
            "the run's config now splits treated and control items otherwise than it trained", file=files.arms
        )
    return str(manifest.get("plan_fingerprint"))
