"""One full monitor evaluation in training steps, at the demo's shape and at GPT-2-small's.

Trains the embedded demo (all its experiments and monitors) for a few steps with the real
Composer trainer and, after some of those steps, runs one full evaluation: every
monitor and the held-out loss, as at fit start, at each ``monitoring.every`` and at fit
end (records written to ``metrics.jsonl`` and fsynced, Holm included). Steps and
evaluations alternate in the same run, so both see the same machine:

    python benchmarks/bench_monitors.py [--shape demo] [--shape gpt2-small] [--set key=value ...]

Per shape it prints the median training step (from ``BEFORE_DATALOADER`` to
``BATCH_END``: data, injection, forward, backward, optimizer) at the run's global
batch, the median evaluation, and their ratio, **the evaluation cost in training
steps**; then the forward passes and probe tokens of one evaluation against the tokens
one step trains, and the seconds of each part (median over evaluations).

Shapes: ``demo`` is the demo config as it is (2 layers, 64 wide); ``gpt2-small`` the
same run at GPT-2-small's shape (12 layers, 12 heads, 768 wide; the byte vocabulary).
On CPU a GPT-2-small step takes seconds and an evaluation tens of seconds, so that
shape runs 1 evaluation between 3 steps by default (about a minute on an idle
two-core machine). ``--set`` applies to every shape (``benchmarks/gpu_check.py`` sets
the GPU geometry: ``data.sequence_length=512 train.global_batch_size=64
train.precision=amp_bf16``). On a GPU every timing starts and ends synchronised.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from composer.core import Callback, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger

from multirun.config import cadence_steps, load_config
from multirun.measure.live_model import unwrap_model
from multirun.measure.runner import MonitorRunner
from multirun.run.trainer import prepare_run

#: Config overrides of each shape.
SHAPES: dict[str, list[str]] = {
    "demo": [],
    "gpt2-small": ["model.n_layer=12", "model.n_head=12", "model.n_embd=768"],
}
#: (evaluations, timed steps) per shape when not given.
DEFAULT_COUNTS: dict[str, tuple[int, int]] = {"demo": (5, 10), "gpt2-small": (1, 2)}
#: No evaluation inside the timed steps but the benchmark's own.
QUIET = ["train.save_interval=null", "monitoring.at_fit_start=false", "monitoring.at_fit_end=false"]


@dataclass
class Figures:
    """What one shape's run measured."""

    shape: str
    step_seconds: list[float] = field(default_factory=list)
    evaluation_seconds: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)
    forward_passes: int = 0
    probe_tokens: int = 0
    tokens_per_step: int = 0
    every: int | None = None  # the run's cadence in steps
    device: str = ""

    @property
    def step(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def evaluation(self) -> float:
        return statistics.median(self.evaluation_seconds)

    @property
    def in_steps(self) -> float:
        """The evaluation cost in training steps (medians)."""
        return self.evaluation / self.step

    @property
    def in_steps_best(self) -> float:
        """The same from the fastest of each: on a shared machine, the least disturbed."""
        return min(self.evaluation_seconds) / min(self.step_seconds)


class Interleaved(Callback):
    """Times every training step; after each timed step, while evaluations remain, one
    full evaluation of the run's monitors (timed on its own, outside the step).

    The first ``warmup`` steps are not timed and followed by no evaluation (allocator,
    kernel selection and the optimizer's state are set up there).
    """

    def __init__(self, figures: Figures, runner: Callable[[], MonitorRunner], *, evaluations: int, warmup: int = 1):
        self.figures = figures
        self.runner = runner
        self.evaluations = evaluations
        self.warmup = warmup
        self._steps = 0
        self._started = 0.0

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BEFORE_DATALOADER:
            self._started = _now()
        elif event == Event.BATCH_END:
            seconds = _now() - self._started
            self._steps += 1
            if self._steps <= self.warmup:
                return
            self.figures.step_seconds.append(seconds)
            if len(self.figures.evaluation_seconds) < self.evaluations:
                self._evaluate(state)

    def _evaluate(self, state: State) -> None:
        runner = self.runner()
        module = unwrap_model(state.model)
        tokens: list[int] = []

        def count(_module: torch.nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
            tokens.append(kwargs["input_ids"].numel())

        handle = module.register_forward_pre_hook(count, with_kwargs=True)
        before = dict(runner.seconds_by_part)
        started = _now()
        try:
            runner.evaluate(
                module, step=0, when="benchmark", precision_context=lambda: get_precision_context(state.precision)
            )
        finally:
            handle.remove()
        self.figures.evaluation_seconds.append(_now() - started)
        self.figures.parts.append({k: v - before.get(k, 0.0) for k, v in runner.seconds_by_part.items()})
        self.figures.forward_passes, self.figures.probe_tokens = len(tokens), sum(tokens)


def measure(shape: str, overrides: list[str], *, evaluations: int, steps: int) -> Figures:
    """Train ``1 + steps`` steps of the demo at ``shape``, with ``evaluations`` full
    evaluations after the first timed steps."""
    figures = Figures(shape)
    with tempfile.TemporaryDirectory() as run_dir:
        loaded = load_config(None, [*QUIET, *SHAPES[shape], *overrides])
        holder: dict[str, MonitorRunner] = {}
        timer = Interleaved(figures, lambda: holder["runner"], evaluations=evaluations)
        run = prepare_run(loaded, extra_callbacks=[timer], progress=False, run_dir=run_dir)
        if run.callback.monitors is None:
            raise SystemExit("the run has no monitors to time")
        holder["runner"] = run.callback.monitors
        config = run.loaded.config
        figures.tokens_per_step = config.train.global_batch_size * config.data.sequence_length
        figures.every = cadence_steps(config.monitoring.every)
        figures.device = str(run.trainer.state.device.name)
        try:
            run.trainer.fit(duration=f"{1 + max(steps, evaluations)}ba")
        finally:
            run.close()
    return figures


def report(f: Figures) -> None:
    """Print one shape's figures."""
    print(
        f"{f.shape} ({f.device}): one full evaluation = {f.in_steps:.2f} training steps  "
        f"(median {f.evaluation:.3f} s of {len(f.evaluation_seconds)}; step median {f.step:.3f} s of {len(f.step_seconds)})"
    )
    print(f"  fastest evaluation / fastest step: {f.in_steps_best:.2f} training steps")
    print(
        f"  {f.forward_passes} forward passes, {f.probe_tokens} probe tokens = {f.probe_tokens / f.tokens_per_step:.1f} x "
        f"the {f.tokens_per_step} tokens one step trains"
    )
    if f.every:
        print(f"  share of training at a full evaluation every {f.every} steps: {100 * f.in_steps / f.every:.2f} %")
    names = sorted({k for p in f.parts for k in p}, key=lambda k: -statistics.median(p.get(k, 0.0) for p in f.parts))
    for name in names:
        seconds = statistics.median(p.get(name, 0.0) for p in f.parts)
        print(f"    {name:<28}{seconds:8.3f} s  {seconds / f.step:6.2f} steps")
    rest = statistics.median(e - sum(p.values()) for e, p in zip(f.evaluation_seconds, f.parts))
    print(f"    {'records, Holm, metrics.jsonl':<28}{rest:8.3f} s  {rest / f.step:6.2f} steps")


def _now() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # queued kernels belong to what ran before
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), dest="shapes")
    parser.add_argument("--evaluations", type=int, help="evaluations per shape (default: 5 demo, 1 gpt2-small)")
    parser.add_argument("--steps", type=int, help="timed training steps per shape (default: 10 demo, 2 gpt2-small)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    for shape in args.shapes or ["demo", "gpt2-small"]:
        evaluations, steps = DEFAULT_COUNTS[shape]
        figures = measure(
            shape,
            args.overrides,
            evaluations=args.evaluations or evaluations,
            steps=args.steps or steps,
        )
        report(figures)


if __name__ == "__main__":
    main()
