"""Experiment assembly: config entries -> payload packages -> prepared experiments.

Example::

    loaded = load_config(None)
    geo = BatchGeometry(global_batch_size=16, sequence_length=128, num_steps=300)
    exps = build_experiments(loaded, tokenizer=ByteTokenizer(), geometry=geo)
    arms_record(exps)["canaries"]["control"][:2]   # ['canary-003', 'canary-007']
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from multirun.config import ExperimentConfig, LoadedConfig, resolve_placement
from multirun.errors import ConfigError, InputError, PayloadError
from multirun.kinds.payloads import PayloadPackage, leaving_out_lines, load_package, resolve_payload_ref
from multirun.kinds.registry import injectors
from multirun.kinds.rows import batch_assignment, fit_experiment_to_rows
from multirun.kinds.sdk import PrepareContext, RunSources
from multirun.types import BatchGeometry, Placement, PreparedExperiment

if TYPE_CHECKING:
    from multirun.data.tokenizers import Tokenizer

__all__ = ["PayloadCheck", "arms_record", "build_experiments", "check_payload", "run_sources"]


def build_experiments(
    loaded: LoadedConfig, *, tokenizer: Tokenizer, geometry: BatchGeometry
) -> list[PreparedExperiment]:
    """Load each experiment's payload, pick its injector and prepare its sequences.

    Raises:
        ConfigError: duplicate names, a payload ref that resolves to nothing,
            an unknown or mismatched injector kind, a bad placement or bad
            injector options; each names the config file and ``experiments[i]...``.
        PayloadError: a malformed payload package (names payload.yaml or file:line).
    """
    config = loaded.config
    source = loaded.source
    seen: dict[str, int] = {}
    for i, spec in enumerate(config.experiments):
        # load_config checks this too; a config built in code has not been through it.
        if spec.name in seen:
            raise ConfigError(
                f"duplicate experiment name {spec.name!r} (also experiments[{seen[spec.name]}].name)",
                file=source,
                key=f"experiments[{i}].name",
            )
        seen[spec.name] = i

    out: list[PreparedExperiment] = []
    for i in range(len(config.experiments)):
        try:
            out.append(_build_one(loaded, i, tokenizer=tokenizer, geometry=geometry))
        except ConfigError as e:
            if source is None or e.file != str(source) or e.line is not None or not e.key:
                raise
            # Errors about the config file get the line of their key, as load_config's do.
            raise ConfigError(e.message, file=source, key=e.key, line=loaded.line_of(e.key)) from None
    return out


def _build_one(loaded: LoadedConfig, i: int, *, tokenizer: Tokenizer, geometry: BatchGeometry) -> PreparedExperiment:
    config, source, spec = loaded.config, loaded.source, loaded.config.experiments[i]
    where = f"experiments[{i}]"
    try:
        root = resolve_payload_ref(spec.payload, base_dir=loaded.base_dir)
    except PayloadError as e:
        raise ConfigError(e.message, file=source, key=f"{where}.payload") from None
    payload = load_package(root)
    if spec.kind is not None:
        injectors.get(spec.kind, file=source, key=f"{where}.kind")  # unknown kind: list the known ones
        if spec.kind != payload.kind:
            raise ConfigError(
                f"kind {spec.kind!r} does not match the payload's kind {payload.kind!r} ({payload.root / 'payload.yaml'})",
                file=source,
                key=f"{where}.kind",
            )
    kind = payload.kind
    injector_cls = injectors.get(kind, file=payload.root / "payload.yaml", key="kind")
    placement = resolve_placement(spec.placement, geometry, key=f"{where}.placement", file=source)
    injector = injector_cls()
    try:
        prepared = injector.prepare(
            PrepareContext(
                payload=payload,
                spec=spec,
                tokenizer=tokenizer,
                sequence_length=geometry.sequence_length,
                seed=config.seed,
                placement=placement,
                geometry=geometry,
                max_modified_fraction=config.injection.max_modified_fraction,
                sources=run_sources(loaded, tokenizer),
            )
        )
    except ConfigError as e:
        if e.file is not None:
            raise
        # The injector knows the spec, not where it was written: add the file and entry.
        raise ConfigError(e.message, file=source, key=f"{where}.{e.key}" if e.key else where) from None
    if prepared.name != spec.name or prepared.kind != kind:
        raise RuntimeError(
            f"injector {kind!r} returned experiment {prepared.name!r}/{prepared.kind!r} for {spec.name!r}"
        )
    if placement.whole is not None:
        prepared = _whole_rows(prepared, geometry, file=source, key=f"{where}.placement")
    return prepared


def _whole_rows(
    experiment: PreparedExperiment, geometry: BatchGeometry, *, file: str | Path | None, key: str
) -> PreparedExperiment:
    """A ``whole: row|batch`` experiment with its sequences fitted to rows; for whole batches
    the assignment checked and each item's first step recorded (``metadata["batch_of_item"]``)."""
    fitted = fit_experiment_to_rows(experiment, geometry.sequence_length)
    if experiment.placement.whole == "batch":
        try:
            assignment = batch_assignment(
                experiment.seq_repetitions, experiment.placement.steps, geometry.global_batch_size
            )
        except ValueError as e:
            raise ConfigError(str(e), file=file, key=f"{key}.steps") from None
        first = assignment.first_step_of_items(np.asarray(experiment.seq_items))
        fitted.metadata = {
            **fitted.metadata,
            "batch_of_item": {experiment.item_ids[i]: s for i, s in sorted(first.items())},
        }
    return fitted


def run_sources(loaded: LoadedConfig, tokenizer: Tokenizer) -> RunSources:
    """The run's datasets for kinds that read them (:class:`~multirun.kinds.sdk.RunSources`).

    Resolved as :mod:`multirun.run.inputs` resolves them for training (paths relative to
    the config file), each only when asked for.
    """
    data, source = loaded.config.data, loaded.source

    def resolve(path: str) -> Path:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else loaded.base_dir / candidate

    def train() -> Path:
        from multirun.data.mds import build_demo_dataset, read_dataset_info  # torch and Streaming: when asked

        if data.source == "demo":
            return build_demo_dataset(
                tokenizer, data.sequence_length, max_bytes=data.demo_max_bytes, progress=False
            ).path
        if data.path is None:
            raise ConfigError("a path is required here", file=source, key="data.path")
        return read_dataset_info(resolve(data.path)).path

    def heldout() -> Path:
        from multirun.data.mds import build_demo_heldout_dataset, read_dataset_info

        if data.heldout_path is not None:
            return resolve(data.heldout_path)
        if data.source == "demo":
            # The demo's held-out text (the stdlib files it never trains on), the held-out loss's rows first.
            try:
                return build_demo_heldout_dataset(tokenizer, data.sequence_length, train_max_bytes=data.demo_max_bytes)
            except InputError as err:
                raise ConfigError(err.message, file=source, key="data.demo_max_bytes") from err
        split = read_dataset_info(resolve(data.path)).heldout_path if data.source == "mds" and data.path else None
        if split is None:
            raise ConfigError(
                "no held-out split to replay from: set data.heldout_path to an MDS dataset never trained on, or "
                "prepare the dataset with `multirun prepare --heldout-fraction`",
                file=source,
                key="data.heldout_path",
                line=loaded.line_of("data.heldout_path") if loaded.lines else None,
            )
        return split

    def train_steps(steps: Sequence[int]) -> dict[int, list[int]]:
        from multirun.data.mds import count_rows
        from multirun.data.order import read_training_steps

        path = train()
        batch = loaded.config.train.global_batch_size
        # The first epoch only: its steps start at sample step * batch at any world size (with
        # num_canonical_nodes pinned, as the config does); later epochs' starts depend on the world size.
        per_epoch = count_rows(path) // batch
        beyond = [s for s in steps if not 0 <= s < per_epoch]
        if beyond:
            raise ConfigError(
                f"steps {beyond[:5]} are outside the first epoch (steps 0..{per_epoch - 1} of "
                f"{batch} rows): name samples instead",
                key="step",
            )
        out: dict[int, list[int]] = {}
        wanted = sorted(set(steps))
        while wanted:  # one read per run of consecutive steps
            run = 1
            while run < len(wanted) and wanted[run] == wanted[0] + run:
                run += 1
            _, ids = read_training_steps(
                path, data, global_batch_size=batch, epoch=0, first_step_in_epoch=wanted[0], steps=run
            )
            out.update({wanted[0] + k: [int(i) for i in ids[k]] for k in range(run)})
            wanted = wanted[run:]
        return out

    return RunSources(
        train=train,
        heldout=heldout,
        heldout_loss_rows=loaded.config.monitoring.heldout_rows,
        train_steps=train_steps,
    )


def arms_record(experiments: Sequence[PreparedExperiment]) -> dict[str, dict[str, list[Any]]]:
    """``{name: {"treated": [ids], "control": [ids]}}`` in payload order, for ``arms.json``."""
    record: dict[str, dict[str, list[Any]]] = {}
    for e in experiments:
        treated = np.asarray(e.treated, dtype=bool)
        record[e.name] = {
            "treated": [i for i, t in zip(e.item_ids, treated) if t],
            "control": [i for i, t in zip(e.item_ids, treated) if not t],
        }
    return record


# --------------------------------------------------------------------------- payload check


@dataclass
class PayloadCheck:
    """What :func:`check_payload` found: every problem, or the prepared experiment.

    Attributes:
        package: the loaded package (None when ``payload.yaml`` itself is broken).
        problems: each problem as its error (file, line, key, message), in the order found.
        experiment: the experiment the kind's injector prepared (None with problems).
        truncated: the search stopped at ``max_problems``.
    """

    package: PayloadPackage | None
    problems: list[InputError] = field(default_factory=list)
    experiment: PreparedExperiment | None = None
    truncated: bool = False


def check_payload(
    root: str | Path,
    *,
    tokenizer: Tokenizer,
    sequence_length: int,
    seed: int = 0,
    spec: ExperimentConfig | None = None,
    options: Mapping[str, Any] | None = None,
    max_problems: int = 200,
    geometry: BatchGeometry | None = None,
    max_modified_fraction: float = 1.0,
) -> PayloadCheck:
    """Run a payload package through its kind's full validation and collect every problem.

    The validation is the one ``multirun check`` runs for an experiment of this payload
    (hashes, the injector's ``prepare``, and the kind's own monitor built from the
    result), at ``sequence_length`` with ``tokenizer``, as the experiment ``spec`` of a
    run config (its options, ``wrap_eos`` and monitor options; default: an experiment
    with default settings), with ``options`` added to its options. Injectors raise at their first problem by design (a run must not
    start on a bad payload), so the check goes on past each problem that names a line of
    one of the package's files by reading that line as blank and validating again: one
    problem per line, every line, messages unchanged. A problem without a line (a missing
    file, an option, "no items") ends the search. With ``geometry`` (and the run's
    ``max_modified_fraction``), doses are checked against what the whole run can hold
    (:meth:`~multirun.kinds.sdk.PrepareContext.check_doses`); without, they are not.

    Raises nothing for bad input: problems are returned.
    """
    root = Path(root)
    try:
        package = load_package(root)
    except InputError as e:
        return PayloadCheck(package=None, problems=[e])
    result = PayloadCheck(package=package)
    if spec is None:
        spec = ExperimentConfig(name=re.sub(r"[^A-Za-z0-9._-]+", "-", package.name) or "payload", payload="")
    spec = spec.model_copy(update={"payload": str(package.root), "options": {**spec.options, **(options or {})}})
    injector_cls = None
    left_out: dict[Path, set[int]] = {}
    while True:
        try:
            injector_cls = injector_cls or injectors.get(package.kind, file=package.root / "payload.yaml", key="kind")
            ctx = PrepareContext(
                payload=package,
                spec=spec,
                tokenizer=tokenizer,
                sequence_length=sequence_length,
                seed=seed,
                placement=Placement("uniform", 0, geometry.num_steps if geometry is not None else 1),
                geometry=geometry,
                max_modified_fraction=max_modified_fraction,
            )
            with leaving_out_lines({p: frozenset(v) for p, v in left_out.items()}):
                prepared = injector_cls().prepare(ctx)
                ctx.check_monitor(prepared)
        except InputError as e:
            result.problems.append(e)
            where = Path(e.file).resolve() if e.file is not None else None
            if (
                e.line is None
                or where is None
                or not where.is_relative_to(package.root)
                or e.line in left_out.get(where, ())
            ):
                break
            if len(result.problems) >= max_problems:
                result.truncated = True
                break
            left_out.setdefault(where, set()).add(e.line)
            continue
        if not result.problems:
            result.experiment = prepared
        break
    return result
