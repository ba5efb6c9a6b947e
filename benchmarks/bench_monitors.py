"""Monitor cost as a share of training time at the default cadence (target: at most 2%).

Runs the embedded demo (all its experiments and monitors, default cadence) and
prints the wall time spent in monitor evaluations against the whole fit:

    python benchmarks/bench_monitors.py [--set key=value ...]

The demo is short, so fit start and fit end evaluations weigh more than they would
in a long run. The figure that carries over to other runs is the cost of one full
evaluation in training steps: at a cadence of N steps, scheduled evaluations cost
about that many steps out of every N.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from multirun.config import cadence_steps, load_config
from multirun.monitoring import unwrap_model
from multirun.train import TrainingRun, prepare_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        run = prepare_run(load_config(None, ["train.save_interval=null", *args.overrides]), progress=False, run_dir=run_dir)
        summary = run.fit()
        timeline = list(run.callback.monitors.evaluation_seconds)
        monitored = len(run.callback.monitors.entries)
        full_evaluation = _time_full_evaluation(run)
        run.close()
    monitor, fit = summary["monitor_seconds"], summary["fit_seconds"]
    evaluations = summary["monitor_evaluations"]
    steps = summary["steps_trained"]
    print(f"steps                         {steps}")
    print(f"monitor evaluations           {evaluations} (cadence {run.loaded.config.monitoring.every}, plus fit start and end)")
    print(f"seconds per evaluation        {monitor / max(evaluations, 1):.3f} s")
    step_seconds = (fit - monitor) / max(steps, 1)
    print(f"training seconds per step     {step_seconds:.4f} s")
    every = cadence_steps(run.loaded.config.monitoring.every)
    print(f"monitor share of fit time     {100 * monitor / fit:.2f} %  (target <= 2 %)")
    print(f"one full evaluation           {full_evaluation:.3f} s = {full_evaluation / step_seconds:.1f} training steps")
    if every:
        print(f"  that per cadence interval   {100 * full_evaluation / (every * step_seconds):.2f} % ({every} steps)")
    full = [seconds for _, scored, seconds in timeline[1:] if scored == monitored]
    print(f"in the run: fit start {timeline[0][2]:.3f} s, later full evaluations "
          + (f"median {sorted(full)[len(full) // 2]:.3f} s" if full else "none"))
    print("seconds by part (all evaluations):")
    for part, seconds in sorted(summary["monitor_seconds_by_part"].items(), key=lambda kv: -kv[1]):
        print(f"  {part:<28}{seconds:8.3f} s")


def _time_full_evaluation(run: TrainingRun, repeats: int = 3) -> float:
    """Median seconds of one evaluation of every monitor and the held-out loss on the trained model."""
    runner = run.callback.monitors
    module = unwrap_model(run.trainer.state.model)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.evaluate(module, step=0, when="benchmark")
        seconds.append(time.perf_counter() - started)
    return sorted(seconds)[repeats // 2]


if __name__ == "__main__":
    main()
