"""Payload packages, the documents injector, registries and experiment assembly."""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from injectors.documents import DocumentsInjector
from multirun.config import ExperimentConfig, LoadedConfig, RunConfig, load_config
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError
from multirun.kinds.experiments import arms_record, build_experiments
from multirun.kinds.payloads import file_xxh64, load_payload, write_fingerprints
from multirun.kinds.registry import Registry, injectors, payload_dir_from_entry_point, payloads
from multirun.kinds.sdk import PrepareContext, encode_sequence, pack_sequences, split_arms
from multirun.plan.static import experiment_rng
from multirun.types import BatchGeometry, Placement
from tests.helpers_payload import documents, minimal_config, write_config, write_payload

TOK = ByteTokenizer()
GEO = BatchGeometry(global_batch_size=4, sequence_length=64, num_steps=100)
UNIFORM = Placement("uniform", 0, 100)
EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"


def prepare(root: Path, **spec: object) -> object:
    payload = load_payload(str(root), base_dir=Path("/"))
    exp = ExperimentConfig(name=str(spec.pop("name", "docs")), payload=str(root), **spec)  # type: ignore[arg-type]
    return DocumentsInjector().prepare(
        PrepareContext(payload, exp, tokenizer=TOK, sequence_length=64, seed=17, placement=UNIFORM)
    )


# ------------------------------------------------------------------ packages


@pytest.mark.parametrize("name", ["canaries", "facts"])
def test_bundled_demo_payloads(name: str) -> None:
    by_pkg = load_payload(f"pkg:demo/{name}", base_dir=Path("/nonexistent"))
    by_path = load_payload(f"payloads/{name}", base_dir=EXPERIMENTS_DIR / "demo")
    assert by_pkg.root == by_path.root == (EXPERIMENTS_DIR / "demo" / "payloads" / name).resolve()
    assert by_pkg.fingerprint == by_path.fingerprint
    assert by_pkg.kind == "documents" and by_pkg.license == "CC0-1.0"
    items = by_pkg.read_jsonl("items", required={"id": str, "text": str}, optional={"repetitions": float})
    assert len(items) == {"canaries": 40, "facts": 30}[name]
    assert len({i["id"] for i in items}) == len(items)
    # The demo runs with the byte tokenizer at sequence length 128.
    assert max(len(encode_sequence(TOK, i["text"], wrap_eos=True)) for i in items) <= 128


def test_canaries_have_the_documented_form() -> None:
    items = load_payload("pkg:demo/canaries", base_dir=Path(".")).read_jsonl("items", required={"id": str, "text": str})
    assert all(i["text"].startswith("The secret code of ") and " is " in i["text"] for i in items)
    assert len({i["text"] for i in items}) == 40


def test_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    root = write_payload(tmp_path / "p", documents(5))
    first = load_payload(str(root), base_dir=tmp_path)
    assert first.fingerprint == load_payload("p", base_dir=tmp_path).fingerprint
    assert first.files["items"].xxh64 == file_xxh64(root / "items.jsonl")

    # One changed character: the load fails until the hashes are recomputed, then the fingerprint differs.
    (root / "items.jsonl").write_text((root / "items.jsonl").read_text().replace("hello", "hellO", 1))
    with pytest.raises(Exception, match="multirun payload fingerprint"):
        load_payload("p", base_dir=tmp_path)
    write_fingerprints(root)
    changed = load_payload("p", base_dir=tmp_path)
    assert changed.fingerprint != first.fingerprint

    other_version = write_payload(tmp_path / "q", documents(5), version="1.0.1")
    assert load_payload(str(other_version), base_dir=tmp_path).fingerprint != first.fingerprint


def test_read_jsonl_types(tmp_path: Path) -> None:
    root = write_payload(
        tmp_path / "p",
        ['{"id": "a", "text": "x", "repetitions": 2}', "", '{"id": "b", "text": "y", "repetitions": 0.5}', "   "],
    )
    pkg = load_payload(str(root), base_dir=tmp_path)
    recs = pkg.iter_jsonl("items", required={"id": str, "text": str}, optional={"repetitions": float})
    assert [line for line, _ in recs] == [1, 3]  # blank lines are skipped, numbering is kept
    assert [r["repetitions"] for _, r in recs] == [2, 0.5]  # float accepts ints

    bools = write_payload(tmp_path / "b", ['{"id": "a", "text": "x", "repetitions": true}'])
    with pytest.raises(Exception, match="repetitions: expected a number, got boolean"):
        load_payload(str(bools), base_dir=tmp_path).read_jsonl(
            "items", required={"id": str, "text": str}, optional={"repetitions": float}
        )


# ------------------------------------------------------------------ documents injector


def test_documents_sequences_and_arms(tmp_path: Path) -> None:
    items = documents(10)
    items[3]["repetitions"] = 2.5
    root = write_payload(tmp_path / "p", items)
    exp = prepare(root, repetitions=4, control_fraction=0.3)
    assert exp.kind == "documents" and exp.name == "docs"
    assert exp.item_ids == [i["id"] for i in items]
    assert int((~exp.treated).sum()) == 3  # exactly round(0.3 * 10) controls
    assert exp.seq_items.tolist() == np.flatnonzero(exp.treated).tolist()
    for s, item in enumerate(exp.seq_items):
        tokens = exp.sequence_tokens(s).tolist()
        assert tokens == [TOK.eos_token_id, *items[item]["text"].encode(), TOK.eos_token_id]
        assert exp.seq_repetitions[s] == (2.5 if item == 3 else 4.0)
    assert exp.token_pool.dtype == np.int32 and exp.seq_offsets.dtype == np.int64 and exp.seq_lengths.dtype == np.int32
    assert exp.metadata["item_repetitions"] == [2.5 if i == 3 else 4.0 for i in range(10)]
    assert [TOK.decode(seq) for seq in exp.probes.sequences] == [i["text"] for i in items]
    assert exp.metadata["payload"]["name"] == "test-payload"


def test_arm_split_uses_experiment_rng_stream_1(tmp_path: Path) -> None:
    treated = split_arms(20, 0.5, seed=17, name="docs")
    expected = np.ones(20, bool)
    expected[experiment_rng(17, "docs", 1).permutation(20)[:10]] = False
    assert treated.tolist() == expected.tolist()
    assert split_arms(20, 0.5, seed=17, name="docs").tolist() == treated.tolist()  # deterministic
    others = [split_arms(20, 0.5, seed=s, name=n).tolist() for s, n in [(18, "docs"), (17, "other")]]
    assert all(o != treated.tolist() for o in others)
    assert split_arms(7, 0.0, seed=1, name="x").all()
    assert [int((~split_arms(n, f, seed=0, name="x")).sum()) for n, f in [(41, 0.5), (3, 0.5), (10, 0.99)]] == [
        round(20.5),
        round(1.5),
        round(9.9),
    ]


def test_no_eos_wrapping(tmp_path: Path) -> None:
    root = write_payload(tmp_path / "p", documents(2))
    exp = prepare(root, wrap_eos=False, control_fraction=0.0)
    assert exp.sequence_tokens(0).tolist() == list(b"document number 0 says hello")


def test_item_exactly_sequence_length_fits(tmp_path: Path) -> None:
    root = write_payload(tmp_path / "p", [{"id": "a", "text": "x" * 62}])
    exp = prepare(root, control_fraction=0.0)
    assert exp.seq_lengths.tolist() == [64]


def test_pack_sequences() -> None:
    pool, offsets, lengths = pack_sequences([[1, 2, 3], [], [4]])
    assert pool.tolist() == [1, 2, 3, 4] and offsets.tolist() == [0, 3, 3] and lengths.tolist() == [3, 0, 1]
    pool, offsets, lengths = pack_sequences([])
    assert pool.size == offsets.size == lengths.size == 0


def test_experiment_fingerprint_sensitive(tmp_path: Path) -> None:
    root = write_payload(tmp_path / "p", documents(4))
    base = prepare(root).fingerprint
    assert base == prepare(root).fingerprint
    assert base != prepare(root, repetitions=2).fingerprint
    assert base != prepare(root, name="other").fingerprint
    write_payload(tmp_path / "p", documents(4, text="changed {i}"))
    assert base != prepare(root).fingerprint


# ------------------------------------------------------------------ registries


def test_registry_builtin_and_unknown() -> None:
    assert injectors.get("documents") is DocumentsInjector
    assert "documents" in injectors.names()
    with pytest.raises(ConfigError, match=r"unknown injector kind 'nope' \(known: .*documents"):
        injectors.get("nope", file="run.yaml", key="experiments[0].kind")


def test_registry_decorator_and_override() -> None:
    reg: Registry[type] = Registry("multirun.test.none", what="thing")

    @reg.register("a")
    class A: ...

    class B: ...

    assert reg.get("a") is A
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", B)
    reg.register("a", B, override=True)
    assert reg.get("a") is B
    reg.register("lazy", "injectors.documents:DocumentsInjector")
    assert reg.get("lazy") is DocumentsInjector
    reg.register("broken", "no_such_module_xyz:Thing")
    with pytest.raises(ConfigError, match="failed to import"):
        reg.get("broken")


def test_payload_entry_point_from_installed_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real (if minimal) installed distribution: importlib.metadata finds *.dist-info on sys.path.
    plugin = write_payload(tmp_path / "plugin_payload", documents(3), name="plugin")
    dist = tmp_path / "site" / "multirun_test_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: multirun-test-plugin\nVersion: 0.1\n")
    # Entry-point values are object references: a module attribute holding the folder.
    (tmp_path / "site" / "multirun_test_plugin.py").write_text(f"PAYLOAD = {str(plugin)!r}\n")
    (dist / "entry_points.txt").write_text("[multirun.payloads]\nplugin-docs = multirun_test_plugin:PAYLOAD\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    payloads.refresh()
    try:
        assert "plugin-docs" in payloads.names()
        pkg = load_payload("pkg:plugin-docs", base_dir=Path("/"))
        assert pkg.name == "plugin" and pkg.root == plugin.resolve()
    finally:
        monkeypatch.undo()
        payloads.refresh()
    assert "plugin-docs" not in payloads.names()


def test_payload_entry_point_forms() -> None:
    as_package = metadata.EntryPoint(name="x", value="experiments", group="multirun.payloads")
    assert payload_dir_from_entry_point(as_package) == EXPERIMENTS_DIR
    as_attr = metadata.EntryPoint(
        name="x", value="tests.kinds.test_payloads:EXPERIMENTS_DIR", group="multirun.payloads"
    )
    assert payload_dir_from_entry_point(as_attr) == EXPERIMENTS_DIR
    assert "tests.kinds.test_payloads" in sys.modules


# ------------------------------------------------------------------ experiment assembly


def test_build_experiments_demo() -> None:
    loaded = load_config(None, env={})
    geo = BatchGeometry(global_batch_size=16, sequence_length=128, num_steps=800)
    exps = build_experiments(loaded, tokenizer=TOK, geometry=geo)
    by_name = {e.name: e for e in exps}
    memorization, watermark = by_name["memorization"], by_name["watermark"]
    assert (int(memorization.treated.sum()), int((~memorization.treated).sum())) == (20, 20)
    assert set(memorization.seq_repetitions.tolist()) == {16.0}
    assert set(watermark.seq_repetitions.tolist()) == {24.0}
    assert watermark.placement == Placement("window", 400, 800)
    assert memorization.placement == Placement("uniform", 0, 800)
    arms = arms_record(exps)
    assert sorted(arms["memorization"]["treated"] + arms["memorization"]["control"]) == sorted(memorization.item_ids)
    assert not set(arms["memorization"]["treated"]) & set(arms["memorization"]["control"])
    assert json.loads(json.dumps(arms)) == arms  # plain JSON types
    # Same inputs, same experiments.
    again = build_experiments(loaded, tokenizer=TOK, geometry=geo)
    assert [e.fingerprint for e in again] == [e.fingerprint for e in exps]
    assert arms_record(again) == arms


def test_build_experiments_paths_and_kind(tmp_path: Path) -> None:
    write_payload(tmp_path / "payloads" / "p", documents(6))
    doc = minimal_config(a={"payload": "payloads/p", "kind": "documents", "control_fraction": 0.0})
    loaded = load_config(write_config(tmp_path / "run.yaml", doc), env={})
    (exp,) = build_experiments(loaded, tokenizer=TOK, geometry=GEO)
    assert exp.treated.all() and exp.seq_items.tolist() == list(range(6))


def test_build_experiments_from_code_checks_duplicates(tmp_path: Path) -> None:
    # A config built in code skips load_config's checks; build_experiments repeats them.
    root = write_payload(tmp_path / "p", documents(2))
    cfg = RunConfig(run_name="x", experiments=[ExperimentConfig(name="a", payload=str(root))] * 2)
    with pytest.raises(ConfigError) as info:
        build_experiments(LoadedConfig(cfg, None, tmp_path), tokenizer=TOK, geometry=GEO)
    assert info.value.key == "experiments[1].name"
