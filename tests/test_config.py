"""Run config: loading, substitution, overrides, fingerprints, durations, placement."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from multirun.config import (
    LoadedConfig,
    PlacementConfig,
    RunConfig,
    load_config,
    parse_duration_steps,
    resolve_placement,
)
from multirun.errors import ConfigError
from multirun.types import BatchGeometry, Placement
from tests.helpers_payload import documents, minimal_config, write_config, write_payload

GEO = BatchGeometry(global_batch_size=16, sequence_length=128, num_steps=300)


# ------------------------------------------------------------------ loading


def test_bundled_demo_config_loads() -> None:
    loaded = load_config(None, env={})
    cfg = loaded.config
    assert loaded.source is not None and loaded.source.name == "run.yaml"
    assert loaded.base_dir == loaded.source.resolve().parent
    assert cfg.run_name == "demo"
    assert cfg.train.max_duration == "800ba"
    assert cfg.train.global_batch_size == 16
    assert cfg.data.sequence_length == 128
    assert cfg.train.save_interval == "100ba"
    assert cfg.run_dir == "runs/demo"  # ${MULTIRUN_RUN_DIR:-runs/demo} with an empty env
    names = [e.name for e in cfg.experiments]
    assert {"memorization", "poison", "watermark", "contamination", "knowledge", "negative-control"} <= set(names)
    assert all(e.payload.startswith("pkg:") for e in cfg.experiments)


def test_defaults_and_run_dir(tmp_path: Path) -> None:
    path = write_config(tmp_path / "run.yaml", {"run_name": "tiny"})
    cfg = load_config(path, env={}).config
    assert cfg.seed == 17
    assert cfg.run_dir == "runs/tiny"
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (2, 2, 64)
    assert cfg.data.sequence_length == 128 and cfg.data.shuffle_seed == 9176
    assert cfg.train.device_microbatch_size is None
    assert cfg.injection.max_modified_fraction == 0.05
    assert cfg.experiments == []


def test_microbatch_accepts_auto_int_and_null(tmp_path: Path) -> None:
    for value in ("auto", 4, None):
        path = write_config(tmp_path / "run.yaml", {"run_name": "x", "train": {"device_microbatch_size": value}})
        assert load_config(path, env={}).config.train.device_microbatch_size == value


# ------------------------------------------------------------------ ${VAR}


def test_env_substitution(tmp_path: Path) -> None:
    text = (
        "run_name: ${NAME}\n"
        "seed: ${SEED}\n"
        "run_dir: ${OUT:-out}/${NAME}\n"
        "model: {config_overrides: {note: 'cost $${NOT_A_VAR}'}}\n"
    )
    path = write_config(tmp_path / "run.yaml", text)
    cfg = load_config(path, env={"NAME": "envrun", "SEED": "5"}).config
    assert cfg.run_name == "envrun"
    assert cfg.seed == 5  # substituted text, converted by validation
    assert cfg.run_dir == "out/envrun"
    assert cfg.model.config_overrides["note"] == "cost ${NOT_A_VAR}"


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTIRUN_TEST_NAME", "fromenv")
    path = write_config(tmp_path / "run.yaml", "run_name: ${MULTIRUN_TEST_NAME}\n")
    assert load_config(path).config.run_name == "fromenv"


# ------------------------------------------------------------------ overrides


def test_overrides(tmp_path: Path) -> None:
    write_payload(tmp_path / "p", documents(4))
    doc = minimal_config(a={"payload": "p"}, b={"payload": "p"})
    path = write_config(tmp_path / "run.yaml", doc)
    loaded = load_config(
        path,
        [
            "train.max_duration=50ba",
            "model.n_layer=4",  # the file has no model section: defaults are overridable
            "experiments.0.repetitions=3",
            "experiments[1].placement={mode: window, end: 0.5}",
            "experiments.1.options.anything=[1, 2]",  # options are free-form
            "train.betas=[0.8, 0.9]",
            "tokenizer.kind=bytes",
        ],
        env={},
    )
    cfg = loaded.config
    assert cfg.train.max_duration == "50ba"
    assert cfg.model.n_layer == 4
    assert cfg.experiments[0].repetitions == 3.0
    assert cfg.experiments[1].placement.mode == "window" and cfg.experiments[1].placement.end == 0.5
    assert cfg.experiments[1].options == {"anything": [1, 2]}
    assert cfg.train.betas == (0.8, 0.9)


def test_override_value_substitution(tmp_path: Path) -> None:
    path = write_config(tmp_path / "run.yaml", {"run_name": "x"})
    assert load_config(path, ["run_dir=${ROOT}/r"], env={"ROOT": "/tmp/z"}).config.run_dir == "/tmp/z/r"


def test_override_is_validated(tmp_path: Path) -> None:
    path = write_config(tmp_path / "run.yaml", {"run_name": "x"})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.global_batch_size=0"], env={})
    assert info.value.key == "train.global_batch_size"
    assert "set by override 'train.global_batch_size=0'" in info.value.message


# ------------------------------------------------------------------ errors list every problem


def test_all_problems_reported_together(tmp_path: Path) -> None:
    text = "run_name: x\ntrain:\n  lr: -1\n  precision: fp8\n"
    path = write_config(tmp_path / "run.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    msg = str(info.value)
    assert "run.yaml" in msg
    assert "train.lr (line 3)" in msg and "train.precision (line 4)" in msg


def test_union_errors_are_merged_under_the_field(tmp_path: Path) -> None:
    path = write_config(tmp_path / "run.yaml", {"run_name": "x", "train": {"device_microbatch_size": "many"}})
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == "train.device_microbatch_size"
    assert "'auto'" in info.value.message and "integer" in info.value.message


# ------------------------------------------------------------------ fingerprints and write


def test_fingerprint_stable_and_order_independent(tmp_path: Path) -> None:
    a = write_config(tmp_path / "a.yaml", "run_name: x\nseed: 3\ntrain: {lr: 0.01, global_batch_size: 8}\n")
    b = write_config(tmp_path / "b.yaml", "train: {global_batch_size: 8, lr: 0.01}\nseed: 3\nrun_name: x\n")
    fa = load_config(a, env={}).fingerprint()
    assert fa == load_config(a, env={}).fingerprint()
    assert fa == load_config(b, env={}).fingerprint()
    assert len(fa) == 16 and int(fa, 16) >= 0


def test_fingerprint_sensitive(tmp_path: Path) -> None:
    path = write_config(tmp_path / "run.yaml", {"run_name": "x"})
    base = load_config(path, env={})
    assert base.fingerprint() != load_config(path, ["seed=18"], env={}).fingerprint()
    assert base.fingerprint() != load_config(path, ["train.lr=0.002"], env={}).fingerprint()
    assert base.fingerprint() != base.fingerprint({"e": "0123456789abcdef"})
    assert base.fingerprint({"e": "0123456789abcdef"}) != base.fingerprint({"e": "0123456789abcdee"})


def test_write_resolved_config_reloads(tmp_path: Path) -> None:
    write_payload(tmp_path / "cfg" / "payloads" / "p", documents(3))
    path = write_config(
        tmp_path / "cfg" / "run.yaml", minimal_config(a={"payload": "payloads/p"}, b={"payload": "pkg:demo/facts"})
    )
    loaded = load_config(path, ["seed=99", "model.config_overrides.note='a $${literal}'"], env={})
    assert loaded.config.model.config_overrides["note"] == "a ${literal}"
    out = loaded.write(tmp_path / "run")
    assert out == tmp_path / "run" / "resolved_config.yaml"
    text = out.read_text()
    assert f"# fingerprint: {loaded.fingerprint()}" in text
    again = load_config(out, env={})
    assert again.config.seed == 99
    assert again.config.model.config_overrides["note"] == "a ${literal}"
    assert Path(again.config.experiments[0].payload) == (tmp_path / "cfg" / "payloads" / "p").resolve()
    assert again.config.experiments[1].payload == "pkg:demo/facts"
    # Apart from the absolute payload path, nothing changed.
    a, b = loaded.resolved_dict(), again.resolved_dict()
    a["experiments"][0]["payload"] = b["experiments"][0]["payload"]
    assert a == b


def test_loaded_config_in_code() -> None:
    loaded = LoadedConfig(config=RunConfig(run_name="code"))
    assert loaded.source is None and loaded.config.run_dir == "runs/code"
    assert yaml.safe_load(yaml.safe_dump(loaded.resolved_dict()))["run_name"] == "code"


# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("duration", "steps_per_epoch", "expected"),
    [
        ("200ba", None, 200),
        ("1ba", None, 1),
        ("2048tok", None, 1),  # exactly one batch of 16 x 128
        ("2049tok", None, 2),  # a partial batch still takes a step
        ("1000000tok", None, 489),
        ("2ep", 37, 74),
    ],
)
def test_parse_duration_steps(duration: str, steps_per_epoch: int | None, expected: int) -> None:
    assert (
        parse_duration_steps(duration, global_batch_size=16, sequence_length=128, steps_per_epoch=steps_per_epoch)
        == expected
    )


@pytest.mark.parametrize("bad", ["200", "ba", "2.5ba", "0ba", "10sp", "1dur", "ten ba"])
def test_parse_duration_steps_rejects(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration_steps(bad, global_batch_size=16, sequence_length=128, steps_per_epoch=10)
    assert info.value.key == "train.max_duration"


# ------------------------------------------------------------------ placement


def test_uniform_covers_the_run() -> None:
    assert resolve_placement(PlacementConfig(), GEO, key="p") == Placement("uniform", 0, 300)


def test_fraction_windows_tile_the_run() -> None:
    halves = [
        resolve_placement(PlacementConfig(mode="window", start=s, end=e), GEO, key="p")
        for s, e in [(0.0, 0.5), (0.5, 1.0)]
    ]
    assert [(p.start_step, p.end_step) for p in halves] == [(0, 150), (150, 300)]
    thirds = [
        resolve_placement(PlacementConfig(mode="window", start=s, end=e), GEO, key="p")
        for s, e in [(0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1)]
    ]
    # Adjacent windows share their boundary step exactly: no gap, no overlap.
    assert [(p.start_step, p.end_step) for p in thirds] == [(0, 100), (100, 200), (200, 300)]


def test_window_defaults_and_units() -> None:
    assert resolve_placement(PlacementConfig(mode="window", start=0.9), GEO, key="p") == Placement("window", 270, 300)
    assert resolve_placement(PlacementConfig(mode="window", end=10, unit="steps"), GEO, key="p") == Placement(
        "window", 0, 10
    )
    tps = GEO.tokens_per_step
    tok = PlacementConfig(mode="window", start=tps * 2 + 5, end=tps * 4 + 1, unit="tokens")
    # Token 2*tps+5 is in step 2; token 4*tps is in step 4, so the window is [2, 5).
    assert resolve_placement(tok, GEO, key="p") == Placement("window", 2, 5)
    exact = PlacementConfig(mode="window", start=0, end=tps * 3, unit="tokens")
    assert resolve_placement(exact, GEO, key="p") == Placement("window", 0, 3)


def test_explicit_steps_sorted() -> None:
    p = resolve_placement(PlacementConfig(mode="steps", steps=[200, 5, 299]), GEO, key="p")
    assert p == Placement("steps", 5, 300, (5, 200, 299))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (PlacementConfig(mode="window", start=0, end=301, unit="steps"), "end"),
        (PlacementConfig(mode="window", start=300, unit="steps"), "start"),
        (PlacementConfig(mode="window", start=0.5, end=0.5), "start"),
        (PlacementConfig(mode="window", start=0.1, end=0.101), "end"),  # rounds to an empty window
        (PlacementConfig(mode="window", end=1.5), "end"),
        (PlacementConfig(mode="window", start=-1, unit="steps"), "start"),
        (PlacementConfig(mode="window", start=1.5, unit="steps"), "start"),
        (PlacementConfig(mode="steps", steps=[0, 300]), "steps[1]"),
        (PlacementConfig(mode="steps", steps=[4, 4]), "steps[1]"),
        (PlacementConfig(mode="steps"), "steps"),
        (PlacementConfig(mode="uniform", start=0.2), "start"),
    ],
)
def test_resolve_placement_errors_name_the_field(spec: PlacementConfig, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_placement(spec, GEO, key="experiments[3].placement", file="run.yaml")
    assert info.value.key == f"experiments[3].placement.{field}"
    assert str(info.value).startswith("run.yaml: experiments[3].placement.")


def test_a_resolved_config_loads_again_and_builds_the_same_experiments(tmp_path: Path) -> None:
    # multirun interact reloads run_dir/resolved_config.yaml, which spells out every default.
    from multirun.data.tokenizers import ByteTokenizer
    from multirun.kinds.experiments import arms_record, build_experiments

    original = load_config(None, env={})
    again = load_config(original.write(tmp_path), env={})
    assert again.resolved_dict() == original.resolved_dict()
    geometry = BatchGeometry(global_batch_size=16, sequence_length=128, num_steps=800)
    first = build_experiments(original, tokenizer=ByteTokenizer(), geometry=geometry)
    second = build_experiments(again, tokenizer=ByteTokenizer(), geometry=geometry)
    assert arms_record(first) == arms_record(second)
    assert [e.fingerprint for e in first] == [e.fingerprint for e in second]
