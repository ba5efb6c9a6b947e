"""The composition root: one assembly of a run's parts for every caller."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from multirun.config import MonitoringConfig, load_config
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError
from multirun.run.parts import RunParts, assemble_parts
from multirun.types import BatchGeometry, EmbeddingNoise
from tests.helpers_payload import documents, minimal_config, write_config, write_payload

TOK = ByteTokenizer()
GEOMETRY = BatchGeometry(global_batch_size=4, sequence_length=64, num_steps=40)


def _config(tmp: Path, **facts_extra: object) -> Path:
    write_payload(tmp / "payloads" / "canaries", documents(8, prefix="c"))
    write_payload(tmp / "payloads" / "facts", documents(8, prefix="f", text="fact {i} is true"))
    doc = minimal_config(
        canaries={"payload": "payloads/canaries", "repetitions": 2, "monitor": {"every": "10ba"}},
        facts={"payload": "payloads/facts", "repetitions": 1, "control_fraction": 0.25, **facts_extra},
    )
    doc["train"] = {"max_duration": "40ba", "global_batch_size": 4}
    doc["injection"] = {"max_modified_fraction": 0.5}
    doc["monitoring"] = {"every": "20ba"}
    return write_config(tmp / "run.yaml", doc)


def _assemble(config: Path, run_dir: Path, heldout: np.ndarray | None = None) -> RunParts:
    return assemble_parts(
        load_config(config, env={}), tokenizer=TOK, geometry=GEOMETRY, run_dir=run_dir, heldout=heldout
    )


def test_parts_hold_plan_monitors_heldout_and_controllers(tmp_path: Path) -> None:
    controller = {"name": "acquire", "options": {"metric": "text_logprob", "threshold": 0.0}}
    heldout = np.arange(3 * 64).reshape(3, 64) % 200
    parts = _assemble(_config(tmp_path, controller=controller), tmp_path / "run", heldout)
    assert parts.plan.experiment_names == ["canaries", "facts"]
    assert [(m.experiment, m.every) for m in parts.monitors.entries] == [("canaries", 10), ("facts", 20)]
    assert parts.monitors.heldout is heldout and parts.monitors.run_dir == tmp_path / "run"
    assert parts.control is not None and list(parts.control.controllers) == ["facts"]
    assert parts.noise_specs == [None, None]
    assert not (tmp_path / "run").exists()  # assembling writes nothing


def test_without_a_controller_there_is_no_control_loop(tmp_path: Path) -> None:
    assert _assemble(_config(tmp_path), tmp_path / "run").control is None


@pytest.mark.parametrize(
    ("facts_extra", "key"),
    [
        ({"controller": {"name": "acquire", "options": {"metric": "text_logprob", "treshold": 0.0}}}, "treshold"),
        ({"controller": {"name": "acquire", "options": {"metric": "no_such_metric", "threshold": 0.0}}}, "metric"),
        ({"monitor": {"options": {"prefix_tokenz": 8}}}, "prefix_tokenz"),
    ],
)
def test_bad_monitor_and_controller_options_fail_at_assembly(tmp_path: Path, facts_extra: dict, key: str) -> None:
    config = _config(tmp_path, **facts_extra)
    with pytest.raises(ConfigError) as err:
        _assemble(config, tmp_path / "run")
    assert err.value.key is not None and err.value.key.startswith("experiments[1].") and key in str(err.value)
    assert str(config) in str(err.value)


def test_a_fork_keeps_the_monitors_on_another_plan_without_controllers(tmp_path: Path) -> None:
    controller = {"name": "acquire", "options": {"metric": "text_logprob", "threshold": 0.0}}
    parts = _assemble(_config(tmp_path, controller=controller), tmp_path / "run")
    monitoring = MonitoringConfig(every=None, at_fit_start=False, at_fit_end=True)
    arm = parts.fork(parts.plan.restricted(["canaries"]), run_dir=tmp_path / "arm", monitoring=monitoring)
    assert arm.control is None and arm.interaction_after == "none" and arm.run_dir == tmp_path / "arm"
    assert arm.monitors.run_dir == tmp_path / "arm" and arm.monitors.config is monitoring
    # The same monitor objects, each scored only when the fork's monitoring says.
    assert [m.monitor for m in arm.monitors.entries] == [m.monitor for m in parts.monitors.entries]
    assert all(m.every is None for m in arm.monitors.entries)
    assert set(arm.plan.spans.experiment.tolist()) == {0}
    # The original parts are untouched.
    assert parts.control is not None and [m.every for m in parts.monitors.entries] == [10, 20]


def test_noise_specs_follow_the_plan(tmp_path: Path) -> None:
    parts = _assemble(_config(tmp_path), tmp_path / "run")
    spec = EmbeddingNoise(sigma=0.1, seed=3)
    parts.plan.experiments[1].embedding_noise = spec
    assert parts.noise_specs == [None, spec]


def test_the_plan_fingerprint_does_not_depend_on_how_paths_are_spelt(tmp_path: Path) -> None:
    # The config names its payloads relative to itself; resolved_config.yaml names them
    # absolutely. Work after training (export, evaluate, interact) reloads the latter and
    # must find the plan that trained.
    config = _config(tmp_path)
    written = _assemble(config, tmp_path / "run")
    load_config(config, env={}).write(tmp_path / "run")
    resolved = tmp_path / "run" / "resolved_config.yaml"
    assert "payloads/canaries" in resolved.read_text() and str(tmp_path) in resolved.read_text()
    reloaded = _assemble(resolved, tmp_path / "elsewhere")
    assert reloaded.plan.fingerprint == written.plan.fingerprint
    assert [e.fingerprint for e in reloaded.plan.experiments] == [e.fingerprint for e in written.plan.experiments]
