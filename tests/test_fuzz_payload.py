"""Fuzzing payload packages: whatever the files hold, the user sees multirun's own errors.

Hypothesis writes payload packages with random ``items.jsonl`` lines (random JSON values,
any Unicode including lone surrogates, zero-width characters and NUL, huge numbers,
broken lines) and random ``payload.yaml`` content (anchors, aliases, merges, duplicate
keys, small alias bombs), then runs them through ``multirun payload check``'s validation
(:func:`~multirun.kinds.experiments.check_payload`, which returns problems and raises
nothing) and through a run's preparation and planning (load the config, prepare the
experiment, plan its spans), where the only exception allowed is
:class:`~multirun.errors.MultirunError`. Every example runs within a deadline, and the
whole test under an address-space limit of 1 GiB above what the process already holds.
"""

from __future__ import annotations

import json
import resource
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from multirun.config import load_config
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import InputError, MultirunError
from multirun.kinds.experiments import build_experiments, check_payload
from multirun.kinds.payloads import file_xxh64
from multirun.plan.run_plan import plan_experiments
from multirun.types import BatchGeometry
from tests.helpers_payload import minimal_config, write_config
from tests.support import REPO

GEO = BatchGeometry(global_batch_size=16, sequence_length=64, num_steps=100)  # a cap of 51 tokens a step
TOK = ByteTokenizer()
KINDS = [
    "documents",
    "contamination",
    "contamination",
    "memorization",
    "knowledge",
    "poison",
    "watermark",
    "removal",
    "no-such-kind",
]
KEYS = ["id", "text", "question", "answer", "group", "choices", "repetitions", "texts", "probes", "prompt", "x"]

# Characters that have broken validation before: surrogates, NUL, zero-width and format
# characters, other scripts' digits, spaces of every kind.
ODD = ["\ud800", "\udfff", "\x00", "\u200b", "\u200d", "\ufeff", "\u2060", "\uff11", "\u0663", "\u3000", "\t", "\n"]
TEXT = st.text(alphabet=st.one_of(st.characters(), st.sampled_from(ODD)), max_size=40)
NUMBER = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, 1, 4, 10**9, 2**63, 10**400]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e15, 1e308, 0.001, -1.0]),
)
JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBER, TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)
RECORD = st.dictionaries(st.one_of(st.sampled_from(KEYS), TEXT), JSON_VALUE, max_size=6)


SHORT = st.text(alphabet=st.one_of(st.sampled_from("abc xyz?"), st.sampled_from(ODD)), min_size=0, max_size=12)
DOSE = st.one_of(st.sampled_from([1, 2, 0.5, 1e9, 1e15, 10**30, 0, -1, "3"]), NUMBER)
GROUP = st.sampled_from([0, 0, 1, 4, 10**9, 10**20, "16", " 4 ", "\uff11\uff16", "\u0661", "", -1, 1.5, True, None])


def valid_record(kind: str, i: int) -> dict[str, Any]:
    """A record the kind accepts, to mutate: fuzzing from valid reaches the deep checks."""
    if kind == "contamination":
        return {"id": f"q{i}", "question": f"where is {i}?", "answer": "here", "group": i % 3}
    if kind == "knowledge":
        return {
            "id": f"f{i}",
            "texts": [f"fact {i} is true"],
            "probes": [{"question": f"fact {i} is", "target": " true"}],
        }
    if kind == "removal":  # at least the default n-gram (25 tokens) long, no shared n-gram
        return {"id": f"r{i}", "text": f"removed sentence number {i} of the fuzz payload"}
    return {"id": f"d{i}", "text": f"document {i} says hello"}


@st.composite
def items_lines(draw: st.DrawFn, kind: str) -> bytes:
    """A JSONL file: mostly the kind's records with a few fields made odd, some broken lines."""
    lines: list[bytes] = []
    for i in range(draw(st.integers(0, 6))):
        choice = draw(st.integers(0, 19))
        if choice < 18:
            record = valid_record(kind, i)
            for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
                key = draw(st.sampled_from([*record, *KEYS]))
                strategy = {"group": GROUP, "repetitions": DOSE}.get(key, st.one_of(SHORT, JSON_VALUE))
                record[key] = draw(strategy)
            lines.append(json.dumps(record).encode())  # ensure_ascii: surrogates as \ud800 escapes
        elif choice < 19 and draw(st.booleans()):
            lines.append(json.dumps(draw(RECORD)).encode())
        elif choice < 19:
            lines.append(draw(TEXT).encode("utf-8", "surrogatepass"))
        else:
            lines.append(draw(st.binary(max_size=20)))
    return b"\n".join(lines) + b"\n"


# Fragments appended to payload.yaml: YAML features and their misuse.
YAML_FRAGMENTS = [
    "x-a: &a {k: 1}\nx-b: {<<: *a, k: 2}\n",
    "kind: documents\n",  # a duplicate of a key above
    "name: other\nname: again\n",
    "<<: {license: MIT}\n",
    "x: &x [a, a, a, a, a, a, a, a]\ny: &y [*x, *x, *x, *x, *x, *x, *x, *x]\nz: &z [*y, *y, *y, *y, *y, *y, *y, *y]\n"
    "w: [*z, *z, *z, *z, *z, *z, *z, *z]\n",
    'description: "\\ud800 \\0"\n',
    "files: {items: {path: ../../etc/passwd, xxh64: 0000000000000000}}\n",
    "version: *undefined\n",
    "- a list\n",
    "{{{\n",
    "description: !!python/object:os.system echo\n",
]


@st.composite
def manifest_text(draw: st.DrawFn, kind: str, items_hash: str) -> str:
    doc: dict[str, Any] = {
        "name": draw(st.sampled_from(["fuzz", "fuzz/p", "fuzz", "bad name"])),
        "version": draw(st.sampled_from(["1", "1.0.0", "1", ""])),
        "kind": kind,
        "license": "CC0-1.0",
        "files": {"items": {"path": "items.jsonl", "xxh64": items_hash}},
    }
    text = yaml.safe_dump(doc, sort_keys=False)
    if draw(st.integers(0, 2)) == 0:
        for fragment in draw(st.lists(st.sampled_from(YAML_FRAGMENTS), min_size=1, max_size=2)):
            text += fragment
    if draw(st.integers(0, 9)) == 0:
        text += draw(TEXT).replace("\ud800", "").replace("\udfff", "") + "\n"
    return text


@contextmanager
def address_space_limit(extra: int) -> Iterator[None]:
    """At most ``extra`` bytes of address space beyond what the process has now (restored after)."""
    status = Path("/proc/self/status").read_text().splitlines()
    vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + extra if hard == resource.RLIM_INFINITY else min(vm + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module", autouse=True)
def _kinds_imported() -> None:
    """Check each bundled demo payload once: every kind's injector and monitor is imported
    before the deadline starts counting."""
    for root in sorted((REPO / "experiments" / "demo" / "payloads").iterdir()):
        check_payload(root, tokenizer=TOK, sequence_length=64)


@settings(
    max_examples=120,
    deadline=5000,  # ms per example; they take 1-100 ms, the margin is for a loaded machine
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_payloads_meet_only_multirun_errors(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    items = data.draw(items_lines(kind), label="items.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "p"
        root.mkdir()
        (root / "items.jsonl").write_bytes(items)
        (root / "payload.yaml").write_text(
            data.draw(manifest_text(kind, file_xxh64(root / "items.jsonl")), label="payload.yaml"), encoding="utf-8"
        )
        with address_space_limit(1 << 30):
            result = check_payload(root, tokenizer=TOK, sequence_length=64, geometry=GEO)
            assert all(isinstance(p, InputError) for p in result.problems)
            assert (result.experiment is None) == bool(result.problems)
            for problem in result.problems:
                str(problem).encode("utf-8")  # printable: no lone surrogate in a message

            config = write_config(Path(tmp) / "run.yaml", minimal_config(e={"payload": "p"}))
            try:
                loaded = load_config(config, env={})
                experiments = build_experiments(loaded, tokenizer=TOK, geometry=GEO)
                plan_experiments(loaded, experiments, tokenizer=TOK, geometry=GEO)
            except MultirunError as e:
                str(e).encode("utf-8")
                event(f"run: {type(e).__name__}: {e.message[:30] if isinstance(e, InputError) else e}")
            else:
                event("run: prepared and planned")
