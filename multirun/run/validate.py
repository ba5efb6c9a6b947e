"""Checks of a run's config against its geometry and its run directory.

:func:`check_run` is called by :func:`multirun.run.parts.assemble_parts`, so
``multirun check`` and ``multirun train`` (and the llm-foundry callback) make the same
checks before anything is built:

* the run directory can be written: it is a directory, or can be created, and a file
  can be created in it (or in its nearest existing parent); refused otherwise;
* ``train.save_interval`` and ``train.log_interval`` in steps, samples or tokens longer
  than the run: a warning (:class:`~multirun.config.ConfigWarning`), as Composer then
  fires only at the end of training (for checkpoints: the same as leaving it unset, so
  a kill before the end loses the whole run).

(The checks that need the prepared experiments, doses and arms, are in
:mod:`multirun.plan.checks`; zero intervals and non-finite numbers are refused by
:mod:`multirun.config` when the file is loaded.)
"""

from __future__ import annotations

import errno
import tempfile
import warnings
from pathlib import Path

from multirun.config import _TIME_RE, ConfigWarning, LoadedConfig
from multirun.errors import ConfigError
from multirun.types import BatchGeometry

__all__ = ["check_run", "check_run_dir", "interval_steps", "run_dir_problem"]


def check_run(loaded: LoadedConfig, geometry: BatchGeometry, run_dir: str | Path, *, intervals: bool = True) -> None:
    """Refuse an unwritable run directory; warn of intervals that never fire before the end.

    ``intervals=False``: the run directory only (an interaction arm, whose length is not the run's).

    Raises:
        ConfigError: naming ``run_dir`` (and its line) or ``--run-dir``.
    """
    check_run_dir(loaded, Path(run_dir))
    if not intervals:
        return
    train = loaded.config.train
    warmup = interval_steps(train.warmup_duration, geometry)
    if warmup is not None and warmup > geometry.num_steps:
        key = "scheduler.warmup" if train.scheduler.warmup is not None else "warmup"
        warnings.warn(
            f"train.{key} {train.warmup_duration} is {warmup:,} steps, longer than the run "
            f"({geometry.num_steps:,} steps): the learning rate never reaches train.lr",
            ConfigWarning,
            stacklevel=2,
        )
    for name in ("save_interval", "log_interval"):
        interval = getattr(train, name)
        steps = interval_steps(interval, geometry)
        if steps is not None and steps > geometry.num_steps:
            what = (
                "only the end-of-training checkpoint is written (as without save_interval): a kill before the "
                "end loses the whole run"
                if name == "save_interval"
                else "progress is reported at the end only"
            )
            warnings.warn(
                f"train.{name} {interval} is {steps:,} steps, longer than the run ({geometry.num_steps:,} steps): {what}",
                ConfigWarning,
                stacklevel=2,
            )


def interval_steps(interval: str | None, geometry: BatchGeometry) -> int | None:
    """Steps until a Composer interval (``ba``, ``sp`` or ``tok``) first fires; None for others (``ep``).

    Example:
        >>> interval_steps("1000tok", BatchGeometry(global_batch_size=4, sequence_length=64, num_steps=10))
        4
    """
    m = _TIME_RE.match(interval) if interval is not None else None
    if m is None:
        return None
    n, unit = int(float(m.group(1))), m.group(2)
    per_step = {"ba": 1, "sp": geometry.global_batch_size, "tok": geometry.tokens_per_step}.get(unit)
    return None if per_step is None else -(-n // per_step)


def check_run_dir(loaded: LoadedConfig, run_dir: Path) -> None:
    """Refuse a run directory that cannot be written, before anything is built.

    Raises:
        ConfigError: key ``run_dir`` (with its line) when the directory is the config's,
            else ``--run-dir``.
    """
    problem = run_dir_problem(run_dir)
    if problem is None:
        return
    config_dir = loaded.config.run_dir
    if config_dir is not None and Path(config_dir) == run_dir:
        line = loaded.line_of("run_dir") if ("run_dir",) in loaded.lines else None
        raise ConfigError(problem, file=loaded.source, key="run_dir", line=line)
    raise ConfigError(problem, key="--run-dir")


def run_dir_problem(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot hold a run, or None: tried by creating (and removing) a file
    in it, or in its nearest existing parent when it does not exist yet (nothing is created)."""
    try:
        if run_dir.exists() and not run_dir.is_dir():
            return f"the run directory {run_dir} exists and is not a directory"
        parent = run_dir
        while not parent.exists() and parent.parent != parent:
            parent = parent.parent
        if not parent.is_dir():
            return f"the run directory {run_dir} cannot be created: {parent} is a file, not a directory"
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".multirun-write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        return f"the run directory {run_dir} cannot be written: creating a file in {parent} fails ({reason})"
    return None
