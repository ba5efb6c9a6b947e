"""What a controller decides at one evaluation: spans per item for the next window."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from multirun.errors import ResumeError

__all__ = ["ControllerDecision"]


@dataclass
class ControllerDecision:
    """What one controller decided at one evaluation.

    Attributes:
        step: evaluation step (completed steps) at which it was taken.
        experiment: the experiment's name.
        controller: the controller's name.
        window: half-open step range ``[step, step + window_steps)`` clipped to the
            run; the exposures go there. Empty (``lo == hi``) at the run's end.
        exposures: treated item id -> number of spans to place in the window
            (0 = do not inject it in this window; listed for every treated item).
        sequences: item id -> the experiment-wide sequence indices (indices into
            ``seq_lengths``) to inject, ``len == exposures[item]``.
        info: plain JSON (metric values, targets, acquired items, rates, ...) for
            ``controller.jsonl`` and the logger.

    Example:
        >>> d = ControllerDecision(3, "facts", "budget", (3, 5), {"a": 1}, {"a": [0]}, {"tokens": 8})
        >>> ControllerDecision.from_dict(d.to_dict()) == d
        True
    """

    step: int
    experiment: str
    controller: str
    window: tuple[int, int]
    exposures: dict[str, int]
    sequences: dict[str, list[int]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_spans(self) -> int:
        """Total spans requested."""
        return int(sum(self.exposures.values()))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the decision log in the checkpoint and ``controller.jsonl``)."""
        return {
            "step": int(self.step),
            "experiment": self.experiment,
            "controller": self.controller,
            "window": [int(self.window[0]), int(self.window[1])],
            "exposures": {str(k): int(v) for k, v in self.exposures.items()},
            "sequences": {str(k): [int(s) for s in v] for k, v in self.sequences.items()},
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ControllerDecision:
        """Inverse of :meth:`to_dict`; raises :class:`ResumeError` on a malformed entry."""
        try:
            lo, hi = (int(x) for x in d["window"])
            return cls(
                step=int(d["step"]),
                experiment=str(d["experiment"]),
                controller=str(d["controller"]),
                window=(lo, hi),
                exposures={str(k): int(v) for k, v in d["exposures"].items()},
                sequences={str(k): [int(s) for s in v] for k, v in d["sequences"].items()},
                info=dict(d.get("info", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ResumeError(
                f"malformed controller decision {dict(d)!r:.200}: {exc!r}", key="controller_decisions"
            ) from None

    def scalars(self) -> dict[str, float | int | bool]:
        """The top-level numeric and boolean entries of ``info`` (for the logger and plots)."""
        return {k: v for k, v in self.info.items() if isinstance(v, (bool, int, float))}

    def log_record(self, *, placed: int, unplaced: int, tokens: int) -> dict[str, Any]:
        """One line of ``controller.jsonl``.

        ``decision`` and ``state`` hold only scalars, so the report plots a handful
        of series per experiment; ``info``, ``exposures`` and ``window`` keep the detail.
        """
        return {
            "step": int(self.step),
            "experiment": self.experiment,
            "controller": self.controller,
            "window": [int(self.window[0]), int(self.window[1])],
            "decision": {
                "spans": self.num_spans,
                "tokens": int(tokens),
                "placed": int(placed),
                "unplaced": int(unplaced),
            },
            "state": self.scalars(),
            "exposures": {str(k): int(v) for k, v in self.exposures.items()},
            "info": self.info,
        }
