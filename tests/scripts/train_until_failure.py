"""Train a run config and die at a given step: by SIGKILL, or by raising.

    python tests/scripts/train_until_failure.py CONFIG STEP kill|raise

Used by the resume tests: a real process dies mid-run, another resumes it.
"""

from __future__ import annotations

import os
import signal
import sys

from composer.core import Callback, Event, State
from composer.loggers import Logger

from multirun.config import load_config
from multirun.run.trainer import prepare_run


class FailAt(Callback):
    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_START and int(state.timestamp.batch) == self.step:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"planned failure at step {self.step}")


def main() -> None:
    config, step, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    run = prepare_run(load_config(config), extra_callbacks=[FailAt(step, how)], progress=False)
    try:
        run.fit()
    finally:
        run.close()


if __name__ == "__main__":
    main()
