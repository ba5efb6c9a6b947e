"""Injection cost per step as a fraction of the demo's step time (target: under 1%).

Runs the embedded demo config for a few steps with the real Composer trainer and
compares the wall time spent in multirun's AFTER_DATALOADER work (row mapping,
token overwrite, ledger append) with the wall time of the training steps.

    python benchmarks/bench_injection.py [--steps 200] [--repetitions 8] [--set key=value ...]

``--repetitions`` raises every experiment's repetitions (placed uniformly) so that most
steps carry spans, the worst case for this measurement; ``--set`` scales the model or
batch (e.g. ``--set model.n_layer=12``) to measure the share at a realistic step time.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from composer.core import Callback, Event, State
from composer.loggers import Logger

from multirun.config import load_config
from multirun.kinds.payloads import load_package, resolve_payload_ref
from multirun.run.trainer import prepare_run


class StepTimer(Callback):
    """Wall time from AFTER_DATALOADER to BATCH_END of each step."""

    def __init__(self) -> None:
        self.total = 0.0
        self.steps = 0
        self._start = 0.0

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_START:
            self._start = time.perf_counter()
        elif event == Event.BATCH_END:
            self.total += time.perf_counter() - self._start
            self.steps += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repetitions", type=float, default=8.0, help="repetitions per treated item")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="config override, e.g. model.n_layer=12 (repeatable)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [
            f"train.max_duration={args.steps}ba",
            "train.save_interval=null",
            "injection.max_modified_fraction=0.25",
            *args.overrides,
        ]
        loaded = load_config(None, overrides)
        for index, spec in enumerate(loaded.config.experiments):
            kind = load_package(resolve_payload_ref(spec.payload, base_dir=loaded.base_dir)).kind
            if kind != "contamination":  # its repetition groups set its doses
                overrides.append(f"experiments.{index}.repetitions={args.repetitions}")
            overrides.append(f"experiments.{index}.placement={{mode: uniform}}")
        loaded = load_config(None, overrides)
        timer = StepTimer()
        run = prepare_run(loaded, extra_callbacks=[timer], progress=False, run_dir=run_dir)
        planned = len(run.plan.spans)
        run.fit()
        run.close()
        injection = run.callback.injection_seconds
        # BATCH_START..BATCH_END excludes AFTER_DATALOADER, so add injection back for the full step.
        step_time = timer.total + injection
        print(f"steps                       {timer.steps}")
        print(f"spans injected              {planned}")
        print(f"mean step time              {1e3 * step_time / max(timer.steps, 1):.2f} ms")
        print(f"mean injection time / step  {1e3 * injection / max(timer.steps, 1):.3f} ms")
        print(f"injection share of step     {100 * injection / step_time:.3f} %  (target < 1 %)")


if __name__ == "__main__":
    main()
