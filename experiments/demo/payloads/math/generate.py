"""Regenerate the demo math payload (synthetic; fixed seed; nothing downloaded).

    python experiments/demo/payloads/math/generate.py

writes ``items.jsonl`` and ``shots.jsonl`` next to this file with the math kind's own
generator (:func:`injectors.math.generate`) and updates the hashes in ``payload.yaml``.
The output is committed: rerunning must reproduce it byte for byte
(``tests/kinds/test_math.py`` checks that it does).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[3]))  # the repository root: `injectors` is a top-level package

from injectors.math import GeneratorSpec, generate  # noqa: E402
from multirun.kinds.payloads import write_fingerprints  # noqa: E402

# Compact symbols so that a problem fits the demo's 128-byte rows; 24 problems per
# difficulty (12 treated, 12 controls at control_fraction 0.5) and 3 shots each.
SPEC = GeneratorSpec(n_per_difficulty=24, difficulties=(1, 2, 3), seed=20251018, modulus=23, shots=3, style="symbols")


def main() -> None:
    problems, shots = generate(SPEC)
    for name, rows in (("items.jsonl", problems), ("shots.jsonl", shots)):
        lines = [json.dumps(p.record(), ensure_ascii=False) for p in rows]
        (ROOT / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_fingerprints(ROOT)


if __name__ == "__main__":
    main()
