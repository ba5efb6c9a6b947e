"""Ledger speed and size: append throughput, flush time, bytes per span, read-back time.

Simulates one rank of a run with a realistic span mix: 10 experiments with 10k
items each, Zipf-like item popularity, span lengths from 8 to ~1000 tokens
(log-normal), a few hundred spans per step, appended once per step as the
callback does, flushed every ``--flush-every`` steps (a checkpoint interval).
Prints figures only; nothing is asserted.

    .venv/bin/python benchmarks/bench_ledger.py --spans 5000000
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from multirun.ledger import Ledger, LedgerWriter, truncate_ledger


def make_steps(n_spans: int, spans_per_step: int, n_exp: int, n_items: int, seed: int) -> list[dict]:
    """Per-step span columns, generated up front so only the ledger is timed."""
    rng = np.random.default_rng(seed)
    n_steps = -(-n_spans // spans_per_step)
    seq_len, global_batch, world = 2048, 512, 8
    # Zipf-ish popularity over the items of each experiment (repetition groups).
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    pop /= pop.sum()
    steps = []
    left = n_spans
    for t in range(n_steps):
        k = min(spans_per_step, left)
        left -= k
        length = np.clip(rng.lognormal(4.5, 1.0, k), 8, seq_len // 2).astype(np.int32)
        rows = np.sort(rng.integers(0, global_batch, k)).astype(np.int32)
        steps.append(
            dict(
                step=t,
                global_row=rows,
                local_row=(rows // world).astype(np.int32),
                sample_id=rng.integers(0, 2_000_000_000, k),
                offset=rng.integers(0, seq_len // 2, k).astype(np.int32),
                length=length,
                experiment=rng.integers(0, n_exp, k).astype(np.int32),
                item_index=rng.choice(n_items, size=k, p=pop).astype(np.int32),
                sequence=rng.integers(0, 4 * n_items, k).astype(np.int32),
                repetition=rng.integers(0, 16, k).astype(np.int32),
                token_hash=rng.integers(0, 2**63, k, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1),
                row_fingerprint=rng.integers(0, 2**63, k, dtype=np.int64).astype(np.uint64),
            )
        )
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=5_000_000)
    ap.add_argument("--spans-per-step", type=int, default=500)
    ap.add_argument("--flush-every", type=int, default=1000, help="steps between flushes (checkpoint interval)")
    ap.add_argument("--experiments", type=int, default=10)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--dir", type=str, default=None, help="run directory (default: a temp dir, removed)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    steps = make_steps(args.spans, args.spans_per_step, args.experiments, args.items, seed=0)
    print(f"generated {args.spans:,} spans over {len(steps):,} steps in {time.perf_counter() - t0:.1f} s")

    run_dir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_ledger_"))
    shutil.rmtree(run_dir / "ledger", ignore_errors=True)
    names = [f"exp{e}" for e in range(args.experiments)]
    items = [[f"{n}/item-{i:05d}" for i in range(args.items)] for n in names]
    try:
        t_init = time.perf_counter()
        w = LedgerWriter(run_dir, rank=0, experiment_names=names, item_ids=items)
        t_init = time.perf_counter() - t_init
        t_append = t_flush = 0.0
        flushes = []
        for i, cols in enumerate(steps):
            a = time.perf_counter()
            w.append(**cols)
            t_append += time.perf_counter() - a
            if (i + 1) % args.flush_every == 0:
                a = time.perf_counter()
                rows = w.flush()
                dt = time.perf_counter() - a
                t_flush += dt
                flushes.append((rows, dt))
        a = time.perf_counter()
        rows = w.flush()
        if rows:
            flushes.append((rows, time.perf_counter() - a))
            t_flush += flushes[-1][1]
        w.close()

        total = t_append + t_flush
        size = sum(p.stat().st_size for p in (run_dir / "ledger").rglob("*.parquet"))
        print(f"writer init ({args.experiments}x{args.items} item ids): {t_init * 1e3:.0f} ms")
        print(
            f"append:  {t_append:.2f} s  ({args.spans / t_append / 1e6:.2f} M spans/s, "
            f"{t_append / len(steps) * 1e6:.0f} us per step of {args.spans_per_step} spans)"
        )
        per = [dt / r * 1e6 for r, dt in flushes]
        print(
            f"flush:   {t_flush:.2f} s over {len(flushes)} flushes "
            f"({flushes[0][0]:,} rows each: mean {np.mean([d for _, d in flushes]) * 1e3:.0f} ms, "
            f"{np.mean(per):.2f} us/row)"
        )
        print(f"append+flush: {args.spans / total / 1e6:.2f} M spans/s")
        print(f"on disk: {size / 1e6:.1f} MB in {len(flushes)} shards = {size / args.spans:.2f} bytes/span (zstd)")

        a = time.perf_counter()
        led = Ledger.open(run_dir)
        t_read = time.perf_counter() - a
        print(f"Ledger.open (read + unify + sort): {t_read:.2f} s ({len(led):,} rows)")
        for label, fn in [
            ("summary()", lambda: led.summary(total_training_tokens=len(steps) * 512 * 2048)),
            ("query(experiment, steps)", lambda: led.query(experiment="exp3", steps=(100, 5000))),
            ("exposures(exp0)", lambda: led.exposures("exp0")),
            ("check_integrity()", lambda: _integrity(led)),
        ]:
            a = time.perf_counter()
            fn()
            print(f"{label}: {time.perf_counter() - a:.2f} s")
        a = time.perf_counter()
        removed = truncate_ledger(run_dir, from_step=len(steps) // 2 + args.flush_every // 2)
        print(
            f"truncate_ledger (half the run, one straddling shard): "
            f"{time.perf_counter() - a:.2f} s, {removed:,} rows removed"
        )
    finally:
        if not args.dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def _integrity(led: Ledger) -> None:
    # Random spans overlap by design in this synthetic mix; we time the check only.
    with contextlib.suppress(Exception):
        led.check_integrity()


if __name__ == "__main__":
    main()
