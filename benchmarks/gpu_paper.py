"""The paper's ten experiments in one run at GPT-2-small shape on a GPU, every effect table printed.

    python benchmarks/gpu_paper.py              # on a CUDA machine: under 8 minutes on one H200
    python benchmarks/gpu_paper.py --cpu-smoke  # tiny and short on CPU: checks that the script runs

Trains ``experiments/paper/run.yaml`` (all ten experiments of *Train Once, Answer All*,
Hubble's boundary placement and an imported benchmark beside them) as shipped, 1000 steps
of 16 rows of 128 bytes, with GPT-2-small's shape (12 layers, 12 heads, 768 wide) in bf16,
through ``multirun train``. That command prints, at the end, the final evaluation's effect
table: every metric of every experiment, overall and per group (difficulty, dose,
condition, replaced batch), treated against never-injected controls, Holm first. This
script adds what was injected and removed per experiment, the held-out loss, the fit and
monitor time, and where the report is.

``--cpu-smoke`` runs the same config with the demo's tiny model for 60 steps on CPU
(doses that do not fit such a short run are placed as far as they go): a check of the
script, not of any effect.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAPER = HERE.parent / "experiments" / "paper" / "run.yaml"

GPT2_SMALL = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "train.precision=amp_bf16"]
# Short and tiny: the doses are planned for 1000 steps, so a 60-step run places what fits,
# with the smaller doses and moved windows that tests/e2e/test_paper_config.py uses.
SMOKE = [
    "train.device=cpu",
    "train.max_duration=60ba",
    "train.global_batch_size=64",
    "monitoring.every=30ba",
    "monitoring.n_resamples=200",
    "monitoring.ci_resamples=200",
    "injection.on_unplaceable=warn",
    "injection.max_modified_fraction=0.6",
]


def _smoke_overrides() -> list[str]:
    from multirun.config import load_config

    names = [e.name for e in load_config(PAPER, [], env={}).config.experiments]
    return [
        *SMOKE,
        f"experiments.{names.index('mr-math')}.repetitions=8",
        f"experiments.{names.index('muse-news')}.options.duplicates=[0,1,2,4]",
        f"experiments.{names.index('fc-forgetting')}.placement.steps=[10]",
        f"experiments.{names.index('fc-forgetting')}.repetitions=2",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, 60 steps, on CPU")
    parser.add_argument("--run-dir", type=Path, help="keep the run here (default: a temporary folder)")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH", "")]))
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    overrides = _smoke_overrides() if args.cpu_smoke else ["train.device=gpu", *GPT2_SMALL]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or Path(tmp) / "paper"
        command = [sys.executable, "-m", "multirun", "train", str(PAPER), "--no-progress"]
        command += ["--set", f"run_dir={run_dir}", "--set", "train.save_interval=null"]
        command += [arg for kv in overrides for arg in ("--set", kv)]
        print("$ " + " ".join(command[1:]), flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, env=env)  # its output (progress lines, the effect table) goes straight out
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"multirun train exited with {done.returncode} after {wall:.0f} s")
        _print_summary(run_dir, wall)


def _print_summary(run_dir: Path, wall: float) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"\nwall {wall:.0f} s; fit {summary['fit_seconds']:.0f} s; monitors {summary['monitor_seconds']:.0f} s")
    print(f"held-out loss {summary['heldout_loss']:.4f} after {summary['steps_trained']} steps")
    print("injected (spans / tokens) per experiment; removal experiments: what they removed from the stream")
    for row in summary["experiments"]:
        if row["spans"]:
            print(f"  {row['experiment']:<20} {row['spans']:>6} / {row['tokens']:>8}")
    for row in summary.get("removals", []):
        if row["spans"]:
            print(f"  {row['experiment']:<20} {row['spans']:>6} / {row['tokens']:>8}  removed")
    primary = [r for r in summary["effects"] if r.get("primary")]
    significant = sum(1 for r in primary if r.get("p_holm") is not None and r["p_holm"] < 0.01)
    print(f"primary effects significant at Holm p < 0.01: {significant} of {len(primary)} experiments")


if __name__ == "__main__":
    main()
