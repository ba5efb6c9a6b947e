"""Plain progress lines for logs: one line per ``train.log_interval``, no carriage returns.

Composer's progress bar redraws one terminal line with carriage returns, which in a log
file is noise; its ``ConsoleLogger`` prints every logged metric (monitors included) as a
block. A run whose output is not a terminal, or run with ``--no-progress``, gets instead
one line per interval from :class:`ProgressLines`::

    step 40/200 (20%)  loss 3.912  12,800 tok/s  elapsed 0:00:31  ETA 0:02:04

Which interval fires is decided by Composer's own interval scheduler
(:func:`composer.utils.misc.create_interval_scheduler`), as for its checkpoints.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO

from composer.core import Callback, Event, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

__all__ = ["ProgressLines", "use_progress_bar"]


def use_progress_bar(progress: bool, stream: TextIO | None = None) -> bool:
    """Composer's progress bar only when asked for and drawn on a terminal."""
    stream = sys.stdout if stream is None else stream
    return progress and stream.isatty()


class ProgressLines(Callback):
    """Prints ``step, loss, tokens/s, elapsed, ETA`` every ``interval`` on rank 0.

    Args:
        interval: a Composer time string (``"10ba"``, ``"1ep"``...), ``train.log_interval``.
        tokens_per_step: tokens of one global batch (for tokens/s).
        stream: where the lines go (stdout by default), flushed at every line.
    """

    def __init__(self, interval: str, *, tokens_per_step: int, stream: TextIO | None = None) -> None:
        self._due = create_interval_scheduler(interval, include_end_of_training=True, checkpoint_events=False)
        self.tokens_per_step = tokens_per_step
        self.stream = stream
        self._start: float | None = None
        self._start_step = 0

    def fit_start(self, state: State, logger: Logger) -> None:
        self._start = time.monotonic()
        self._start_step = int(state.timestamp.batch)  # a resumed run counts its rate from here

    def batch_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0 or not self._due(state, Event.BATCH_END):
            return
        print(self.line(state), file=self.stream or sys.stdout, flush=True)

    def line(self, state: State) -> str:
        """The progress line of the step just finished."""
        step = int(state.timestamp.batch)
        total = _total_steps(state)
        elapsed = time.monotonic() - (self._start if self._start is not None else time.monotonic())
        done = step - self._start_step
        parts = [f"step {step}/{total} ({step / total:.0%})" if total else f"step {step}"]
        losses = state.total_loss_dict  # all-reduced over ranks
        if losses:
            loss = losses.get("loss/train/total", next(iter(losses.values())))
            parts.append(f"loss {float(loss):.4g}")
        if done > 0 and elapsed > 0:
            parts.append(f"{done * self.tokens_per_step / elapsed:,.0f} tok/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if total and done > 0 and elapsed > 0:
            parts.append(f"ETA {_clock(elapsed / done * max(total - step, 0))}")
        return "  ".join(parts)


def _total_steps(state: State) -> int | None:
    duration = state.max_duration
    if duration is None or duration.unit != TimeUnit.BATCH:
        return None
    return int(duration.value)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
