"""Monitor cost as a share of training time at the default cadence (target: at most 2%).

Runs the embedded demo (all its experiments and monitors) and prints where the time
of its monitor evaluations goes, against the training time around them:

    python benchmarks/bench_monitors.py [--set key=value ...]

Figures, all from the same run:

* the share of the demo's fit time, as configured: one evaluation at fit start, every
  monitor at the default cadence (``monitoring.every``, 200 steps) and at fit end, and
  the controlled knowledge experiment's own, finer cadence (its controller decides after
  each of those evaluations);
* the share at the default cadence alone: the run's full evaluations (every monitor
  and the held-out loss) against the training time of one cadence interval. This is
  the figure that carries over to a longer run, where fit start weighs nothing;
* one full evaluation on the trained model in training steps and in probe tokens
  against the tokens one step trains: the evaluation's work is its probe tokens, so at
  a real batch (millions of tokens per step) the same probes cost a fraction of a step.

Monitor time includes logging the records and the controllers' decisions.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from multirun.config import cadence_steps, load_config
from multirun.measure.live_model import unwrap_model
from multirun.measure.runner import MonitorRunner
from multirun.run.trainer import TrainingRun, prepare_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        run = prepare_run(
            load_config(None, ["train.save_interval=null", *args.overrides]), progress=False, run_dir=run_dir
        )
        summary = run.fit()
        runner = _monitors(run)
        timeline = list(runner.evaluation_seconds)
        monitored = len(runner.entries)
        full_evaluation, probe_tokens = _time_full_evaluation(run)
        config = run.loaded.config
        run.close()

    monitor, fit, steps = summary["monitor_seconds"], summary["fit_seconds"], summary["steps_trained"]
    step_seconds = (fit - monitor) / max(steps, 1)
    every = cadence_steps(config.monitoring.every)
    fit_start = [seconds for step, _, seconds in timeline if step == 0]
    scheduled = [seconds for step, scored, seconds in timeline if step > 0 and scored == monitored]
    controller = [seconds for step, scored, seconds in timeline if step > 0 and scored < monitored]

    print(f"demo: {steps} steps of {step_seconds * 1000:.1f} ms, {len(timeline)} monitor evaluations")
    print(f"monitor share of fit time, as configured   {100 * monitor / fit:5.2f} %  ({monitor:.2f} s of {fit:.1f} s)")
    for label, seconds in (
        ("  fit start", fit_start),
        (f"  every {every} steps and fit end" if every else "  fit end", scheduled),
        ("  finer cadences of controlled experiments", controller),
    ):
        print(f"{label:<45}{100 * sum(seconds) / fit:5.2f} %  ({len(seconds)} x {_median(seconds):.3f} s)")
    if every and scheduled:
        interval = every * step_seconds
        print(
            f"share at the default cadence ({every} steps)      {100 * _median(scheduled) / interval:5.2f} %  "
            f"(target <= 2 %; median full evaluation in the run / {interval:.1f} s of training)"
        )
    tokens_per_step = config.train.global_batch_size * config.data.sequence_length
    print(
        f"one full evaluation, trained model           {full_evaluation:.3f} s = {full_evaluation / step_seconds:.1f} training steps"
    )
    print(
        f"  probe tokens                               {probe_tokens} = {probe_tokens / tokens_per_step:.1f} x the "
        f"{tokens_per_step} tokens one step trains"
    )
    print("seconds by part (all evaluations):")
    for part, seconds in sorted(summary["monitor_seconds_by_part"].items(), key=lambda kv: -kv[1]):
        print(f"  {part:<28}{seconds:8.3f} s")


def _monitors(run: TrainingRun) -> MonitorRunner:
    """The run's monitor runner; a config without monitors has nothing to time."""
    if run.callback.monitors is None:
        raise SystemExit("the run has no monitors to time")
    return run.callback.monitors


def _time_full_evaluation(run: TrainingRun, repeats: int = 3) -> tuple[float, int]:
    """Median seconds of one evaluation of every monitor and the held-out loss on the
    trained model, and the tokens its forward passes take in."""
    runner = _monitors(run)
    module = unwrap_model(run.trainer.state.model)
    tokens = []

    def count(_module: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
        tokens.append(kwargs["input_ids"].numel())

    handle = module.register_forward_pre_hook(count, with_kwargs=True)
    try:
        runner.evaluate(module, step=0, when="benchmark")
    finally:
        handle.remove()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.evaluate(module, step=0, when="benchmark")
        seconds.append(time.perf_counter() - started)
    return _median(seconds), sum(tokens)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


if __name__ == "__main__":
    main()
