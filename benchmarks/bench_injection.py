"""Injection's share of the CPU demo's step, measured interleaved with and without it in one run.

Trains the embedded demo (run-wide monitors off; the knowledge experiment keeps its own
cadence for its controller, and those evaluations are left out of every figure) with the real
Composer trainer, in alternating blocks of steps: in "with" blocks the callback injects
at ``AFTER_DATALOADER`` as in any run; in "without" blocks that event does nothing (the
step trains on the dataset's rows as they come). Both kinds of block share one process,
one model and one data stream, so machine noise falls on both alike.

Prints the mean step time of each kind of block, the callback's ``AFTER_DATALOADER`` time
per injecting step (row identity, the overwrite, what the ledger keeps) and its share of
the step without injection. The share is of the thread's CPU time: the wall time is printed
beside it, with the steps where it exceeds the CPU time by more than 0.5 ms, because on a
machine with two cores the training thread now and then waits milliseconds for a core
(Streaming's and torch's threads), whichever code it is running then; that wait is not the
injection's cost. Then the callback's time over every event, and the with/without
difference of the step times (paired adjacent blocks, with its standard error: at this
size it is mostly noise, which is why the share is measured directly too). What is
paid once per fit is timed apart: the ledger's flush (at checkpoints, not in the step;
it hashes the overwritten rows kept since the last one), the callback's first call
(batch checks, the first window of steps) and the last step's finish (summary).

    python benchmarks/bench_injection.py [--steps 400] [--block 10] [--repetitions 8] [--ranks 2] [--set k=v ...]

``--ranks 2`` runs the same under Composer's launcher with two processes (gloo) and
prints each rank's injection time per step, with the time and number of collectives
the callback issued per injecting step. ``--repetitions`` raises every experiment's
repetitions (placed uniformly) so that most steps carry spans, the worst case here;
``--set`` scales the model or batch (e.g. ``--set model.n_layer=12``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from multirun.config import load_config
from multirun.kinds.payloads import load_package, resolve_payload_ref
from multirun.run.trainer import prepare_run


class StepClock(Callback):
    """Wall time of each step, from the previous step's BATCH_END to its own (everything in between)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.steps: list[int] = []
        self._last: float | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self._last = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds.append(now - self._last)
            self.steps.append(int(state.timestamp.batch) - 1)
        self._last = now


#: Wall minus thread CPU time beyond which a step's injection counts as having waited.
PREEMPTED = 0.5e-3

#: Events outside a training step (fit start and end, epochs, evaluation): not counted in a step.
OUTSIDE_STEPS = {e for e in Event if "FIT" in e.name or "EPOCH" in e.name or "EVAL" in e.name or "CLOSE" in e.name}


class Interleave:
    """Gates the callback's AFTER_DATALOADER by block and times its events and collectives."""

    def __init__(self, callback: Any, block: int) -> None:
        self.callback, self.block = callback, block
        self.injection: dict[int, float] = {}  # step -> AFTER_DATALOADER seconds ("with" steps)
        self.injection_cpu: dict[int, float] = {}  # the same in this thread's CPU time (robust to a busy machine)
        self.events: dict[int, float] = {}  # step -> seconds over every event of the callback
        self.collectives: dict[int, int] = {}
        self.collective_seconds: dict[int, float] = {}
        self.flush_seconds = 0.0
        self.evaluation_seconds: dict[int, float] = {}
        self._step = -1
        self._inside = False
        inner_run_event = callback.run_event
        inner_gather = dist.all_gather

        def run_event(event: Event, state: State, logger: Logger) -> None:
            if event == Event.AFTER_DATALOADER:
                self._step = int(state.timestamp.batch)
                if not self.injecting(self._step):
                    return None
            started, started_cpu = time.perf_counter(), time.thread_time()
            self._inside = event == Event.AFTER_DATALOADER
            try:
                return inner_run_event(event, state, logger)
            finally:
                self._inside = False
                spent = time.perf_counter() - started
                if self.injecting(self._step) and event not in OUTSIDE_STEPS:
                    self.events[self._step] = self.events.get(self._step, 0.0) + spent
                    if event == Event.AFTER_DATALOADER:
                        self.injection[self._step] = spent
                        self.injection_cpu[self._step] = time.thread_time() - started_cpu

        def all_gather(*args: Any, **kwargs: Any) -> Any:
            if not self._inside:
                return inner_gather(*args, **kwargs)
            started = time.perf_counter()
            try:
                return inner_gather(*args, **kwargs)
            finally:
                self.collectives[self._step] = self.collectives.get(self._step, 0) + 1
                self.collective_seconds[self._step] = (
                    self.collective_seconds.get(self._step, 0.0) + time.perf_counter() - started
                )

        inner_flush = callback._flush

        def flush() -> None:
            started = time.perf_counter()
            inner_flush()
            self.flush_seconds += time.perf_counter() - started

        inner_evaluate = callback._evaluate

        def evaluate(*args: Any, **kwargs: Any) -> None:
            # A monitor evaluation (an experiment's own ``monitor.every``) is not injection:
            # bench_monitors.py measures it; its time is taken out of the callback's events.
            started = time.perf_counter()
            try:
                inner_evaluate(*args, **kwargs)
            finally:
                self.evaluation_seconds[self._step] = (
                    self.evaluation_seconds.get(self._step, 0.0) + time.perf_counter() - started
                )

        callback.run_event = run_event
        callback._flush = flush
        callback._evaluate = evaluate
        dist.all_gather = all_gather  # the callback's module reads it from composer.utils.dist

    def injecting(self, step: int) -> bool:
        return (step // self.block) % 2 == 1  # blocks 1, 3, 5, ...: block 0 (warm-up) is "without"


def configured(steps: int, repetitions: float, overrides: list[str]) -> Any:
    base = [
        f"train.max_duration={steps}ba",
        "train.save_interval=null",
        "injection.max_modified_fraction=0.25",
        "monitoring.every=null",
        "monitoring.at_fit_start=false",
        "monitoring.at_fit_end=false",
        *overrides,
    ]
    loaded = load_config(None, base)
    for index, spec in enumerate(loaded.config.experiments):
        kind = load_package(resolve_payload_ref(spec.payload, base_dir=loaded.base_dir)).kind
        if kind != "contamination":  # its repetition groups set its doses
            base.append(f"experiments.{index}.repetitions={repetitions}")
        base.append(f"experiments.{index}.placement={{mode: uniform}}")
    return load_config(None, base)


def measure(steps: int, block: int, repetitions: float, overrides: list[str], run_dir: str) -> dict[str, Any]:
    """One interleaved run on this process's rank; its figures."""
    loaded = configured(steps, repetitions, overrides)
    clock = StepClock()
    run = prepare_run(loaded, extra_callbacks=[clock], progress=False, run_dir=run_dir)
    gate = Interleave(run.callback, block)
    run.fit()
    run.close()
    # Block 0 is warm-up; compare the rest, and adjacent (without, with) block pairs.
    # Monitor evaluations are not injection: their time is taken out of the steps they end.
    timed = [(s, t - gate.evaluation_seconds.get(s, 0.0)) for s, t in zip(clock.steps, clock.seconds) if s >= block]
    with_ = [t for s, t in timed if gate.injecting(s)]
    without = [t for s, t in timed if not gate.injecting(s)]
    pairs = []
    for first in range(2 * block, steps - 2 * block + 1, 2 * block):
        off = [t for s, t in timed if first <= s < first + block]
        on = [t for s, t in timed if first - block <= s < first]
        if off and on:
            pairs.append(statistics.mean(on) - statistics.mean(off))
    # The callback's first call checks the batch and prepares its first window of steps:
    # a cost paid once per fit, reported apart from the per-step figures. The last step's
    # BATCH_END finishes the run (summary), also once.
    called = sorted(gate.injection)
    first_call = called[0]
    spans_steps = [s for s in called[1:] if s >= block]
    per_step_events = [s for s in spans_steps if s != steps - 1]
    return {
        "rank": dist.get_global_rank(),
        "world_size": dist.get_world_size(),
        "steps_with": len(with_),
        "steps_without": len(without),
        "step_with": statistics.mean(with_),
        "step_without": statistics.mean(without),
        "injection": statistics.mean(gate.injection[s] for s in spans_steps),
        "injection_cpu": statistics.mean(gate.injection_cpu[s] for s in spans_steps),
        "injection_median": statistics.median(gate.injection[s] for s in spans_steps),
        "injection_cpu_median": statistics.median(gate.injection_cpu[s] for s in spans_steps),
        # Wall time beyond CPU time is time the thread waited: for a core (preempted: on a
        # 2-vCPU machine some steps lose milliseconds to other threads whatever they run),
        # or, with several processes, for the other ranks in the row identity's collective.
        "preempted": sum(gate.injection[s] - gate.injection_cpu[s] > PREEMPTED for s in spans_steps),
        "events": statistics.mean(gate.events[s] - gate.evaluation_seconds.get(s, 0.0) for s in per_step_events),
        "evaluations": len(gate.evaluation_seconds),
        "first_call": gate.injection[first_call],
        "collectives": sum(gate.collectives.get(s, 0) for s in spans_steps) / max(len(spans_steps), 1),
        "collective_seconds": sum(gate.collective_seconds.get(s, 0.0) for s in spans_steps) / max(len(spans_steps), 1),
        "difference": statistics.mean(pairs) if pairs else float("nan"),
        "difference_se": statistics.stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else float("nan"),
        "flush_seconds": gate.flush_seconds,
        "spans_planned": len(run.plan.spans),
    }


def report(results: list[dict[str, Any]]) -> None:
    first = results[0]
    print(
        f"processes                     {first['world_size']} (steps {first['steps_with']} with, "
        f"{first['steps_without']} without, interleaved)"
    )
    print(f"spans planned                 {first['spans_planned']}")
    for r in results:
        tag = f"rank {r['rank']}: " if len(results) > 1 else ""
        share, events = r["injection_cpu"] / r["step_without"], r["events"] / r["step_without"]
        print(f"{tag}mean step without injection  {1e3 * r['step_without']:.2f} ms")
        print(f"{tag}mean step with injection     {1e3 * r['step_with']:.2f} ms")
        print(
            f"{tag}injection per step           {1e3 * r['injection_cpu']:.3f} ms (AFTER_DATALOADER, thread CPU time)"
        )
        print(f"{tag}injection share of step      {100 * share:.3f} %  (target <= 0.3 %)")
        print(
            f"{tag}  CPU median {1e3 * r['injection_cpu_median']:.3f} ms; wall mean {1e3 * r['injection']:.3f} ms = "
            f"{100 * r['injection'] / r['step_without']:.3f} %, median {1e3 * r['injection_median']:.3f} ms = "
            f"{100 * r['injection_median'] / r['step_without']:.3f} %; "
            f"{r['preempted']} steps waited > {1e3 * PREEMPTED:.1f} ms (for a core, or for the other ranks' collective)"
        )
        print(
            f"{tag}callback, every event        {1e3 * r['events']:.3f} ms = {100 * events:.3f} % of the step "
            f"({r['evaluations']} monitor evaluations left out: bench_monitors.py)"
        )
        print(f"{tag}collectives per step         {r['collectives']:.2f} ({1e3 * r['collective_seconds']:.3f} ms)")
        print(
            f"{tag}step difference with-without {1e3 * r['difference']:+.3f} ms +- {1e3 * r['difference_se']:.3f} "
            f"({100 * r['difference'] / r['step_without']:+.2f} % of the step; paired blocks)"
        )
        print(f"{tag}first call (once: batch checks, first window) {1e3 * r['first_call']:.2f} ms")
        print(f"{tag}ledger flush (once, at end)  {1e3 * r['flush_seconds']:.2f} ms")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--block", type=int, default=10, help="steps per block (with and without alternate)")
    parser.add_argument("--repetitions", type=float, default=8.0, help="repetitions per treated item")
    parser.add_argument("--ranks", type=int, default=1, help="processes (gloo on CPU, Composer's launcher)")
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)  # each rank's figures (under the launcher)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="config override, e.g. model.n_layer=12 (repeatable)",
    )
    args = parser.parse_args()
    if args.ranks > 1 and args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            command = [
                sys.executable, "-m", "composer.cli.launcher", "-n", str(args.ranks),
                "--master_port", str(_free_port()), "--stdout", f"{tmp}/out_{{rank}}.log",
                "--stderr", f"{tmp}/err_{{rank}}.log", __file__,
                "--steps", str(args.steps), "--block", str(args.block), "--repetitions", str(args.repetitions),
                "--ranks", str(args.ranks), "--out", tmp, *(f"--set={o}" for o in args.overrides),
            ]  # fmt: skip
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit("".join(p.read_text() for p in sorted(Path(tmp).glob("err_*.log")))[-4000:])
            report([json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank-*.json"))])
        return
    with tempfile.TemporaryDirectory() as run_dir:
        if args.out is not None:  # every rank the same run directory (rank 0's)
            run_dir = str(args.out / "run")
        result = measure(args.steps, args.block, args.repetitions, args.overrides, run_dir)
    if args.out is not None:
        (args.out / f"rank-{result['rank']}.json").write_text(json.dumps(result))
    else:
        report([result])


if __name__ == "__main__":
    main()
