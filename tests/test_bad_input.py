"""Bad input fails early and clearly (docs/architecture.md, invariant 7).

Every case builds a small, otherwise valid project in a temporary directory, breaks
one thing, runs the same path a real run takes before training (load the config,
then build the experiments) and checks the error type and that the message names
the file and the key or line.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from multirun.config import load_config, parse_duration_steps
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError, PayloadError, PlacementError
from multirun.kinds.experiments import build_experiments
from multirun.types import BatchGeometry
from tests.helpers_payload import documents, minimal_config, write_config, write_payload

GEO = BatchGeometry(global_batch_size=4, sequence_length=64, num_steps=100)
BASE = minimal_config(docs={"payload": "payloads/p"})


def run(cfg: Path, overrides: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
    """What `multirun train` does before the first step (minus the data)."""
    loaded = load_config(cfg, overrides, env=env or {})
    build_experiments(loaded, tokenizer=ByteTokenizer(), geometry=GEO)


def project(
    tmp: Path, config: dict[str, Any] | str | None = None, items: list[Any] | None = None, **payload_kw: Any
) -> Path:
    write_payload(tmp / "payloads" / "p", documents(6) if items is None else items, **payload_kw)
    return write_config(tmp / "run.yaml", BASE if config is None else config)


def with_exp(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["experiments"][0].update(changes)
    return doc


@dataclass
class Case:
    id: str
    make: Callable[[Path], Callable[[], Any]]  # tmp_path -> the call that must fail
    error: type[Exception]
    says: tuple[str, ...]  # substrings the message must contain ({tmp} = the tmp dir)


def _mismatch(tmp: Path) -> Callable[[], Any]:
    cfg = project(tmp)
    with open(tmp / "payloads" / "p" / "items.jsonl", "a") as f:
        f.write('{"id": "late", "text": "appended after hashing"}\n')
    return lambda: run(cfg)


def _missing_file(tmp: Path) -> Callable[[], Any]:
    cfg = project(tmp)
    (tmp / "payloads" / "p" / "items.jsonl").unlink()
    return lambda: run(cfg)


def _impossible_budget(tmp: Path) -> Callable[[], Any]:
    from multirun.plan.static import plan_static

    # Within what the run could hold at a cap of 1.0 (so preparing the experiments accepts
    # the doses), beyond the cap of 0.5 it is planned with.
    cfg = project(tmp, {**with_exp(repetitions=200), "injection": {"max_modified_fraction": 1.0}})
    loaded = load_config(cfg, env={})
    exps = build_experiments(loaded, tokenizer=ByteTokenizer(), geometry=GEO)
    return lambda: plan_static(exps, GEO, seed=17, max_modified_fraction=0.5)


CASES = [
    Case(
        "unknown_top_level_key",
        lambda t: lambda: run(project(t, {**BASE, "trian": {}})),
        ConfigError,
        ("run.yaml:", "trian", "unknown key"),
    ),
    Case(
        "unknown_nested_key",
        lambda t: lambda: run(project(t, with_exp(placement={"mode": "window", "strat": 0.1}))),
        ConfigError,
        ("run.yaml:", "experiments[0].placement.strat", "unknown key"),
    ),
    Case(
        "wrong_type",
        lambda t: lambda: run(project(t, {**BASE, "train": {"global_batch_size": "sixteen"}})),
        ConfigError,
        ("run.yaml:", "train.global_batch_size", "integer"),
    ),
    Case(
        "missing_payload_dir",
        lambda t: lambda: run(project(t, with_exp(payload="payloads/nope"))),
        ConfigError,
        ("run.yaml", "experiments[0].payload", "payloads/nope"),
    ),
    Case(
        "unknown_pkg_payload",
        lambda t: lambda: run(project(t, with_exp(payload="pkg:demo/nope"))),
        ConfigError,
        ("run.yaml", "experiments[0].payload", "pkg:demo/nope"),
    ),
    Case("missing_payload_file", _missing_file, PayloadError, ("payload.yaml", "files.items.path", "items.jsonl")),
    Case(
        "fingerprint_mismatch",
        _mismatch,
        PayloadError,
        ("payload.yaml", "files.items.xxh64", "multirun payload fingerprint"),
    ),
    Case(
        "payload_manifest_missing_license",
        lambda t: lambda: run(project(t, manifest_overrides={"license": None})),
        PayloadError,
        ("payload.yaml", "license", "missing"),
    ),
    Case(
        "item_longer_than_sequence",
        lambda t: lambda: run(project(t, items=[*documents(2), {"id": "long", "text": "x" * 63}])),
        PayloadError,
        ("items.jsonl:3", "text", "65 tokens", "64"),
    ),
    Case(
        "duplicate_experiment_names",
        lambda t: (
            lambda: run(
                project(
                    t,
                    minimal_config(a={"payload": "payloads/p"})
                    | {"experiments": [{"name": "a", "payload": "payloads/p"}] * 2},
                )
            )
        ),
        ConfigError,
        ("run.yaml:", "experiments[1].name", "duplicate"),
    ),
    Case(
        "duplicate_item_ids",
        lambda t: lambda: run(project(t, items=[{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])),
        PayloadError,
        ("items.jsonl:2", "id", "duplicate"),
    ),
    Case(
        "invalid_json_line",
        lambda t: lambda: run(project(t, items=[{"id": "a", "text": "x"}, '{"id": "b", "text": '])),
        PayloadError,
        ("items.jsonl:2", "invalid JSON"),
    ),
    Case(
        "jsonl_line_missing_text",
        lambda t: lambda: run(project(t, items=[{"id": "a"}])),
        PayloadError,
        ("items.jsonl:1", "text", "missing"),
    ),
    Case(
        "jsonl_empty_text",
        lambda t: lambda: run(project(t, items=[{"id": "a", "text": "x"}, {"id": "b", "text": "  "}])),
        PayloadError,
        ("items.jsonl:2", "text", "non-empty"),
    ),
    Case(
        "jsonl_unknown_key",
        lambda t: lambda: run(project(t, items=[{"id": "a", "text": "x", "txet": "y"}])),
        PayloadError,
        ("items.jsonl:1", "txet", "unknown key"),
    ),
    Case(
        "jsonl_bad_repetitions",
        lambda t: lambda: run(project(t, items=[{"id": "a", "text": "x", "repetitions": -1}])),
        PayloadError,
        ("items.jsonl:1", "repetitions", "> 0"),
    ),
    Case(
        "non_utf8_text",
        lambda t: (
            lambda: run(
                project(
                    t, items=[{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, b'{"id": "c", "text": "caf\xe9"}']
                )
            )
        ),
        PayloadError,
        ("items.jsonl:3", "UTF-8"),
    ),
    Case(
        "window_outside_run",
        lambda t: lambda: run(project(t, with_exp(placement={"mode": "window", "end": 500, "unit": "steps"}))),
        ConfigError,
        ("run.yaml", "experiments[0].placement.end", "outside the run", "100 steps"),
    ),
    Case(
        "window_fraction_above_one",
        lambda t: lambda: run(project(t, with_exp(placement={"mode": "window", "end": 1.2}))),
        ConfigError,
        ("run.yaml:", "experiments[0].placement.end", "outside the run"),
    ),
    Case(
        "start_not_before_end",
        lambda t: lambda: run(project(t, with_exp(placement={"mode": "window", "start": 0.6, "end": 0.4}))),
        ConfigError,
        ("run.yaml:", "experiments[0].placement.start", "less than end"),
    ),
    Case(
        "explicit_step_outside_run",
        lambda t: lambda: run(project(t, with_exp(placement={"mode": "steps", "steps": [3, 100]}))),
        ConfigError,
        ("run.yaml", "experiments[0].placement.steps[1]", "outside the run"),
    ),
    Case(
        "control_fraction_out_of_range",
        lambda t: lambda: run(project(t, with_exp(control_fraction=1.0))),
        ConfigError,
        ("run.yaml:", "experiments[0].control_fraction", "less than 1"),
    ),
    Case(
        "unknown_injector_kind_in_config",
        lambda t: lambda: run(project(t, with_exp(kind="nope"))),
        ConfigError,
        ("run.yaml", "experiments[0].kind", "unknown injector kind 'nope'", "documents"),
    ),
    Case(
        "unknown_injector_kind_in_payload",
        lambda t: lambda: run(project(t, kind="nope")),
        ConfigError,
        ("payload.yaml", "kind", "unknown injector kind 'nope'"),
    ),
    Case(
        "injector_options_rejected",
        lambda t: lambda: run(project(t, with_exp(options={"foo": 1}))),
        ConfigError,
        ("run.yaml", "experiments[0].options.foo", "no options"),
    ),
    Case(
        "undefined_env_var",
        lambda t: lambda: run(project(t, "run_name: x\nrun_dir: ${NOT_SET_ANYWHERE}/r\n")),
        ConfigError,
        ("run.yaml:2", "run_dir", "NOT_SET_ANYWHERE"),
    ),
    Case(
        "bad_override_path",
        lambda t: lambda: run(project(t), ("train.nope=1",)),
        ConfigError,
        ("override 'train.nope=1'", "unknown key 'nope'"),
    ),
    Case(
        "override_index_out_of_range",
        lambda t: lambda: run(project(t), ("experiments.4.repetitions=2",)),
        ConfigError,
        ("override 'experiments.4.repetitions=2'", "out of range"),
    ),
    Case(
        "yaml_syntax_error",
        lambda t: lambda: run(project(t, "run_name: x\ntrain:\n  lr: [1, 2\n")),
        ConfigError,
        ("run.yaml:4", "YAML syntax error"),
    ),
    Case(
        "duplicate_yaml_key",
        lambda t: lambda: run(project(t, "run_name: x\nseed: 1\nseed: 2\n")),
        ConfigError,
        ("run.yaml:3", "seed", "duplicate key"),
    ),
    Case(
        "bad_duration_string",
        lambda t: lambda: run(project(t, {**BASE, "train": {"max_duration": "100 batches"}})),
        ConfigError,
        ("run.yaml:", "train.max_duration", "100 batches"),
    ),
    Case(
        "ep_duration_without_epoch_size",
        lambda t: (
            lambda: parse_duration_steps(
                "2ep", global_batch_size=4, sequence_length=64, steps_per_epoch=None, file=project(t)
            )
        ),
        ConfigError,
        ("run.yaml", "train.max_duration", "epoch"),
    ),
    Case(
        "mds_path_missing",
        lambda t: lambda: run(project(t, {**BASE, "data": {"source": "mds", "path": "no/such/mds"}})),
        ConfigError,
        ("run.yaml:", "data.path", "not found"),
    ),
    Case(
        "top_level_not_a_mapping",
        lambda t: lambda: run(project(t, "- run_name: x\n")),
        ConfigError,
        ("run.yaml:1", "mapping"),
    ),
    Case("impossible_budget", _impossible_budget, PlacementError, ("'docs'", "cap")),
]


def test_at_least_fifteen_cases() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    call = case.make(tmp_path)
    with pytest.raises(case.error) as info:
        call()
    msg = str(info.value)
    for fragment in case.says:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_nothing_is_written_on_bad_input(tmp_path: Path) -> None:
    """A failing config leaves the files it read untouched."""
    cfg = project(tmp_path, with_exp(control_fraction=2))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError):
        run(cfg)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_error_attributes_are_structured(tmp_path: Path) -> None:
    """Tools (the CLI, an IDE) can point at the place without parsing the message."""
    cfg = project(tmp_path, with_exp(control_fraction=2))
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert (Path(info.value.file), info.value.key, info.value.line) == (
        cfg,
        "experiments[0].control_fraction",
        _line_of(cfg, "control_fraction"),
    )


def test_errors_found_after_loading_carry_the_line(tmp_path: Path) -> None:
    """Placement is checked against the run's geometry later, yet still points at its line."""
    cfg = project(tmp_path, with_exp(placement={"mode": "window", "end": 500, "unit": "steps"}))
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert info.value.key == "experiments[0].placement.end"
    assert info.value.line == _line_of(cfg, "end")


def _line_of(path: Path, key: str) -> int:
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip().startswith(f"{key}:"):
            return n
    raise AssertionError(f"{key} not in {path}")


def test_base_project_is_valid(tmp_path: Path) -> None:
    """Guards the cases above: each must fail because of its one change only."""
    run(project(tmp_path))
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["experiments"][0]["name"] == "docs"
