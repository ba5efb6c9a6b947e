"""Closed-loop controllers: decide, at each evaluation, what to inject in the next window.

A controller turns the monitor records of one evaluation (see
:mod:`multirun.measure.records`) into a :class:`ControllerDecision` for its
experiment: how many spans of which treated item (and which of the item's
sequences) go into the half-open step window ``[step, step + window_steps)``.
:func:`multirun.plan.dynamic.place_decision` then places those spans into the shared
occupancy, so they never collide with the static schedule or with each other.

Controllers are looked up by name in the registry :data:`controllers`; three are
built in (one module each), and a third-party package adds its own through the
entry-point group ``multirun.controllers`` (a class following :class:`Controller`,
most simply a :class:`ControllerBase` subclass with an ``OPTIONS`` schema of
:class:`Option` s):

``acquire``
    keeps injecting every treated item that is not yet *acquired* (its per-item
    score of ``metric`` has been ``>= threshold`` for ``patience`` consecutive
    evaluations), raising the item's rate by ``escalation`` after every window in
    which it made no progress (capped at ``max_rate``); an acquired item gets 0
    exposures for the rest of the run and its acquisition step is recorded.
``track``
    the paper's dynamic knowledge-acquisition rule (docs/references.md §2.1): experiment
    value ``v`` against the linear target ``p = start + (target - start) * s / S``,
    halve ``n`` above the band, double it below, ``|Δn| <= max_change``, clamp to
    ``[min_n, max_n]``; then ``n`` sequences are taken from the pool of treated
    sequences at index ``i`` with a *true* modular wrap, ``i <- (i + n) mod N``
    (the reference code returns fewer than ``n`` texts at the pool's end).
``budget``
    ``rate`` spans per treated item per window until the next span would take the
    experiment's dynamically injected tokens over ``max_tokens``; then 0 for good.

Shared parts: :mod:`.decision` (:class:`ControllerDecision`), :mod:`.options` (option
schemas, metric ranges), :mod:`.base` (the protocol, the base class, the treated pool,
reading records), :mod:`.acquisition` (exposures to acquisition from the ledger),
:mod:`.registry` (the registry and :func:`build_controller`).

Every controller's state is plain JSON (``state_dict``) and a pure function of the
(all-gathered, hence rank-identical) records it was given, so Composer's rank-0
checkpoint restores it exactly on every rank.

Metrics are assumed to grow as the model learns the payload (every registered
monitor reports ``alternative="greater"``).

Example::

    ctl = build_controller("track", {"metric": "target_probability", "target": 0.08},
                           experiment=exp, metrics_available=["target_probability"],
                           window_steps=100, num_steps=1000)
    decision = ctl.decide(step=100, records=records, experiment=exp, num_steps=1000)
    decision.window, sum(decision.exposures.values())   # ((100, 200), 2)
"""

from __future__ import annotations

from multirun.control.controllers.acquire import AcquireController
from multirun.control.controllers.acquisition import (
    acquisition_record,
    exposures_to_acquisition,
)
from multirun.control.controllers.base import Controller, ControllerBase, treated_pool
from multirun.control.controllers.budget import BudgetController
from multirun.control.controllers.decision import ControllerDecision
from multirun.control.controllers.options import Option, metric_range, parse_options
from multirun.control.controllers.registry import (
    CONTROLLERS,
    build_controller,
    controllers,
)
from multirun.control.controllers.track import TrackController

__all__ = [
    "CONTROLLERS",
    "AcquireController",
    "BudgetController",
    "Controller",
    "ControllerBase",
    "ControllerDecision",
    "Option",
    "TrackController",
    "acquisition_record",
    "build_controller",
    "controllers",
    "exposures_to_acquisition",
    "metric_range",
    "parse_options",
    "treated_pool",
]
