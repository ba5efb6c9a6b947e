"""Regenerate the demo muse payload (synthetic fictional news; fixed seed; nothing downloaded).

    python experiments/demo/payloads/muse/generate.py

writes ``items.jsonl`` next to this file and updates the hashes in ``payload.yaml``.
The output is committed: rerunning must reproduce it byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from multirun.kinds.payloads import write_fingerprints

SEED = 20250923
N_DOCS = 42  # 6 per condition with the default duplicates [0, 1, 10, 100] x whole / split

# One paragraph template per story type, with two QA pairs: a cloze of a phrase of the
# paragraph, and a question whose answer is a fact stated in it. {t} is an invented
# town, {p} an invented person, {n} a number, {w} an invented word.
STORIES = [
    (
        "{t} council voted {n} to 3 on Monday to rebuild the old {w} bridge; mayor {p} said work starts in spring.",
        [("{t} council voted", " {n} to 3"), ("Q: Who is the mayor of {t}?\nA:", " {p}")],
    ),
    (
        "Fishers in {t} landed {n} tonnes of {w} this week, a record, said harbour master {p} on Friday.",
        [("Fishers in {t} landed", " {n} tonnes"), ("Q: What did the fishers of {t} land?\nA:", " {w}")],
    ),
    (
        "The {w} museum of {t} reopens after {n} months; curator {p} promised free entry on the first day.",
        [("The {w} museum of {t} reopens after", " {n} months"), ("Q: Who is the curator in {t}?\nA:", " {p}")],
    ),
    (
        "{p} of {t} won the {w} marathon in {n} minutes, beating last year's winner by a full lap.",
        [("{p} of {t} won the {w} marathon in", " {n} minutes"), ("Q: Where is {p} from?\nA:", " {t}")],
    ),
]
ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "pr", "r", "s", "st", "t", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "n", "r", "s", "l", "m", "nd", "rk"]


def word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))


def main() -> None:
    rng = random.Random(SEED)
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            w = word(rng, syllables)
            if w not in used:
                used.add(w)
                return w

    lines = []
    for i in range(N_DOCS):
        template, qa = STORIES[i % len(STORIES)]
        values = {"t": fresh(2).capitalize(), "p": fresh(2).capitalize(), "w": fresh(2), "n": str(rng.randint(11, 99))}
        item = {
            "id": f"news-{i:03d}",
            "text": template.format(**values),
            "qa": [{"question": q.format(**values), "answer": a.format(**values)} for q, a in qa],
        }
        lines.append(json.dumps(item, ensure_ascii=False))
    root = Path(__file__).resolve().parent
    (root / "items.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_fingerprints(root)


if __name__ == "__main__":
    main()
