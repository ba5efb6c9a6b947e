"""The run config: one YAML file describing the training run and its experiments.

Loading goes: YAML (with line numbers) -> ``${VAR}`` substitution -> ``a.b=value``
overrides -> pydantic validation -> cross-field checks. Every problem becomes a
:class:`~multirun.errors.ConfigError` that names the file, the dotted key
(``experiments[1].placement.start``) and, where known, the line.

Paths: ``run_dir`` is relative to the current directory; payload refs,
``data.path`` and ``tokenizer.path`` are relative to the config file's directory
(:attr:`LoadedConfig.base_dir`).

Example:
    >>> loaded = load_config(None, ["train.max_duration=20ba"])   # the bundled demo
    >>> loaded.config.train.max_duration
    '20ba'
"""

from __future__ import annotations

import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import xxhash
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from multirun.errors import ConfigError
from multirun.run_dir import RunDir, write_text_atomic
from multirun.types import BatchGeometry, Placement
from multirun.yaml_load import load_yaml

__all__ = [
    "MAX_RESAMPLES",
    "MAX_SEED",
    "MAX_STEPS",
    "ClippingConfig",
    "ConfigWarning",
    "DataConfig",
    "ExperimentConfig",
    "InjectionConfig",
    "LoadedConfig",
    "LoggersConfig",
    "ModelConfig",
    "PlacementConfig",
    "RunConfig",
    "SchedulerConfig",
    "TokenizerConfig",
    "TrainConfig",
    "load_config",
    "parse_duration_steps",
    "placement_problems",
    "resolve_placement",
    "without_row_defaults",
]

NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
# Composer time strings we accept. max_duration is limited to units we can turn
# into a step count before training (the planner needs it); intervals may also use
# Composer's other units.
_TIME_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ba|tok|ep|sp|dur)\s*$")
_DURATION_UNITS = ("ba", "tok", "ep")


# The planner keeps a few arrays with one entry per step; a run (and an interaction arm)
# has at most this many steps, so a typo such as 10**14ba is an error, not a 700 TiB array.
MAX_STEPS = 2_000_000
# Composer seeds rank r with seed + r and refuses seeds beyond 2**32 - 1; numpy's
# generators refuse negative ones. 2**31 - 1 leaves room for any world size.
MAX_SEED = 2**31 - 1
# Resamples of a permutation test or bootstrap: 10**6 gives p-values down to 1e-6;
# more only cost memory (resamples x items) at every evaluation.
MAX_RESAMPLES = 1_000_000


class ConfigWarning(UserWarning):
    """A config that runs but probably not as meant (``multirun check`` prints these)."""


def _time_string(value: str, *, units: Sequence[str], integral: bool = True, positive: bool = False) -> str:
    m = _TIME_RE.match(value)
    if m is None or m.group(2) not in units:
        raise ValueError(f"expected a Composer time string <number><unit> with unit in {'|'.join(units)}, e.g. 200ba")
    number, unit = m.groups()
    if unit != "dur" and integral and "." in number:
        raise ValueError(f"{unit} counts must be whole numbers")
    if positive and float(number) <= 0:
        # Composer's interval scheduler never fires on 0, not even at the end of training.
        raise ValueError(f"must be at least 1{unit}")
    return f"{number}{unit}"


def _cadence(value: str | None) -> str | None:
    """A monitoring cadence: whole steps, at least one."""
    if value is None:
        return None
    value = _time_string(value, units=("ba",))
    if int(value[:-2]) < 1:
        raise ValueError("a cadence must be at least 1ba")
    return value


def cadence_steps(value: str | None) -> int | None:
    """Steps of a validated cadence string (``"50ba"`` -> 50; None stays None)."""
    return None if value is None else int(value[:-2])


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    # coerce_numbers_to_str: `run_name: 2024` or `version: 1` are fine as strings.
    # allow_inf_nan=False: every float field is finite (`.nan`, `.inf` are YAML floats).
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_default=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """The model: a tiny GPT-2 from a few sizes (the demo's), or any Hugging Face causal LM.

    ``kind: gpt2`` builds a ``transformers.GPT2Config`` from ``n_layer``, ``n_head`` and
    ``n_embd`` (defaults 2, 2, 64), with the tokenizer's vocabulary and EOS and the
    sequence length as positions. ``kind: hf`` builds ``AutoModelForCausalLM`` from
    ``config`` (a ``config.json`` file or a folder holding one, relative to the config
    file; or the fields inline with their ``model_type``) with random weights, or loads
    ``from_pretrained`` (a local ``save_pretrained`` folder). ``config_overrides`` are
    set on either config. Unset vocabulary size and EOS, BOS and PAD ids of a built
    config come from the tokenizer; set ones are checked against it and the sequence
    length (see :mod:`multirun.run.model`).

    ``init_from``: continual pretraining. The model is built as above, then takes the
    weights of a Composer checkpoint of another run or a ``save_pretrained`` folder; the
    run itself is new (its own plan and run directory, a fresh optimizer, step 0).
    ``init_fingerprint``: written by ``multirun train`` into ``resolved_config.yaml``
    (a cheap xxh64 of the weight source, ``init_from`` or ``from_pretrained``); set it
    to refuse a source that has changed since.
    """

    kind: Literal["gpt2", "hf"] = "gpt2"
    n_layer: int | None = Field(None, gt=0)
    n_head: int | None = Field(None, gt=0)
    n_embd: int | None = Field(None, gt=0)
    config: str | dict[str, Any] | None = None
    from_pretrained: str | None = None
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None
    init_fingerprint: str | None = None

    @model_validator(mode="after")
    def _gpt2_sizes(self) -> ModelConfig:
        # Filled in here so that resolved_config.yaml shows the sizes trained; the
        # keys that do not fit the kind are reported by model_problems.
        if self.kind == "gpt2":
            for key, default in (("n_layer", 2), ("n_head", 2), ("n_embd", 64)):
                if getattr(self, key) is None:
                    setattr(self, key, default)
        return self

    @property
    def weights_source(self) -> tuple[str, str] | None:
        """``(key, path)`` of where the initial weights come from, or None for random ones."""
        if self.init_from is not None:
            return "init_from", self.init_from
        if self.from_pretrained is not None:
            return "from_pretrained", self.from_pretrained
        return None


class TokenizerConfig(_Strict):
    """``{kind: bytes}`` or ``{kind: huggingface, path: /local/dir}`` (path relative to the config file)."""

    kind: Literal["bytes", "huggingface"] = "bytes"
    path: str | None = None


class DataConfig(_Strict):
    """Training data. ``path`` (source=mds) is relative to the config file's directory.

    ``heldout_path``: an MDS dataset never trained on, for the held-out loss (multirun's or
    llm-foundry's pretokenized MDS; relative to the config file). Unset with
    ``source: mds``, the held-out split that ``multirun prepare --heldout-fraction`` wrote
    into the dataset (``PATH/heldout``, recorded in its ``multirun_dataset.json``) is used,
    when there is one; an explicit ``heldout_path`` always wins.
    """

    source: Literal["demo", "mds"] = "demo"
    path: str | None = None
    heldout_path: str | None = None  # default (source=mds): the dataset's own held-out split, if prepared
    sequence_length: int = Field(128, gt=0)
    demo_max_bytes: int = Field(4_000_000, gt=0)
    shuffle: bool = True
    shuffle_seed: int = Field(9176, ge=0, le=MAX_SEED)
    num_canonical_nodes: int = Field(1, gt=0)
    num_workers: int = Field(0, ge=0)


class SchedulerConfig(_Strict):
    """The learning-rate schedule, one of Composer's warmup schedulers.

    ``linear`` (the default: warmup, then linear decay to ``alpha_f`` x the peak at the
    end), ``cosine`` (warmup, then cosine decay to ``alpha_f`` x the peak) or
    ``constant`` (warmup, then the peak). ``warmup`` defaults to ``train.warmup``.
    """

    name: Literal["constant", "linear", "cosine"] = "linear"
    warmup: str | None = None
    alpha_f: float = Field(0.1, ge=0)

    @field_validator("warmup")
    @classmethod
    def _warmup(cls, v: str | None) -> str | None:
        return None if v is None else _time_string(v, units=("ba", "tok", "ep", "dur"))


class ClippingConfig(_Strict):
    """Gradient clipping by Composer's ``GradientClipping`` algorithm.

    ``type``: ``norm`` (the global gradient norm at most ``threshold``), ``value``
    (each gradient entry in ``[-threshold, threshold]``) or ``adaptive`` (AGC, with
    ``threshold`` the largest gradient-to-weight norm ratio).
    """

    type: Literal["norm", "value", "adaptive"] = "norm"
    threshold: float = Field(gt=0)


class FileLoggerConfig(_Strict):
    """Composer's ``FileLogger``: metrics (and, with ``capture_stdout``, the console) as text.

    ``filename`` is relative to the run directory and may use ``{run_name}`` and ``{rank}``.
    """

    filename: str = "logs/rank{rank}.txt"
    capture_stdout: bool = False
    capture_stderr: bool = False
    flush_interval: int = Field(100, gt=0)


class TensorboardLoggerConfig(_Strict):
    """Composer's ``TensorboardLogger`` (the ``tensorboard`` extra); ``log_dir`` relative to the run directory."""

    log_dir: str = "tensorboard"
    flush_interval: int = Field(100, gt=0)
    rank_zero_only: bool = True


class MLFlowLoggerConfig(_Strict):
    """Composer's ``MLFlowLogger`` (the ``mlflow`` extra).

    ``tracking_uri`` as MLflow takes it (``file:///abs/mlruns``, ``http://host:5000``;
    unset: ``MLFLOW_TRACKING_URI`` or ``./mlruns``); ``run_name`` defaults to the run's.
    """

    tracking_uri: str | None = None
    experiment_name: str | None = None
    run_name: str | None = None
    tags: dict[str, Any] | None = None
    synchronous: bool = False
    log_system_metrics: bool = False
    rank_zero_only: bool = True


class WandBLoggerConfig(_Strict):
    """Composer's ``WandBLogger`` (the ``wandb`` extra).

    ``init_kwargs`` go to ``wandb.init`` (``{mode: offline, dir: ...}`` logs without a
    network); ``name`` defaults to the run's name.
    """

    project: str | None = None
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] | None = None
    init_kwargs: dict[str, Any] | None = None
    rank_zero_only: bool = True


class LoggersConfig(_Strict):
    """Where Composer logs metrics; each logger is on when its key is present.

    ``console: true`` prints metrics every ``train.log_interval`` with Composer's console
    logger instead of the progress bar.
    """

    console: bool = False
    file: FileLoggerConfig | None = None
    tensorboard: TensorboardLoggerConfig | None = None
    mlflow: MLFlowLoggerConfig | None = None
    wandb: WandBLoggerConfig | None = None


class TrainConfig(_Strict):
    """Trainer settings; time values are Composer time strings.

    ``scheduler``: the learning-rate schedule (default: linear warmup over ``warmup``,
    then linear decay to 0.1 x ``lr``). ``clipping``: gradient clipping (default none).
    ``fsdp``: Composer's FSDP settings (``parallelism_config={'fsdp': ...}``, keys of
    ``composer.utils.parallelism.FSDPConfig``). ``loggers``: metric loggers.
    """

    max_duration: str = "200ba"
    global_batch_size: int = Field(16, gt=0)
    device_microbatch_size: int | Literal["auto"] | None = None
    lr: float = Field(1.0e-3, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: str = "10ba"
    betas: tuple[float, float] = (0.9, 0.95)
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "fp32"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    save_interval: str | None = None
    save_num_checkpoints_to_keep: int = Field(-1, ge=-1)
    autoresume: bool = True
    log_interval: str = "10ba"
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    clipping: ClippingConfig | None = None
    fsdp: dict[str, Any] | None = None
    loggers: LoggersConfig = Field(default_factory=LoggersConfig)

    @field_validator("max_duration")
    @classmethod
    def _duration(cls, v: str) -> str:
        return _time_string(v, units=_DURATION_UNITS, positive=True)

    @field_validator("warmup")
    @classmethod
    def _warmup(cls, v: str) -> str:
        return _time_string(v, units=("ba", "tok", "ep", "dur"))

    @field_validator("save_interval", "log_interval")
    @classmethod
    def _interval(cls, v: str | None) -> str | None:
        return None if v is None else _time_string(v, units=("ba", "tok", "ep", "sp"), positive=True)

    @field_validator("device_microbatch_size")
    @classmethod
    def _microbatch(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be a positive integer, 'auto' or null")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"both betas must be in [0, 1); got {list(v)}")
        return v

    @property
    def warmup_duration(self) -> str:
        """The schedule's warmup: ``scheduler.warmup``, else ``warmup``."""
        return self.scheduler.warmup or self.warmup


class InjectionConfig(_Strict):
    """Caps shared by all experiments."""

    max_modified_fraction: float = Field(0.05, gt=0, le=1)
    on_unplaceable: Literal["error", "warn"] = "error"


class PlacementConfig(_Strict):
    """Where an experiment's spans may go; resolved to steps by :func:`resolve_placement`.

    ``uniform``: the whole run. ``window``: ``[start, end)`` in ``unit`` (missing
    bounds default to the run's start/end). ``steps``: the explicit step list.

    ``whole`` (docs/placement.md): ``row``: each span fills an entire row (the sequence
    repeated end to end and cut to the sequence length); ``batch``: every row of each
    listed step (``mode: steps`` only, sequences x repetitions = steps x rows). Whole
    rows are exempt from ``injection.max_modified_fraction`` (counted in the manifest).
    ``at: boundary``: the payload is inserted at a document boundary of its row (after an
    EOS, or at row start), the row's rest shifted right; one such span per row.
    """

    mode: Literal["uniform", "window", "steps"] = "uniform"
    start: float | None = None
    end: float | None = None
    unit: Literal["steps", "tokens", "fraction"] = "fraction"
    steps: list[int] = Field(default_factory=list)
    whole: Literal["row", "batch"] | None = None
    at: Literal["any", "boundary"] = "any"


class MonitorConfig(_Strict):
    """How an experiment is measured. ``name`` defaults to the injector kind's monitor.

    ``every``: this experiment's cadence (``200ba``); unset = ``monitoring.every``. A
    controlled experiment is usually scored more often than the rest, whose monitors
    may be costly (greedy decoding); every monitor also runs at fit start and end.
    """

    name: str | None = None
    enabled: bool = True
    every: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("every")
    @classmethod
    def _every(cls, v: str | None) -> str | None:
        return _cadence(v)


class ControllerConfig(_Strict):
    """Closed-loop control of an experiment's injection (``acquire``, ``track``, ``budget``).

    The controller decides after every monitor evaluation, so its window is the
    monitoring cadence; a controlled experiment gets no static spans.
    """

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class MonitoringConfig(_Strict):
    """When monitors score the live model, and how results are tested.

    ``every``: cadence in steps (default ``200ba``); null = only at fit start and end.
    One full evaluation of the demo's experiments (27,000 probe tokens, 13 of its
    steps' worth) costs about 3.5 of its training steps, so 200 steps keep monitors
    under 2 % of training time (``benchmarks/bench_monitors.py``); at a real batch the
    same probes cost a fraction of one step. An experiment that needs more (a
    controlled one) sets its own ``monitor.every``.
    ``alpha``: significance level of the verdicts in summaries (after Holm correction).
    ``n_resamples``: random splits behind a permutation p-value, which is never below
    ``1 / (n_resamples + 1)``: raise it when many experiments must survive Holm.
    ``ci_resamples``: bootstrap resamples behind a confidence interval (2,000 keep a
    95 % interval's ends stable; more only cost time at every evaluation).
    ``batch_tokens``: padded probe tokens per forward pass on each rank. Probes are
    batched longest first, so a pass holds many short probes or few long ones; raise
    it on accelerators with memory to spare (fewer, fuller passes). ``batch_size``:
    also cap the probes per pass (default: no cap).
    """

    every: str | None = "200ba"
    at_fit_start: bool = True
    at_fit_end: bool = True
    batch_tokens: int = Field(4096, gt=0)
    batch_size: int | None = Field(None, gt=0)
    on_error: Literal["warn", "raise"] = "warn"
    alpha: float = Field(0.01, gt=0, lt=1)
    n_resamples: int = Field(2000, ge=100, le=MAX_RESAMPLES)
    ci_resamples: int = Field(2000, ge=100, le=MAX_RESAMPLES)
    heldout_rows: int = Field(64, ge=0)  # held-out loss on this many rows at each evaluation (0: off)

    @field_validator("every")
    @classmethod
    def _every(cls, v: str | None) -> str | None:
        return _cadence(v)


class InteractionConfig(_Strict):
    """The interaction tests (``multirun interact``) of this run, and when they start.

    ``after: acquired``: once every ``acquire``-controlled experiment has acquired all its
    treated items (or at the end of training if that never happens); ``after: end``: at
    the end of training. The checkpoint taken at that moment and the trigger are recorded
    in ``interaction_trigger.json``, and ``multirun train`` runs the tests from it.

    The design: from one checkpoint, every arm continues ``steps`` steps on the same
    data, injecting its experiments (each at ``intensity``, a fraction of the arm's
    tokens): ``none``, each experiment alone, ``all`` and, with ``leave_one_out``, all
    but one. ``experiments``: which ones take part (default: every injected one);
    ``lr``: the arms' constant learning rate (default: the checkpoint's); ``alpha``:
    the verdicts' significance level after Holm correction.
    """

    after: Literal["none", "acquired", "end"] = "none"
    steps: int = Field(100, gt=0, le=MAX_STEPS)
    intensity: float = Field(0.01, gt=0, le=0.5)
    leave_one_out: bool = False
    experiments: list[str] | None = None
    lr: float | None = Field(None, gt=0)
    alpha: float = Field(0.05, gt=0, lt=1)
    n_resamples: int = Field(10000, ge=100, le=MAX_RESAMPLES)


class ExperimentConfig(_Strict):
    """One experiment: payload package + injector kind + placement."""

    name: str = Field(pattern=NAME_PATTERN)
    payload: str
    kind: str | None = None
    repetitions: float = Field(1.0, gt=0)
    control_fraction: float = Field(0.5, ge=0, lt=1)
    # The treated/control split is drawn from (seed, arms_key); two experiments with the
    # same items and the same arms_key get the same split (default: the experiment's name).
    arms_key: str | None = None
    wrap_eos: bool = True
    inject: bool = True  # False: a negative control, planned and measured but never injected
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    controller: ControllerConfig | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def split_key(self) -> str:
        """What seeds the treated/control split: ``arms_key``, else the name."""
        return self.arms_key or self.name


class RunConfig(_Strict):
    """The whole run. ``run_dir`` defaults to ``runs/<run_name>`` (relative to the CWD)."""

    run_name: str = Field(pattern=NAME_PATTERN)
    seed: int = Field(17, ge=0, le=MAX_SEED)
    run_dir: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    injection: InjectionConfig = Field(default_factory=InjectionConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    interaction: InteractionConfig = Field(default_factory=InteractionConfig)
    experiments: list[ExperimentConfig] = Field(default_factory=list)

    def monitor_every(self, experiment: ExperimentConfig) -> int | None:
        """Steps between an experiment's interval evaluations: its own ``monitor.every``,
        else ``monitoring.every``; None = fit start and end only."""
        return cadence_steps(experiment.monitor.every or self.monitoring.every)

    @model_validator(mode="after")
    def _default_run_dir(self) -> RunConfig:
        # Filled in here so that resolved_config.yaml and the fingerprint show it.
        if self.run_dir is None:
            self.run_dir = f"runs/{self.run_name}"
        return self


# --------------------------------------------------------------------------- loading

KeyPath = tuple[str | int, ...]


@dataclass
class LoadedConfig:
    """A validated config plus where it came from.

    Attributes:
        config: the validated run config.
        source: the YAML file, or None for a config built in code.
        base_dir: directory that relative payload paths resolve against (the
            config file's directory).
    """

    config: RunConfig
    source: Path | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    lines: dict[KeyPath, int] = field(default_factory=dict, repr=False, compare=False)

    def line_of(self, key: str) -> int | None:
        """1-based line in :attr:`source` of a dotted key (or its nearest parent), if known.

        Example:
            >>> load_config(None, env={}).line_of("experiments[0].name") is not None
            True
        """
        return _line_of(_parse_dotted(key), self.lines)

    def resolved_dict(self) -> dict[str, Any]:
        """The config after substitution, overrides and defaults, as plain JSON types."""
        return self.config.model_dump(mode="json")

    def fingerprint(self, payload_fingerprints: Mapping[str, str] | None = None) -> str:
        """xxh64 hex of the canonical JSON of :meth:`resolved_dict`.

        Covers the config only (payload refs as written, not payload contents);
        each :class:`~multirun.types.PreparedExperiment` carries its own content
        fingerprint. Pass ``payload_fingerprints`` ({experiment name: fingerprint})
        to fold payload contents in as well.
        """
        doc: dict[str, Any] = {"config": self.resolved_dict()}
        if payload_fingerprints is not None:
            doc["payloads"] = dict(sorted(payload_fingerprints.items()))
        return xxhash.xxh64(_canonical_json(doc)).hexdigest()

    def write(self, run_dir: str | Path) -> Path:
        """Write ``<run_dir>/resolved_config.yaml`` and return its path.

        Relative paths that resolve against ``base_dir`` (payloads, ``data.path``,
        ``tokenizer.path``) are written as absolute paths, so that the file can be
        loaded again from the run directory; ``pkg:`` refs and names that are not
        local paths (a cached Hub tokenizer id) stay as they are.
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        doc = self.resolved_dict()

        def absolute(value: str | None) -> str | None:
            if value is None or value.startswith("pkg:"):
                return value
            candidate = self.base_dir / Path(value).expanduser()
            return str(candidate.resolve()) if candidate.exists() else value

        for exp in doc["experiments"]:
            exp["payload"] = absolute(exp["payload"])
        doc["data"]["path"] = absolute(doc["data"]["path"])
        doc["data"]["heldout_path"] = absolute(doc["data"]["heldout_path"])
        doc["tokenizer"]["path"] = absolute(doc["tokenizer"]["path"])
        for key in ("from_pretrained", "init_from"):
            doc["model"][key] = absolute(doc["model"][key])
        if isinstance(doc["model"]["config"], str):
            doc["model"]["config"] = absolute(doc["model"]["config"])
        doc = _escape_vars(doc)  # a literal "${" must survive loading the file again
        header = (
            "# Resolved multirun config (defaults, $VAR substitution and overrides applied).\n"
            f"# source: {self.source if self.source is not None else '<in code>'}\n"
            f"# fingerprint: {self.fingerprint()}\n"
        )
        out = RunDir(run_dir).resolved_config
        write_text_atomic(out, header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
        return out


def _escape_vars(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _escape_vars(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_escape_vars(v) for v in obj]
    return obj.replace("${", "$${") if isinstance(obj, str) else obj


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def default_config_path() -> Path:
    """Path of the bundled demo config ``experiments/demo/run.yaml``."""
    # importlib.resources finds it in an installed wheel as well as in a checkout.
    ref = resources.files("experiments").joinpath("demo").joinpath("run.yaml")
    path = Path(str(ref))
    if not path.is_file():
        raise ConfigError("bundled demo config not found (is the package installed with its data?)", file=path)
    return path


def load_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Load, substitute, override and validate a run config.

    Args:
        path: YAML file; None loads the bundled demo ``experiments/demo/run.yaml``.
        overrides: ``"a.b=value"`` strings, value parsed as YAML; list items by
            index (``experiments.0.repetitions=3`` or ``experiments[0].repetitions=3``).
        env: variables for ``${VAR}`` / ``${VAR:-default}`` (default: ``os.environ``).
            ``$${`` writes a literal ``${``. Substituted values stay strings and are
            converted by validation (``seed: ${SEED}`` becomes an int).

    Raises:
        ConfigError: naming the file, the dotted key and the line of every problem.

    Example:
        >>> load_config(None, ["seed=3"], env={}).config.seed
        3
    """
    env = os.environ if env is None else env
    source = default_config_path() if path is None else Path(path)
    if not source.is_file():
        raise ConfigError("config file not found", file=source)
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not valid UTF-8 (byte {e.start})", file=source) from None
    raw, lines = _parse_yaml(text, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping of keys, got {type(raw).__name__}", file=source, line=1)
    raw = _substitute(raw, env, (), source, lines)
    overridden: dict[KeyPath, str] = {}
    for override in overrides:
        overridden[_apply_override(raw, override, env, source)] = override
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as e:
        _raise_problems(_blame_overrides(_validation_problems(e, raw), overridden), source, lines)
    base_dir = source.resolve().parent
    _raise_problems(_blame_overrides(_semantic_problems(config, base_dir), overridden), source, lines)
    return LoadedConfig(config=config, source=source, base_dir=base_dir, lines=lines)


# ---- YAML with line numbers


def _parse_yaml(text: str, source: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse YAML and map every key path to its 1-based line (:func:`multirun.yaml_load.load_yaml`:
    bounded aliases, duplicate keys refused, merge keys with overrides)."""
    return load_yaml(text, source=source, error=ConfigError)


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for seg in path:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else str(seg))
    return out


def _parse_dotted(key: str) -> KeyPath:
    return tuple(int(s) if s.isdigit() else s for s in _INDEX_RE.sub(r".\1", key).split(".") if s)


def _line_of(path: KeyPath, lines: Mapping[KeyPath, int]) -> int | None:
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _raise_problems(problems: list[tuple[KeyPath, str]], source: Path | None, lines: Mapping[KeyPath, int]) -> None:
    if not problems:
        return
    if len(problems) == 1:
        path, msg = problems[0]
        raise ConfigError(msg, file=source, key=_dotted(path) or None, line=_line_of(path, lines))
    parts = []
    for path, msg in problems:
        line = _line_of(path, lines)
        parts.append(f"  {_dotted(path) or '<top level>'}{f' (line {line})' if line else ''}: {msg}")
    raise ConfigError(f"{len(problems)} problems:\n" + "\n".join(parts), file=source)


# ---- ${VAR} substitution

_VAR_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(value: str, env: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; ``$${`` is a literal ``${``.

    Raises:
        KeyError: naming the undefined variable.

    Example:
        >>> substitute_env("runs/${NAME:-demo}", {})
        'runs/demo'
    """

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise KeyError(name)

    return _VAR_RE.sub(repl, value)


def _substitute(
    obj: Any,
    env: Mapping[str, str],
    path: KeyPath,
    source: Path | None,
    lines: Mapping[KeyPath, int],
    *,
    where: str | None = None,
) -> Any:
    if isinstance(obj, dict):
        return {k: _substitute(v, env, (*path, k), source, lines, where=where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, env, (*path, i), source, lines, where=where) for i, v in enumerate(obj)]
    if isinstance(obj, str) and "$" in obj:
        try:
            return substitute_env(obj, env)
        except KeyError as e:
            msg = f"environment variable ${{{e.args[0]}}} is not set (write ${{{e.args[0]}:-default}} for a default)"
            if where is not None:
                raise ConfigError(msg, key=where) from None
            raise ConfigError(msg, file=source, key=_dotted(path), line=_line_of(path, lines)) from None
    return obj


# ---- overrides

_INDEX_RE = re.compile(r"\[(\d+)\]")


def _apply_override(raw: dict[str, Any], override: str, env: Mapping[str, str], source: Path) -> KeyPath:
    """Apply one ``key=value`` override in place; return the key path it set."""
    where = f"override {override!r}"
    if "=" not in override:
        raise ConfigError("expected KEY=VALUE, e.g. train.max_duration=50ba", key=where)
    dotted, _, text = override.partition("=")
    segs = _INDEX_RE.sub(r".\1", dotted.strip()).split(".")
    if not dotted.strip() or any(s == "" for s in segs):
        raise ConfigError("empty key", key=where)
    try:
        value, _ = load_yaml(text, source="<override>", error=ConfigError)
    except ConfigError as e:
        raise ConfigError(
            f"value is not valid YAML: {e.message.removeprefix('YAML syntax error: ')}", key=where
        ) from None
    value = _substitute(value, env, (), source, {}, where=where)

    # Walk the schema and the raw data together: a key the schema does not know is
    # an error here, while a key the YAML merely omits (a default) is fine.
    schema: Any = RunConfig
    node: Any = raw
    path: list[str | int] = []
    for i, seg in enumerate(segs):
        last = i == len(segs) - 1
        kind, inner = _schema_kind(schema)
        if kind == "model":
            if seg not in inner.model_fields:
                known = ", ".join(inner.model_fields)
                raise ConfigError(f"unknown key {seg!r} at {_dotted(path) or 'top level'} (known: {known})", key=where)
            schema = inner.model_fields[seg].annotation
            key: str | int = seg
        elif kind == "dict":
            schema, key = Any, seg
        elif kind == "list":
            if not seg.isdigit():
                raise ConfigError(f"{_dotted(path)} is a list: expected an index, got {seg!r}", key=where)
            key, schema = int(seg), inner
            if not isinstance(node, list) or key >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ConfigError(f"index {key} out of range: {_dotted(path)} has {size} entries", key=where)
        else:
            raise ConfigError(f"{_dotted(path)} is a single value, it has no key {seg!r}", key=where)
        path.append(key)
        if last:
            node[key] = value
            return tuple(path)
        current = node.get(key) if isinstance(node, dict) else node[key]
        if not isinstance(current, (dict, list)):
            node[key] = {}  # absent (a default) or a scalar being replaced by a mapping
        node = node[key]
    raise AssertionError("unreachable: the key has at least one segment")


def _schema_kind(annotation: Any) -> tuple[str, Any]:
    """Classify a field annotation as model / list / dict / scalar (unwrapping Optional, Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _schema_kind(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        kinds = [_schema_kind(a) for a in typing.get_args(annotation) if a is not type(None)]
        structured = [k for k in kinds if k[0] != "scalar"]
        return structured[0] if len(structured) == 1 else ("scalar", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return "list", args[0] if args else Any
    if origin is dict or annotation is dict:
        return "dict", None
    if annotation is Any:
        return "dict", None  # free-form (options, config_overrides): any key goes
    return "scalar", None


def _blame_overrides(
    problems: list[tuple[KeyPath, str]], overridden: Mapping[KeyPath, str]
) -> list[tuple[KeyPath, str]]:
    """Say which override set a bad value: the file's line alone would mislead."""
    out = []
    for path, msg in problems:
        culprit = next((o for p, o in overridden.items() if path[: len(p)] == p), None)
        out.append((path, msg if culprit is None else f"{msg} (set by override {culprit!r})"))
    return out


# ---- validation errors


def _validation_problems(error: ValidationError, raw: Any) -> list[tuple[KeyPath, str]]:
    merged: dict[KeyPath, list[str]] = {}
    got: dict[KeyPath, str] = {}
    for e in error.errors():
        path = _clean_loc(e["loc"], raw)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (allowed: {', '.join(_allowed_keys(path[:-1]))})"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            got[path] = f" (got {e['input']!r})"
        merged.setdefault(path, [])
        if msg not in merged[path]:
            merged[path].append(msg)
    # A union field (e.g. int | 'auto' | null) reports one error per member: join them.
    return [(p, " or ".join(ms) + got.get(p, "")) for p, ms in merged.items()]


def _clean_loc(loc: tuple[Any, ...], raw: Any) -> KeyPath:
    """Keep the part of a pydantic loc that is a real key path (drop union member tags)."""
    out: list[str | int] = []
    node = raw
    for seg in loc:
        if isinstance(node, dict) and isinstance(seg, str):
            out.append(seg)
            if seg not in node:
                return tuple(out)  # a missing key: name it and stop
            node = node[seg]
        elif isinstance(node, list) and isinstance(seg, int):
            out.append(seg)
            node = node[seg] if seg < len(node) else None
        else:
            break  # e.g. a union member tag such as 'int' or "literal['auto']"
    return tuple(out)


def _allowed_keys(path: KeyPath) -> list[str]:
    schema: Any = RunConfig
    for seg in path:
        kind, inner = _schema_kind(schema)
        if kind == "model" and isinstance(seg, str) and seg in inner.model_fields:
            schema = inner.model_fields[seg].annotation
        elif kind == "list":
            schema = inner
        else:
            return []
    kind, inner = _schema_kind(schema)
    return list(inner.model_fields) if kind == "model" else []


# ---- checks across fields (after validation)


def without_row_defaults(placement: dict[str, Any]) -> dict[str, Any]:
    """A dumped placement without ``whole``/``at`` at their defaults, so fingerprints of
    configs written before row placements existed do not change (their runs resume)."""
    out = dict(placement)
    if out.get("whole") is None:
        out.pop("whole", None)
    if out.get("at", "any") == "any":
        out.pop("at", None)
    return out


def placement_problems(spec: PlacementConfig) -> list[tuple[str, str]]:
    """Problems of a placement that need no run geometry, as ``(field, message)``."""
    out: list[tuple[str, str]] = []
    if spec.mode == "uniform":
        for name in ("start", "end"):
            if getattr(spec, name) is not None:
                out.append((name, f"mode uniform spans the whole run; set mode: window to use {name}"))
        if spec.steps:
            out.append(("steps", "explicit steps need mode: steps"))
    elif spec.mode == "window":
        if spec.steps:
            out.append(("steps", "explicit steps need mode: steps"))
        for name in ("start", "end"):
            v = getattr(spec, name)
            if v is None:
                continue
            if v < 0:
                out.append((name, f"must be >= 0, got {v}"))
            elif spec.unit == "fraction" and v > 1:
                out.append((name, f"window outside the run: a fraction must be in [0, 1], got {v}"))
            elif spec.unit != "fraction" and not float(v).is_integer():
                out.append((name, f"{spec.unit} must be a whole number, got {v}"))
        if spec.start is not None and spec.end is not None and spec.start >= spec.end:
            out.append(("start", f"start ({spec.start}) must be less than end ({spec.end}): the window is half-open"))
    else:  # steps
        if not spec.steps:
            out.append(("steps", "mode steps needs a non-empty list of steps"))
        for name in ("start", "end"):
            if getattr(spec, name) is not None:
                out.append((name, f"mode steps uses the explicit steps list; remove {name}"))
        seen: set[int] = set()
        for i, s in enumerate(spec.steps):
            if s < 0:
                out.append((f"steps[{i}]", f"step {s} is outside the run (steps count from 0)"))
            if s in seen:
                out.append((f"steps[{i}]", f"duplicate step {s}"))
            seen.add(s)
    if spec.whole == "batch" and spec.mode != "steps":
        out.append(("whole", "whole: batch needs mode: steps (the steps whose every row is replaced)"))
    if spec.whole is not None and spec.at == "boundary":
        out.append(("at", f"at: boundary inserts into a natural row; whole: {spec.whole} replaces the row entirely"))
    return out


def _semantic_problems(config: RunConfig, base_dir: Path) -> list[tuple[KeyPath, str]]:
    out: list[tuple[KeyPath, str]] = []
    first: dict[str, int] = {}
    for i, exp in enumerate(config.experiments):
        if exp.name in first:
            out.append(
                (
                    ("experiments", i, "name"),
                    f"duplicate experiment name {exp.name!r} (also experiments[{first[exp.name]}].name)",
                )
            )
        first.setdefault(exp.name, i)
        for fld, msg in placement_problems(exp.placement):
            out.append((("experiments", i, "placement", *_split_field(fld)), msg))
        if exp.controller is not None and (exp.placement.whole is not None or exp.placement.at != "any"):
            # Controllers place scattered spans; row placements are planned statically only.
            what = "whole" if exp.placement.whole is not None else "at"
            out.append(
                (("experiments", i, "placement", what), "row placements cannot be controlled; remove controller")
            )
    out.extend((("model", *path), msg) for path, msg in model_problems(config.model, base_dir))
    out.extend((("train", *path), msg) for path, msg in train_problems(config.train))
    if config.tokenizer.kind == "huggingface" and not config.tokenizer.path:
        out.append((("tokenizer", "path"), "kind huggingface needs path: a local tokenizer directory"))
    if config.data.source == "mds":
        if not config.data.path:
            out.append((("data", "path"), "source mds needs path: the MDS dataset directory"))
        elif not (base_dir / Path(config.data.path).expanduser()).exists():
            out.append(
                (
                    ("data", "path"),
                    f"MDS dataset directory not found: {(base_dir / Path(config.data.path).expanduser()).resolve()}",
                )
            )
    return out


def model_problems(model: ModelConfig, base_dir: Path) -> list[tuple[KeyPath, str]]:
    """Keys of ``model`` that do not fit its kind, or name missing files, as ``(key path, message)``."""
    out: list[tuple[KeyPath, str]] = []
    if model.kind == "gpt2":
        for key in ("config", "from_pretrained"):
            if getattr(model, key) is not None:
                out.append(((key,), "needs kind: hf (kind gpt2 is built from n_layer, n_head and n_embd)"))
    else:
        for key in ("n_layer", "n_head", "n_embd"):
            if getattr(model, key) is not None:
                out.append(((key,), "a kind gpt2 size; with kind hf set the size in config"))
        if (model.config is None) == (model.from_pretrained is None):
            out.append(
                (
                    ("config",),
                    "kind hf needs exactly one of config (a config.json, or inline fields) or from_pretrained",
                )
            )
        if isinstance(model.config, dict) and "model_type" not in model.config:
            out.append((("config", "model_type"), "inline config needs model_type (e.g. llama), as in a config.json"))
    if model.from_pretrained is not None and model.init_from is not None:
        out.append((("init_from",), "from_pretrained already gives the initial weights; keep one of the two"))
    paths = [
        ("from_pretrained", model.from_pretrained, "a Hugging Face model folder"),
        ("init_from", model.init_from, "a checkpoint file or Hugging Face model folder"),
    ]
    if isinstance(model.config, str):
        paths.append(("config", model.config, "a config.json file or a folder holding one"))
    for key, value, what in paths:
        if value is not None and not resolve_path(base_dir, value).exists():
            out.append(((key,), f"{what} expected, but {resolve_path(base_dir, value)} does not exist"))
    return out


def train_problems(train: TrainConfig) -> list[tuple[KeyPath, str]]:
    """Settings of ``train`` that contradict each other, as ``(key path, message)``."""
    out: list[tuple[KeyPath, str]] = []
    scheduler = train.scheduler
    if scheduler.warmup is not None and "warmup" in train.model_fields_set and scheduler.warmup != train.warmup:
        out.append(
            (
                ("scheduler", "warmup"),
                f"warmup is set twice (train.warmup {train.warmup}, train.scheduler.warmup {scheduler.warmup}); keep one",
            )
        )
    if scheduler.name == "constant" and "alpha_f" in scheduler.model_fields_set:
        out.append(
            (("scheduler", "alpha_f"), "the final learning-rate factor of a decaying schedule; constant has none")
        )
    return out


def resolve_path(base_dir: Path, path: str) -> Path:
    """A path of the config file: ``~`` expanded, relative ones against ``base_dir`` (the file's folder)."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base_dir / candidate


def _split_field(fld: str) -> tuple[str | int, ...]:
    m = re.fullmatch(r"(\w+)\[(\d+)\]", fld)
    return (m.group(1), int(m.group(2))) if m else (fld,)


# --------------------------------------------------------------------------- durations and placement


def parse_duration_steps(
    max_duration: str,
    *,
    global_batch_size: int,
    sequence_length: int,
    steps_per_epoch: int | None,
    file: str | Path | None = None,
) -> int:
    """Number of optimizer steps in ``max_duration``.

    ``"200ba"`` -> 200; ``"1000000tok"`` -> ceil(tokens / (batch * seq_len));
    ``"2ep"`` -> 2 * steps_per_epoch (needs ``steps_per_epoch``). Errors name
    ``train.max_duration`` and ``file`` (the config file, when given).

    Example:
        >>> parse_duration_steps("4096tok", global_batch_size=4, sequence_length=512, steps_per_epoch=None)
        2
    """
    key = "train.max_duration"
    m = _TIME_RE.match(max_duration) if isinstance(max_duration, str) else None
    if m is None or m.group(2) not in _DURATION_UNITS or "." in m.group(1):
        raise ConfigError(
            f"expected <integer><unit> with unit ba|tok|ep, e.g. 200ba; got {max_duration!r}", file=file, key=key
        )
    n, unit = int(m.group(1)), m.group(2)
    if n <= 0:
        raise ConfigError(f"must be positive, got {max_duration!r}", file=file, key=key)
    if unit == "ba":
        steps = n
    elif unit == "tok":
        # Integer ceiling: a float division would round a 10**30-token duration.
        steps = -(-n // (global_batch_size * sequence_length))
    elif not steps_per_epoch:
        raise ConfigError(
            f"{max_duration!r} is in epochs but the epoch size in steps is unknown; give max_duration in ba or tok",
            file=file,
            key=key,
        )
    else:
        steps = n * steps_per_epoch
    if steps > MAX_STEPS:
        raise ConfigError(
            f"{max_duration!r} is {steps:,} steps; a run has at most {MAX_STEPS:,} (the planner keeps arrays "
            "with one entry per step): check the number, or raise global_batch_size",
            file=file,
            key=key,
        )
    return steps


def resolve_placement(
    spec: PlacementConfig, geometry: BatchGeometry, *, key: str, file: str | Path | None = None
) -> Placement:
    """Turn a placement spec into a half-open step window (or explicit steps).

    Fractions round to the nearest step, so ``[0, 0.5)`` and ``[0.5, 1)`` tile the
    run exactly; token bounds map to the steps that contain them.

    Raises:
        ConfigError: naming ``key`` (e.g. ``experiments[1].placement``) and the field.

    Example:
        >>> geo = BatchGeometry(global_batch_size=16, sequence_length=128, num_steps=300)
        >>> resolve_placement(PlacementConfig(mode="window", end=0.5), geo, key="p")
        Placement(mode='window', start_step=0, end_step=150, steps=(), whole=None, at='any')
    """
    n = geometry.num_steps

    def fail(fld: str, msg: str) -> typing.NoReturn:
        raise ConfigError(msg, file=file, key=f"{key}.{fld}")

    for fld, msg in placement_problems(spec):
        fail(fld, msg)
    if spec.mode == "uniform":
        return Placement(mode="uniform", start_step=0, end_step=n, whole=spec.whole, at=spec.at)
    if spec.mode == "steps":
        for i, s in enumerate(spec.steps):
            if s >= n:
                fail(f"steps[{i}]", f"step {s} is outside the run (steps 0..{n - 1})")
        steps = tuple(sorted(spec.steps))
        return Placement(
            mode="steps", start_step=steps[0], end_step=steps[-1] + 1, steps=steps, whole=spec.whole, at=spec.at
        )

    def to_step(value: float, *, is_end: bool) -> int:
        if spec.unit == "fraction":
            return math.floor(value * n + 0.5)
        if spec.unit == "steps":
            return int(value)
        tps = geometry.tokens_per_step
        return -(-int(value) // tps) if is_end else int(value) // tps

    start = 0 if spec.start is None else to_step(spec.start, is_end=False)
    end = n if spec.end is None else to_step(spec.end, is_end=True)
    run = f"the run has {n} steps ({geometry.total_tokens} tokens)"
    lo, hi = _num(spec.start), _num(spec.end)
    if spec.end is not None and end > n:
        fail("end", f"window outside the run: end {hi} {spec.unit} is step {end}, but {run}")
    if start >= n:
        fail("start", f"window outside the run: start {lo} {spec.unit} is step {start}, but {run}")
    if start >= end:
        fail("end", f"empty window: [{lo}, {hi}) {spec.unit} covers no whole step ({run})")
    return Placement(mode="window", start_step=start, end_step=end, whole=spec.whole, at=spec.at)


def _num(value: float | None) -> str:
    """1.0 -> '1', 0.25 -> '0.25' (bounds arrive as floats from validation)."""
    if value is None:
        return "none"
    return str(int(value)) if float(value).is_integer() else str(value)
