"""Checks of prepared experiments against the run, before any span is planned.

:func:`check_experiments` runs between preparing the experiments and planning their
spans (:func:`multirun.plan.run_plan.build_run_plan`), so ``multirun check`` and
``multirun train`` refuse the same things, and a dose the run cannot hold is refused
before the planner allocates one entry per span (``repetitions: 1e15`` would be 21 PiB).

Refused (:class:`~multirun.errors.ConfigError` naming the experiment's key and line):

* doses larger than the run can hold together: the tokens of all spans of all
  experiments (sequence lengths x repetitions) against the whole run's cap budget
  (``injection.max_modified_fraction`` x tokens per step x steps); each experiment's own
  dose against its placement is refused while it is prepared
  (:meth:`multirun.kinds.sdk.PrepareContext.check_doses`, naming the payload's line);
* an injected experiment whose repetitions round to no span at all;
* a measured experiment (``monitor.enabled``) with an empty arm: no treated items, or
  no control items (unless the kind brings its own evaluation items, as poison's
  ``heldout`` prompts).

Warned (:class:`~multirun.config.ConfigWarning`, printed by ``multirun check``):
treated sequences with fractional repetitions below 1, some of which get no span.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from multirun.config import ConfigWarning, LoadedConfig
from multirun.errors import ConfigError
from multirun.types import BatchGeometry, PreparedExperiment

__all__ = ["check_experiments"]


def check_experiments(loaded: LoadedConfig, experiments: Sequence[PreparedExperiment], geometry: BatchGeometry) -> None:
    """Refuse doses the run cannot hold, zero-span experiments and unmeasurable arms.

    ``experiments`` are in config order, their ``seq_repetitions`` as the planner will
    use them (zero for negative controls and controlled experiments).

    Raises:
        ConfigError: naming ``experiments[i].repetitions`` or ``.control_fraction`` and its line.
    """
    from multirun.plan.static import cap_tokens  # the planner's own cap, to the token

    config = loaded.config
    cap = cap_tokens(geometry, config.injection.max_modified_fraction)
    run_budget = cap * geometry.num_steps
    total = 0.0
    for i, (spec, exp) in enumerate(zip(config.experiments, experiments)):
        n_items = len(exp.item_ids)
        n_treated = int(np.count_nonzero(exp.treated))
        if spec.monitor.enabled:
            own_eval = bool(exp.metadata.get("heldout_ids"))  # e.g. poison's heldout prompts
            if n_treated == 0 or (n_treated == n_items and not own_eval):
                arm = "treated" if n_treated == 0 else "control"
                _fail(
                    loaded,
                    i,
                    "control_fraction",
                    f"experiment {exp.name!r} has no {arm} items ({n_treated} treated of {n_items}, control_fraction "
                    f"{spec.control_fraction}, or the payload's groups): its monitor compares treated with control "
                    "items and cannot measure it; change control_fraction (or the groups), or set "
                    "monitor.enabled: false",
                )
        reps = np.asarray(exp.seq_repetitions, dtype=np.float64)
        if reps.size == 0 or not reps.any():
            continue  # nothing injected statically (negative control, controller, no treated items)
        # Each experiment's dose against its own placement was checked while it was prepared
        # (PrepareContext.check_doses, which names the payload line); here: all together.
        lengths = np.asarray(exp.seq_lengths, dtype=np.float64)
        if exp.placement.whole is None:  # whole rows are exempt from the cap (docs/placement.md)
            total += math.fsum((lengths * reps).tolist())
        if total > run_budget:
            _fail(
                loaded,
                i,
                "repetitions",
                f"the experiments up to {exp.name!r} ask for {total:,.0f} injected tokens together, but the run holds "
                f"at most {run_budget:,} ({cap} tokens per step x {geometry.num_steps} steps)",
            )
        expected = round(math.fsum(reps.tolist()))
        if expected == 0:
            _fail(
                loaded,
                i,
                "repetitions",
                f"experiment {exp.name!r}: {reps.size} treated sequences x repetitions {reps.max():g} add up to "
                f"{math.fsum(reps.tolist()):g} spans, which rounds to 0: nothing would be injected",
            )
        below = int(np.count_nonzero(reps < 1))
        if below:
            warnings.warn(
                f"experiment {exp.name!r}: {below} of {reps.size} treated sequences have repetitions below 1 and "
                f"only some of them get a span ({expected} spans in all); treated items without a span are "
                "measured as treated all the same",
                ConfigWarning,
                stacklevel=2,
            )


def _fail(loaded: LoadedConfig, index: int, field: str, message: str) -> None:
    key = f"experiments[{index}].{field}"
    raise ConfigError(message, file=loaded.source, key=key, line=loaded.line_of(key) if loaded.lines else None)
