"""The GPU figures in one session (a lent device: under 8 minutes, no network).

    python benchmarks/gpu_check.py              # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-smoke  # tiny sizes on CPU: checks that every section runs

Sections, each printed with its wall time (a section that fails prints its error and the
script goes on, then exits non-zero):

1. ``injection``: ``benchmarks/bench_injection.py`` at GPT-2-small shape in bf16 (12
   layers, 768 wide, sequence 512, global batch 64): injection's share of a step.
2. ``evaluation``: ``benchmarks/bench_monitors.py``'s figure, one full evaluation of every
   bundled monitor in training steps, at the demo's shape and at GPT-2-small's in bf16,
   and at GPT-2-small with ``monitoring.batch_tokens=32768`` (fewer, fuller probe passes).
3. ``throughput``: tokens per second of GPT-2-small bf16 training with the demo's
   experiments and without any (``experiments=[]``), in alternating runs; monitors only
   at their own cadences, so the median step is the injection's cost.
4. ``profile``: where one GPT-2-small evaluation's time goes (torch profiler, the top
   operators by device time and by host time), for the next change to aim at.
5. ``demo``: the demo trained on the device, its ledger checked and its primary effects
   printed (the end-to-end check).

``--cpu-smoke`` runs every section on CPU at tiny sizes (2 layers, 64 wide, sequence
128, a few steps): a check of the script, not of any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU even where a device is visible, before torch looks

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_monitors, next to this file

import bench_monitors  # noqa: E402  (a sibling script, not a package)
from composer.core import Callback, Event, State  # noqa: E402
from composer.loggers import Logger  # noqa: E402

from multirun.config import load_config  # noqa: E402
from multirun.measure.runner import MonitorRunner  # noqa: E402
from multirun.run.trainer import prepare_run  # noqa: E402

GPT2_SMALL = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768"]
GPU_GEOMETRY = ["data.sequence_length=512", "train.global_batch_size=64", "train.precision=amp_bf16"]
# The demo's doses are planned for 800 steps: a smoke run of a few steps places what fits.
SMOKE_GEOMETRY = ["data.sequence_length=128", "train.global_batch_size=8", "injection.on_unplaceable=warn"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: check that every section runs")
    parser.add_argument("--only", action="append", help="run only these sections (repeatable)")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --cpu-smoke to check the script on CPU)")
    _environment()
    sections: dict[str, Callable[[], None]] = {
        "injection": lambda: _injection(smoke),
        "evaluation": lambda: _evaluation(smoke),
        "throughput": lambda: _throughput(smoke),
        "profile": lambda: _profile(smoke),
        "demo": lambda: _demo(smoke),
    }
    failed = []
    for name, section in sections.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            section()
        except Exception:  # one broken section must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
        print(f"   ({name}: {time.perf_counter() - started:.0f} s)", flush=True)
    if failed:
        raise SystemExit(f"failed sections: {', '.join(failed)}")


def _environment() -> None:
    import composer
    import streaming
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(
        f"torch {torch.__version__} ({device}); composer {composer.__version__}; "
        f"streaming {streaming.__version__}; transformers {transformers.__version__}",
        flush=True,
    )


def _shape(smoke: bool) -> list[str]:
    """GPT-2-small in bf16 at the GPU geometry, or the demo's model at the smoke's."""
    return SMOKE_GEOMETRY if smoke else [*GPT2_SMALL, *GPU_GEOMETRY]


def _injection(smoke: bool) -> None:
    command = [sys.executable, str(HERE / "bench_injection.py")]
    if smoke:  # the demo's geometry, where a few steps hold the demo's contamination doses
        command += ["--steps", "60", "--repetitions", "1", "--set", "injection.on_unplaceable=warn"]
    else:
        command += ["--steps", "100", *[arg for kv in _shape(smoke) for arg in ("--set", kv)]]
    subprocess.run(command, check=True, env=_child_env(smoke))


def _evaluation(smoke: bool) -> None:
    if smoke:
        runs = [("demo", SMOKE_GEOMETRY, 1, 2)]
    else:
        runs = [
            ("demo", [], 3, 6),
            ("gpt2-small", GPU_GEOMETRY, 3, 6),
            ("gpt2-small", [*GPU_GEOMETRY, "monitoring.batch_tokens=32768"], 3, 6),
        ]
    for shape, overrides, evaluations, steps in runs:
        figures = bench_monitors.measure(shape, overrides, evaluations=evaluations, steps=steps)
        if "monitoring.batch_tokens=32768" in overrides:
            figures.shape += ", batch_tokens 32768"
        bench_monitors.report(figures)


class _StepTimer(Callback):
    """Wall time of each step, from BEFORE_DATALOADER to BATCH_END (synchronised)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BEFORE_DATALOADER:
            self._started = _now()
        elif event == Event.BATCH_END:
            self.seconds.append(_now() - self._started)


def _throughput(smoke: bool) -> None:
    steps, rounds = (4, 1) if smoke else (60, 2)
    # The demo's plan (800 steps), of which the first steps train; no evaluation but the
    # controlled experiment's own cadence (50 steps: at most one, which the median skips).
    base = [*_shape(smoke), "train.save_interval=null", *bench_monitors.QUIET]
    medians: dict[str, list[float]] = {"with experiments": [], "without experiments": []}
    tokens = 0
    for _ in range(rounds):
        for label, extra in (("with experiments", []), ("without experiments", ["experiments=[]"])):
            timer = _StepTimer()
            with tempfile.TemporaryDirectory() as run_dir:
                run = prepare_run(
                    load_config(None, [*base, *extra]), extra_callbacks=[timer], progress=False, run_dir=run_dir
                )
                config = run.loaded.config
                tokens = config.train.global_batch_size * config.data.sequence_length
                try:
                    run.trainer.fit(duration=f"{steps}ba")
                finally:
                    run.close()
            medians[label].append(statistics.median(timer.seconds[2:] or timer.seconds))
    for label, values in medians.items():
        step = statistics.median(values)
        print(f"{label:<22} {tokens / step:12.0f} tokens/s  (median step {1000 * step:.1f} ms, {rounds} runs)")
    ratio = statistics.median(medians["with experiments"]) / statistics.median(medians["without experiments"])
    print(f"step time with / without experiments: {ratio:.4f}")


def _profile(smoke: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiles: list[profile] = []

    class Profiled(bench_monitors.Interleaved):
        def _evaluate(self, state: State) -> None:
            super()._evaluate(state)  # once to warm up, then profiled
            with profile(activities=activities) as prof:
                super()._evaluate(state)
            profiles.append(prof)

    figures = bench_monitors.Figures("profile")
    shape = "demo" if smoke else "gpt2-small"
    overrides = SMOKE_GEOMETRY if smoke else GPU_GEOMETRY
    with tempfile.TemporaryDirectory() as run_dir:
        loaded = load_config(None, [*bench_monitors.QUIET, *bench_monitors.SHAPES[shape], *overrides])
        runner: dict[str, MonitorRunner] = {}
        timer = Profiled(figures, lambda: runner["runner"], evaluations=1)
        run = prepare_run(loaded, extra_callbacks=[timer], progress=False, run_dir=run_dir)
        assert run.callback.monitors is not None
        runner["runner"] = run.callback.monitors
        try:
            run.trainer.fit(duration="2ba")
        finally:
            run.close()
    averages = profiles[0].key_averages()
    keys = ["self_cuda_time_total", "self_cpu_time_total"] if torch.cuda.is_available() else ["self_cpu_time_total"]
    for key in keys:
        print(averages.table(sort_by=key, row_limit=15, max_name_column_width=50))


def _demo(smoke: bool) -> None:
    from multirun.ledger import Ledger

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = f"{tmp}/demo"
        command = [sys.executable, "-m", "multirun", "train", "--no-progress", "--set", f"run_dir={run_dir}"]
        command += ["--set", "train.save_interval=null"]
        if smoke:
            command += ["--set", "train.max_duration=400ba", "--set", "injection.on_unplaceable=warn"]
        done = subprocess.run(command, capture_output=True, text=True, env=_child_env(smoke))
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:])
            raise RuntimeError(f"multirun train exited with {done.returncode}")
        ledger = Ledger.open(run_dir)
        ledger.check_integrity()
        summary = json.loads(Path(run_dir, "summary.json").read_text())
        print(
            f"spans {len(ledger)}; fit {summary['fit_seconds']:.1f} s; monitor share "
            f"{100 * summary['monitor_seconds'] / summary['fit_seconds']:.2f} %; "
            f"held-out loss {summary['heldout_loss']:.4f}"
        )
        for r in summary["effects"]:
            if r.get("primary"):
                print(f"  {r['experiment']:<18} {r['metric']:<16} effect {r['effect']:+.4f}  Holm p {r['p_holm']:.2g}")


def _child_env(smoke: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH", "")]))
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _now() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


if __name__ == "__main__":
    main()
