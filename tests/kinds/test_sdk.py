"""The kind SDK: named random streams, the prepare context, the plugin import rule, the Monitor protocol."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest

from multirun.config import ExperimentConfig
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError
from multirun.kinds.payloads import load_payload
from multirun.kinds.registry import injectors, monitors
from multirun.kinds.sdk import PrepareContext, RandomStream, encode_sequence, split_arms, stream_rng
from multirun.measure.live_model import Monitor
from multirun.plan.static import experiment_rng
from multirun.types import Placement
from tests.helpers_payload import documents, write_payload

REPO = Path(__file__).resolve().parents[2]
TOK = ByteTokenizer()
BUILTIN = ("documents", "contamination", "knowledge", "poison", "watermark", "memorization")


def draws(rng: np.random.Generator) -> list[int]:
    return rng.integers(0, 2**62, 4).tolist()


def test_streams_are_the_numbers_they_always_were() -> None:
    # The numbers that used to be explained in comments; changing one changes every run.
    numbers = {s.name: s.number for s in RandomStream}
    assert numbers == {
        "PLACEMENT": 0,
        "ARMS": 1,
        "POISON_GIBBERISH": 2,
        "WATERMARK_NOISE": 2,
        "WATERMARK_KEYS": 3,
        "KIND_FIRST": 2,
        "KIND_SECOND": 3,
    }
    assert [s for s in RandomStream if s.by_split_key] == [RandomStream.ARMS]
    assert len(set(RandomStream)) == 7  # same numbers, distinct members (no aliases)
    for stream in RandomStream:
        assert draws(stream_rng(17, "exp", stream)) == draws(experiment_rng(17, "exp", stream.number))
    # The planner's generator is experiment_rng's default stream.
    assert draws(stream_rng(5, "canaries", RandomStream.PLACEMENT)) == draws(experiment_rng(5, "canaries"))


def context(tmp_path: Path, **spec: object) -> PrepareContext:
    root = write_payload(tmp_path / "p", documents(10))
    cfg = ExperimentConfig(name=str(spec.pop("name", "docs")), payload=str(root), **spec)  # type: ignore[arg-type]
    return PrepareContext(load_payload(str(root), base_dir=Path("/")), cfg, TOK, 64, 17, Placement("uniform", 0, 100))


def test_context_rng_keys_arms_by_split_key_and_the_rest_by_name(tmp_path: Path) -> None:
    ctx = context(tmp_path, name="docs", arms_key="shared", control_fraction=0.5)
    assert draws(ctx.rng(RandomStream.ARMS)) == draws(experiment_rng(17, "shared", 1))
    assert draws(ctx.rng(RandomStream.WATERMARK_KEYS)) == draws(experiment_rng(17, "docs", 3))
    assert draws(ctx.rng(RandomStream.KIND_FIRST)) == draws(ctx.rng(RandomStream.KIND_FIRST))  # fresh each call
    assert ctx.split_arms(10).tolist() == split_arms(10, 0.5, seed=17, name="shared").tolist()
    assert int((~ctx.split_arms(10)).sum()) == 5


def test_context_helpers(tmp_path: Path) -> None:
    ctx = context(tmp_path, wrap_eos=False, options={"x": 1})
    assert ctx.name == "docs" and ctx.eos == TOK.eos_token_id
    assert ctx.encode("ab") == list(b"ab") and ctx.encode("ab", wrap_eos=True) == encode_sequence(
        TOK, "ab", wrap_eos=True
    )
    assert [rec["id"] for _, rec in ctx.read_items()][:2] == ["doc-000", "doc-001"]
    with pytest.raises(ConfigError) as info:
        ctx.check_no_options("documents")
    assert info.value.key == "options.x"
    assert ctx.monitor_applies("documents")
    other = context(tmp_path, monitor={"name": "knowledge"})
    assert not other.monitor_applies("documents") and other.monitor_applies("knowledge")
    assert not context(tmp_path, monitor={"enabled": False}).monitor_applies("documents")


def test_context_experiment_packs_and_fingerprints(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    exp = ctx.experiment(
        "documents",
        item_ids=["a", "b"],
        treated=np.array([True, False]),
        sequences=[[1, 2, 3]],
        seq_items=[0],
        seq_repetitions=[2.0],
        metadata={"note": 1},
        probes=None,
    )
    assert exp.name == "docs" and exp.token_pool.tolist() == [1, 2, 3] and exp.seq_items.dtype == np.int32
    assert exp.fingerprint == ctx.fingerprint() and exp.metadata["note"] == 1
    assert exp.metadata["payload"] == {
        "name": "test-payload",
        "version": "1.0.0",
        "fingerprint": ctx.payload.fingerprint,
    }
    assert context(tmp_path, repetitions=3).fingerprint() != ctx.fingerprint()


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["injectors", "monitors"])
def test_plugins_import_no_other_plugin(package: str) -> None:
    files = sorted((REPO / package).glob("*.py"))
    assert len(files) >= 7
    for path in files:
        bad = sorted(m for m in _imported_modules(path) if m.split(".")[0] in ("injectors", "monitors"))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}; plugins import only from multirun"


@pytest.mark.parametrize("kind", BUILTIN)
def test_builtin_kinds_follow_the_protocols(kind: str) -> None:
    injector = injectors.get(kind)
    assert injector.kind == kind and list(inspect.signature(injector.prepare).parameters) == ["self", "ctx"]
    monitor = monitors.get(kind)
    for name in ("metrics", "from_experiment", "evaluate"):
        assert hasattr(monitor, name), (kind, name)
    assert isinstance(monitor.metrics, tuple) and monitor.metrics and all(isinstance(m, str) for m in monitor.metrics)
    assert inspect.ismethod(monitor.from_experiment)  # a classmethod, bound to the class
    params = inspect.signature(monitor.from_experiment).parameters
    assert list(params) == ["experiment", "tokenizer", "options", "sequence_length"]
    assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in ("tokenizer", "options", "sequence_length"))
    assert set(Monitor.__annotations__) == {"metrics"}
