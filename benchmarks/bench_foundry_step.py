"""The callback's cost per step on the llm-foundry path, as a fraction of the step.

Trains ``experiments/foundry/mpt.yaml`` through llm-foundry's own ``train`` (in this
process) with and without ``callbacks: multirun``, alternately, on the data of
``experiments/foundry/prepare.py``; monitors are off so that only injection is measured
(row identity, the overwrite, the recount of llm-foundry's derived keys, the ledger).
Prints the median step time of each and their ratio, and the callback's own
``AFTER_DATALOADER`` time (``summary.json``'s ``injection_seconds_rank0``) per step as a
share of the step without it.

    python benchmarks/bench_foundry_step.py [--steps 400] [--rounds 2] [--data DIR] [key=value ...]

Extra ``key=value`` arguments are llm-foundry overrides (e.g. ``model.d_model=768
model.n_layers=12 model.n_heads=12 device_train_microbatch_size=8`` for GPT-2-small
shape on a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import yaml
from composer.core import Callback, State
from composer.loggers import Logger

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "experiments" / "foundry"
TIMER = "bench_step_timer"


class StepTimer(Callback):
    """Wall time of each step, from BEFORE_DATALOADER to BATCH_END (injection included)."""

    seconds: ClassVar[list[float]] = []

    def __init__(self) -> None:
        self._start = 0.0

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self._start = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        StepTimer.seconds.append(time.perf_counter() - self._start)


def train_once(data: Path, out: Path, *, steps: int, with_multirun: bool, overrides: list[str]) -> dict[str, Any]:
    """One llm-foundry run; its step times (the first 5 dropped: warm-up) and multirun's summary."""
    from llmfoundry.command_utils.train import train_from_yaml
    from llmfoundry.registry import callbacks

    config = yaml.safe_load((data / "multirun.yaml").read_text())
    config["monitoring"] = {"every": None, "at_fit_start": False, "at_fit_end": False, "heldout_rows": 0}
    for experiment in config["experiments"]:
        experiment.pop("controller", None)  # decisions follow monitors, which are off
        experiment.pop("monitor", None)
    (out / "multirun.yaml").write_text(yaml.safe_dump(config))
    for name in ("tokenizer", "mds"):
        link = out / name
        if not link.exists() and (data / name).exists():
            link.symlink_to((data / name).resolve())

    callbacks.register(TIMER, func=StepTimer)
    StepTimer.seconds = []
    run = out / ("with" if with_multirun else "without")
    doc = yaml.safe_load((EXAMPLE / "mpt.yaml").read_text())
    multirun_block = {**doc["callbacks"]["multirun"], "config": str(out / "multirun.yaml")}
    # The timer alone, or multirun and the timer: no other callback's work in the step.
    doc["callbacks"] = {"multirun": multirun_block, TIMER: {}} if with_multirun else {TIMER: {}}
    for key in ("save_folder", "save_interval", "autoresume"):  # no checkpoints in a timing run
        doc.pop(key, None)
    yaml_path = out / "run.yaml"
    yaml_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    args = [
        f"variables.data_root={data}",
        f"variables.save_root={run}",
        f"max_duration={steps}ba",
        "console_log_interval=100000ba",
        *overrides,
    ]
    trainer = train_from_yaml(str(yaml_path), args)
    trainer.close()
    summary_path = run / doc["variables"]["run_name"] / "multirun" / "summary.json"
    summary = json.loads(summary_path.read_text()) if with_multirun else {}
    return {"steps": StepTimer.seconds[5:], "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="the example's experiments are sized for 400")
    parser.add_argument("--rounds", type=int, default=2, help="with/without pairs, alternated")
    parser.add_argument("--data", type=Path, help="prepare.py's output (default: made in a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="llm-foundry key=value overrides")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            subprocess.run(
                [sys.executable, str(EXAMPLE / "prepare.py"), str(data), "--max-bytes", "400000"],
                check=True,
                capture_output=True,
            )
        times: dict[bool, list[float]] = {True: [], False: []}
        injection: list[float] = []
        for round_ in range(args.rounds):
            for with_multirun in (False, True):
                out = Path(tmp) / f"round{round_}"
                out.mkdir(exist_ok=True)
                result = train_once(
                    data.resolve(), out, steps=args.steps, with_multirun=with_multirun, overrides=args.overrides
                )
                times[with_multirun].extend(result["steps"])
                if with_multirun:
                    injection.append(result["summary"]["injection_seconds_rank0"] / args.steps)
        without, with_ = statistics.median(times[False]), statistics.median(times[True])
        per_step = statistics.mean(injection)
        print(f"llm-foundry step, median over {len(times[False])} steps: {without * 1e3:.2f} ms without multirun")
        print(f"                                                  {with_ * 1e3:.2f} ms with multirun")
        print(f"with / without: {with_ / without:.3f}")
        print(f"multirun AFTER_DATALOADER per step: {per_step * 1e3:.3f} ms = {per_step / without:.2%} of the step")


if __name__ == "__main__":
    main()
