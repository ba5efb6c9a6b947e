"""Writes the demo replay packages ``iid`` (early) and ``../iid-late`` (late): run in this
directory, then ``multirun payload fingerprint`` each package (see README.md)."""

from __future__ import annotations

import json
import random
from pathlib import Path

FIRST = 64  # the held-out loss evaluates the held-out split's first 64 rows (monitoring.heldout_rows)
ITEMS = 48
STRIDE = 16  # every 16th held-out row: items spread over the held-out documents
DOSES = (1, 8)  # uniqueness: seen once vs eight times (never for the controls)


def write(directory: Path, offset: int, seed: int) -> None:
    rng = random.Random(seed)
    doses = [DOSES[k % 2] for k in range(ITEMS)]
    rng.shuffle(doses)
    with open(directory / "items.jsonl", "w", encoding="utf-8") as out:
        for k, dose in enumerate(doses):
            sample = FIRST + offset + STRIDE * k
            out.write(json.dumps({"source": "heldout", "sample": sample, "repetitions": dose}) + "\n")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    write(here, 0, seed=20251203)
    write(here.parent / "iid-late", STRIDE // 2, seed=20251204)
