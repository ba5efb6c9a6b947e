"""Monitor cost as a share of training time at the default cadence (target: at most 2%).

Runs the embedded demo (all its experiments and monitors, default cadence) and
prints the wall time spent in monitor evaluations against the whole fit:

    python benchmarks/bench_monitors.py [--set key=value ...]

The demo is short, so fit start and fit end evaluations weigh more than they would
in a long run; the per-evaluation cost is printed so it can be scaled to a real cadence.
"""

from __future__ import annotations

import argparse
import tempfile

from multirun.config import load_config
from multirun.train import prepare_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        run = prepare_run(load_config(None, ["train.save_interval=null", *args.overrides]), progress=False, run_dir=run_dir)
        summary = run.fit()
        run.close()
    monitor, fit = summary["monitor_seconds"], summary["fit_seconds"]
    evaluations = summary["monitor_evaluations"]
    steps = summary["steps_trained"]
    print(f"steps                         {steps}")
    print(f"monitor evaluations           {evaluations} (cadence {run.loaded.config.monitoring.every}, plus fit start and end)")
    print(f"seconds per evaluation        {monitor / max(evaluations, 1):.3f} s")
    print(f"training seconds per step     {(fit - monitor) / max(steps, 1):.4f} s")
    print(f"monitor share of fit time     {100 * monitor / fit:.2f} %  (target <= 2 %)")
    print("seconds by part (all evaluations):")
    for part, seconds in sorted(summary["monitor_seconds_by_part"].items(), key=lambda kv: -kv[1]):
        print(f"  {part:<28}{seconds:8.3f} s")


if __name__ == "__main__":
    main()
