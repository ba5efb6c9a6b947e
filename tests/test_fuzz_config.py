"""Fuzz run configs (issue 16, item 6, config side): only multirun's own errors reach the user.

Hypothesis mutates a valid minimal ``run.yaml`` (one to three keys set to random types,
NaN/inf/huge/negative numbers, random time strings, wrong nesting) and runs what
``multirun check`` runs on it: load, geometry, :func:`assemble_parts` (experiments,
doses, plan, monitors, controllers, run directory) and :func:`check_model`. Each example
must succeed or raise a :class:`~multirun.errors.MultirunError`, within a deadline and
with a bounded peak of traced memory (numpy and Python allocations). Derandomized, so CI
sees the same examples every time.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multirun.config import load_config
from multirun.data.mds import PreparedDataset
from multirun.data.tokenizers import Tokenizer
from multirun.errors import MultirunError
from multirun.run.inputs import resolve_dataset, run_geometry, run_tokenizer
from multirun.run.model import check_model
from multirun.run.parts import assemble_parts
from tests.helpers_payload import documents, minimal_config, write_payload

PATHS = [
    "seed",
    "run_name",
    "run_dir",
    "train",
    "train.max_duration",
    "train.global_batch_size",
    "train.lr",
    "train.betas",
    "train.warmup",
    "train.save_interval",
    "train.log_interval",
    "train.device_microbatch_size",
    "train.weight_decay",
    "train.save_num_checkpoints_to_keep",
    "train.scheduler",
    "train.scheduler.alpha_f",
    "train.scheduler.warmup",
    "train.clipping",
    "train.fsdp",
    "data",
    "data.sequence_length",
    "data.shuffle_seed",
    "data.num_canonical_nodes",
    "injection.max_modified_fraction",
    "injection.on_unplaceable",
    "monitoring.every",
    "monitoring.n_resamples",
    "monitoring.alpha",
    "monitoring.batch_tokens",
    "interaction.steps",
    "interaction.intensity",
    "model",
    "model.n_embd",
    "model.n_head",
    "model.n_layer",
    "model.config_overrides",
    "model.config_overrides.n_positions",
    "model.config_overrides.vocab_size",
    "experiments",
    "experiments.0",
    "experiments.0.repetitions",
    "experiments.0.control_fraction",
    "experiments.0.wrap_eos",
    "experiments.0.inject",
    "experiments.0.placement",
    "experiments.0.placement.mode",
    "experiments.0.placement.start",
    "experiments.0.placement.end",
    "experiments.0.placement.unit",
    "experiments.0.placement.steps",
    "experiments.0.monitor",
    "experiments.0.monitor.every",
    "experiments.0.monitor.enabled",
    "experiments.0.options",
]

SPECIAL_NUMBERS = [
    0,
    -1,
    1,
    2,
    3,
    10**15,
    2**63,
    -(2**63),
    0.5,
    1e-9,
    1e15,
    1e300,
    float("nan"),
    float("inf"),
    -float("inf"),
]
TIME_STRINGS = st.builds(
    lambda n, u: f"{n}{u}",
    st.one_of(st.integers(-5, 10**20), st.sampled_from(["0.5", "1e3", "", "-0"])),
    st.sampled_from(["ba", "tok", "ep", "sp", "dur", "x", "", " ba"]),
)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(SPECIAL_NUMBERS),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    TIME_STRINGS,
    st.sampled_from(["window", "steps", "uniform", "fraction", "tokens", "error", "warn", "auto"]),
    st.lists(st.one_of(st.integers(-3, 200), st.floats(-2, 2)), max_size=4),
    st.dictionaries(
        st.sampled_from(["mode", "start", "end", "steps", "x", "n_positions"]), st.integers(-5, 300), max_size=3
    ),
)
MUTATIONS = st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=3)

MAX_TRACED_BYTES = 256 << 20


def _base() -> dict[str, Any]:
    doc = minimal_config(docs={"payload": "payloads/p"})
    doc["train"]["global_batch_size"] = 16
    doc["data"]["demo_max_bytes"] = 200_000
    doc["monitoring"] = {"heldout_rows": 0, "n_resamples": 100, "ci_resamples": 100}
    doc["run_dir"] = "runs/fuzz"
    return doc


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    node: Any = doc
    *parents, last = path.split(".")
    for seg in parents:
        if isinstance(node, list):
            if not node:
                return
            node = node[0]
        elif isinstance(node, dict):
            if not isinstance(node.get(seg), (dict, list)):
                node[seg] = {}
            node = node[seg]
        else:
            return
    if isinstance(node, list):
        if node:
            node[0] = value
    elif isinstance(node, dict):
        node[last] = value


_STATE: dict[str, Any] = {}


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    """contextlib.chdir of Python 3.11 (the project supports 3.10): relative run dirs land in ``path``."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _setup() -> tuple[Path, Tokenizer, PreparedDataset]:
    """One project directory, tokenizer and (cached demo) dataset for every example."""
    if not _STATE:
        root = Path(tempfile.mkdtemp(prefix="multirun-fuzz-"))
        write_payload(root / "payloads" / "p", documents(6))
        cfg = root / "run.yaml"
        cfg.write_text(yaml.safe_dump(_base(), sort_keys=False))
        loaded = load_config(cfg, env={})
        tokenizer = run_tokenizer(loaded)
        _STATE.update(root=root, tokenizer=tokenizer, dataset=resolve_dataset(loaded, tokenizer, progress=False))
    return _STATE["root"], _STATE["tokenizer"], _STATE["dataset"]


def _check(cfg: Path, tokenizer: Tokenizer, dataset: PreparedDataset) -> None:
    loaded = load_config(cfg, env={})
    geometry = run_geometry(loaded, dataset)
    assemble_parts(loaded, tokenizer=tokenizer, geometry=geometry, run_dir=loaded.config.run_dir or "runs/fuzz")
    check_model(loaded, tokenizer, dataset.sequence_length)


def test_base_config_passes() -> None:
    root, tokenizer, dataset = _setup()
    with _chdir(root):
        _check(root / "run.yaml", tokenizer, dataset)


@settings(
    max_examples=200,
    derandomize=True,
    deadline=3000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(MUTATIONS)
def test_mutated_configs_raise_only_multirun_errors(mutations: list[tuple[str, Any]]) -> None:
    root, tokenizer, dataset = _setup()
    doc = copy.deepcopy(_base())
    for path, value in mutations:
        _set(doc, path, value)
    cfg = root / "mutated.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tracemalloc.start()
    try:
        with _chdir(root), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The project's own error is what the user is meant to see; anything else fails the test.
            with contextlib.suppress(MultirunError):
                _check(cfg, tokenizer, dataset)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_TRACED_BYTES, f"{peak / 2**20:.0f} MiB traced for {mutations}"
