"""Controllers by name: built-ins registered in code, plugins through entry points,
and the factory that validates options and builds one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from multirun.control.controllers.acquire import AcquireController
from multirun.control.controllers.base import Controller
from multirun.control.controllers.budget import BudgetController
from multirun.control.controllers.options import parse_options
from multirun.control.controllers.track import TrackController
from multirun.errors import ConfigError
from multirun.kinds.registry import Registry
from multirun.types import PreparedExperiment

__all__ = ["CONTROLLERS", "build_controller", "controllers"]

#: Controller classes by name (what ``controller.name`` selects in the YAML). A
#: third-party package adds one through the entry-point group ``multirun.controllers``
#: (``name = package.module:ControllerClass``); a built-in name cannot be taken over.
controllers: Registry[type] = Registry("multirun.controllers", what="controller")

#: The built-in controllers.
CONTROLLERS: dict[str, type[Controller]] = {
    AcquireController.name: AcquireController,
    TrackController.name: TrackController,
    BudgetController.name: BudgetController,
}
for _name, _cls in CONTROLLERS.items():
    controllers.register(_name, _cls)


def build_controller(
    name: str,
    options: Mapping[str, Any],
    *,
    experiment: PreparedExperiment,
    metrics_available: Sequence[str],
    window_steps: int,
    num_steps: int,
) -> Controller:
    """Validate ``options`` and build the named controller for ``experiment``.

    The name is looked up in :data:`controllers` (built-ins, then the entry-point group
    ``multirun.controllers``). Then, in this order: the window; ``options`` parsed
    against the class's ``OPTIONS``; ``validate(opts, metrics_available)``; the
    experiment must have treated sequences; ``validate_experiment(opts, experiment)``;
    ``cls(experiment, **opts, window_steps=..., num_steps=...)``.

    Raises :class:`~multirun.errors.ConfigError` with ``key="controller.<option>"``
    (``controller.name`` for an unknown controller, ``controller.window`` for a bad
    window, ``controller`` when the experiment has nothing to inject); the caller
    prefixes the experiment's key (``experiments[i].``) and the file.

    Example::

        ctl = build_controller("budget", {"max_tokens": 1000}, experiment=exp,
                               metrics_available=[], window_steps=10, num_steps=100)
    """
    if not isinstance(name, str):
        raise ConfigError(f"unknown controller {name!r}; known: {controllers.names()}", key="controller.name")
    cls: type[Controller] = controllers.get(name, key="controller.name")
    if isinstance(window_steps, bool) or not isinstance(window_steps, (int, np.integer)) or window_steps < 1:
        raise ConfigError(
            f"the decision window must be a positive number of steps, got {window_steps!r}", key="controller.window"
        )
    if window_steps > num_steps:
        raise ConfigError(
            f"the decision window of {window_steps} steps is longer than the run ({num_steps} steps)",
            key="controller.window",
        )
    if not isinstance(options, Mapping):
        raise ConfigError(f"options must be a mapping, got {type(options).__name__}", key="controller")
    opts = parse_options(cls.OPTIONS, options)
    cls.validate(opts, list(metrics_available))
    treated = np.asarray(experiment.treated, dtype=bool)
    seq_items = np.asarray(experiment.seq_items, dtype=np.int64)
    treated_seqs = np.flatnonzero(treated[seq_items]) if seq_items.size else np.empty(0, np.int64)
    if treated_seqs.size == 0:
        raise ConfigError(f"experiment {experiment.name!r} has no treated sequences to inject", key="controller")
    cls.validate_experiment(opts, experiment)
    # The constructor is not part of the protocol (a Protocol cannot state it): see its docstring.
    return cls(experiment, **opts, window_steps=int(window_steps), num_steps=int(num_steps))  # type: ignore[call-arg]
