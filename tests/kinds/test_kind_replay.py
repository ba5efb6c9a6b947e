"""The replay kind (the paper's IID experiment): items are rows of the run's own data, read by
sample index; errors before training; the documents monitor sees replayed rows above
not-replayed rows of the same source, and nothing without the replay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from injectors.replay import ReplayInjector
from monitors.documents import DocumentsMonitor
from multirun.config import ExperimentConfig, load_config
from multirun.data.mds import (
    PreparedDataset,
    build_demo_heldout_dataset,
    count_rows,
    demo_corpus_sources,
    demo_heldout_rows,
    prepare_dataset,
    read_rows,
)
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError, PayloadError
from multirun.kinds.experiments import build_experiments, check_payload
from multirun.kinds.payloads import load_package
from multirun.kinds.probes import DocumentsProbes
from multirun.kinds.registry import monitors
from multirun.kinds.sdk import PrepareContext, RunSources
from multirun.measure.live_model import LiveModel
from multirun.measure.stats import compare_means
from multirun.types import BatchGeometry, Placement
from tests.helpers_payload import write_config, write_payload
from tests.kind_training import train_with_injections

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOK = ByteTokenizer()
SEQ = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    out = tmp_path_factory.mktemp("mds") / "data"
    return prepare_dataset(
        demo_corpus_sources()[300:360],
        out,
        TOK,
        SEQ,
        max_bytes=120_000,
        progress=False,
        heldout_fraction=0.3,
    )


def _ctx(root: Path, data: PreparedDataset, **spec: object) -> PrepareContext:
    heldout = data.heldout_path
    assert heldout is not None
    return PrepareContext(
        payload=load_package(root),
        spec=ExperimentConfig(name="iid", payload=str(root), **spec),  # type: ignore[arg-type]
        tokenizer=TOK,
        sequence_length=SEQ,
        seed=4,
        placement=Placement("uniform", 0, 50),
        sources=RunSources(train=lambda: data.path, heldout=lambda: heldout),
    )


def test_items_are_the_named_rows(tmp_path: Path, data: PreparedDataset) -> None:
    root = write_payload(
        tmp_path / "p",
        [
            {"source": "train", "samples": [3, 9]},
            {"source": "train", "sample": 20, "id": "x", "start": 5, "length": 10},
        ],
        kind="replay",
    )
    exp = ReplayInjector().prepare(_ctx(root, data))
    assert isinstance(exp.probes, DocumentsProbes)
    rows = read_rows(data.path, 21)
    assert exp.item_ids == [f"train:{i}" for i in range(3, 9)] + ["x"]
    eos = TOK.eos_token_id
    for k, i in enumerate(range(3, 9)):
        assert exp.probes.sequences[k] == [eos, *rows[i][: SEQ - 2].tolist(), eos]
    assert exp.probes.sequences[-1] == [eos, *rows[20][5:15].tolist(), eos]
    assert exp.metadata["items"][-1] == {"sample": 20, "start": 5, "length": 10}
    assert exp.metadata["source"] == "train" and exp.metadata["dataset"] == str(data.path)
    treated = np.asarray(exp.treated)
    assert 0 < treated.sum() < len(treated)  # both arms, from the same source
    # The held-out split is read the same way; its fingerprint covers the replayed rows.
    held = write_payload(tmp_path / "h", [{"source": "heldout", "samples": [0, 4]}], kind="replay")
    other = ReplayInjector().prepare(_ctx(held, data))
    assert isinstance(other.probes, DocumentsProbes)
    heldout = data.heldout_path
    assert heldout is not None
    assert other.probes.sequences[1][1:-1] == read_rows(heldout, 2)[1][: SEQ - 2].tolist()
    assert other.fingerprint != ReplayInjector().prepare(_ctx(held, data, wrap_eos=False)).fingerprint


@pytest.mark.parametrize(
    "line, key, match",
    [
        ({"source": "train", "samples": [0, 10_000]}, "samples", "outside the train dataset"),
        ({"source": "train", "sample": 10_000}, "sample", "outside the train dataset"),
        ({"source": "held", "sample": 1}, "source", "must be one of train, heldout"),
        ({"source": "train", "sample": 1, "samples": [1, 2]}, None, "exactly one of"),
        ({"source": "train", "samples": [4, 2]}, "samples", "first < stop"),
        ({"source": "train", "sample": 1, "length": 200}, "length", "beyond sample 1"),
        ({"source": "train", "sample": 1, "start": 70}, "start", "beyond sample 1"),
    ],
)
def test_bad_items_name_line_and_key(
    tmp_path: Path, data: PreparedDataset, line: dict, key: str | None, match: str
) -> None:
    root = write_payload(tmp_path / "p", [{"source": "train", "sample": 0, "id": "first"}, line], kind="replay")
    with pytest.raises(PayloadError, match=match) as err:
        ReplayInjector().prepare(_ctx(root, data))
    assert err.value.line == 2 and err.value.key == key and err.value.file == str(root / "items.jsonl")


def test_one_source_and_a_run_needed(tmp_path: Path, data: PreparedDataset) -> None:
    root = write_payload(
        tmp_path / "p", [{"source": "train", "sample": 0}, {"source": "heldout", "sample": 0}], kind="replay"
    )
    with pytest.raises(PayloadError, match="one source per experiment"):
        ReplayInjector().prepare(_ctx(root, data))
    alone = check_payload(
        write_payload(tmp_path / "q", [{"source": "train", "sample": 0}], kind="replay"),
        tokenizer=TOK,
        sequence_length=SEQ,
    )
    assert [p.key for p in alone.problems] == ["payload"] and "multirun check" in alone.problems[0].message


def test_missing_heldout_split_names_the_key(tmp_path: Path) -> None:
    plain = prepare_dataset(demo_corpus_sources()[:5], tmp_path / "plain", TOK, SEQ, max_bytes=20_000, progress=False)
    payload = write_payload(tmp_path / "p", [{"source": "heldout", "samples": [0, 4]}], kind="replay")
    config = write_config(
        tmp_path / "run.yaml",
        {
            "run_name": "iid",
            "data": {"source": "mds", "path": str(plain.path), "sequence_length": SEQ},
            "train": {"max_duration": "10ba", "global_batch_size": 4, "device": "cpu"},
            "experiments": [{"name": "iid", "payload": str(payload)}],
        },
    )
    loaded = load_config(config)
    with pytest.raises(ConfigError, match="no held-out split") as err:
        build_experiments(loaded, tokenizer=TOK, geometry=BatchGeometry(4, SEQ, 10))
    assert err.value.key == "data.heldout_path" and err.value.file == str(config)


def test_replayed_rows_gain_over_never_replayed_rows(tmp_path: Path, data: PreparedDataset) -> None:
    """The uniqueness condition: held-out rows replayed 32 times vs never, over the run's own stream."""
    heldout = data.heldout_path
    assert heldout is not None
    # 60 rows spread over the held-out documents; the arms split them at random.
    picks = np.linspace(0, count_rows(heldout) - 1, 60).astype(int)
    root = write_payload(tmp_path / "p", [{"source": "heldout", "sample": int(i)} for i in picks], kind="replay")
    exp = ReplayInjector().prepare(_ctx(root, data, repetitions=32, control_fraction=0.5))
    sequences = [exp.sequence_tokens(i).tolist() for i in range(len(exp.seq_items))]
    assert len(sequences) == 30 and all(len(s) == SEQ for s in sequences)
    # The background is the training split itself, as in a run: replayed and control rows differ
    # only in the replay (over other text, the replay also taught the controls their documents' style).
    stream = torch.from_numpy(read_rows(data.path, count_rows(data.path)))
    assert monitors.get("replay") is DocumentsMonitor
    monitor = DocumentsMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ)

    effects = {}
    for arm, injected in (("replayed", sequences), ("not injected", [])):
        model = train_with_injections(injected, 32, sequence_length=SEQ, background=stream)
        (scores,) = monitor.evaluate(LiveModel(model, pad_token_id=TOK.pad_token_id, max_length=SEQ, batch_size=32))
        assert scores.metric == "text_logprob" and scores.item_ids == exp.item_ids
        treated = scores.treated
        effects[arm] = compare_means(scores.scores[treated], scores.scores[~treated], metric="text_logprob")
    replayed, negative = effects["replayed"], effects["not injected"]
    print(
        f"replay: text_logprob effect {replayed.effect:.3f} nats/token, p={replayed.p_value:.2g}; "
        f"not injected: {negative.effect:.3f}, p={negative.p_value:.2g}"
    )
    assert replayed.effect > 0.5 and replayed.p_value < 0.01
    assert negative.p_value > 0.05 and negative.effect < replayed.effect / 3


def test_demo_heldout_split_is_the_heldout_loss_rows(tmp_path: Path) -> None:
    path = build_demo_heldout_dataset(TOK, SEQ, train_max_bytes=100_000, rows=300, cache_dir=tmp_path)
    np.testing.assert_array_equal(read_rows(path, 300), demo_heldout_rows(TOK, SEQ, count=300, train_max_bytes=100_000))
    stamp = (path / "index.json").stat().st_mtime_ns
    assert build_demo_heldout_dataset(TOK, SEQ, train_max_bytes=100_000, rows=300, cache_dir=tmp_path) == path
    assert (path / "index.json").stat().st_mtime_ns == stamp and [p.name for p in tmp_path.iterdir()] == [path.name]


GEOMETRY = BatchGeometry(16, SEQ, 1000)


def _demo_run(tmp_path: Path, payload: str, **monitoring: int) -> Path:
    return write_config(
        tmp_path / "run.yaml",
        {
            "run_name": "iid",
            "data": {"source": "demo", "sequence_length": SEQ, "demo_max_bytes": 100_000},
            "train": {"max_duration": "1000ba", "global_batch_size": 16, "device": "cpu"},
            "injection": {"max_modified_fraction": 0.2},
            "monitoring": monitoring,
            "experiments": [
                {
                    "name": "iid",
                    "payload": payload,
                    "placement": {"mode": "window", "start": 0.8, "end": 1.0, "unit": "fraction"},
                }
            ],
        },
    )


def test_demo_package_replays_the_demos_heldout_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTIRUN_CACHE", str(tmp_path / "cache"))
    loaded = load_config(_demo_run(tmp_path, "pkg:demo/iid"))
    (exp,) = build_experiments(loaded, tokenizer=TOK, geometry=GEOMETRY)
    heldout = demo_heldout_rows(TOK, SEQ, count=2048, train_max_bytes=100_000)
    samples = [where["sample"] for where in exp.metadata["items"]]
    assert samples == list(range(64, 64 + 16 * 48, 16)) and exp.metadata["source"] == "heldout"
    assert isinstance(exp.probes, DocumentsProbes) and exp.probes.groups is not None
    for sequence, sample in zip(exp.probes.sequences, samples):
        assert sequence[1:-1] == heldout[sample][: SEQ - 2].tolist()
    # Uniqueness: the doses are the groups (x1, x8), each in both arms; recency: the placement.
    groups = np.asarray(exp.probes.groups)
    assert sorted(set(groups)) == ["x1", "x8"] and exp.metadata["groups"] == exp.probes.groups
    for label in ("x1", "x8"):
        assert 0 < exp.treated[groups == label].sum() < (groups == label).sum()
    assert exp.seq_repetitions.tolist() == [float(g[1:]) for g in groups[exp.seq_items]]
    assert exp.placement.start_step == 800
    monitor = DocumentsMonitor.from_experiment(exp, tokenizer=TOK, options={}, sequence_length=SEQ)
    assert monitor.groups == exp.probes.groups  # reported per group against all controls


def test_replaying_the_heldout_loss_rows_names_the_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTIRUN_CACHE", str(tmp_path / "cache"))
    payload = write_payload(
        tmp_path / "p", [{"source": "heldout", "sample": 40}, {"source": "heldout", "samples": [10, 20]}], kind="replay"
    )
    with pytest.raises(PayloadError, match="held-out loss evaluates") as err:
        build_experiments(
            load_config(_demo_run(tmp_path, str(payload), heldout_rows=16)),
            tokenizer=TOK,
            geometry=GEOMETRY,
        )
    assert (err.value.line, err.value.key) == (2, "samples") and "monitoring.heldout_rows" in err.value.message
    # Without the held-out loss every row may be replayed.
    (exp,) = build_experiments(
        load_config(_demo_run(tmp_path, str(payload), heldout_rows=0)),
        tokenizer=TOK,
        geometry=GEOMETRY,
    )
    assert exp.item_ids == ["heldout:40", *[f"heldout:{i}" for i in range(10, 20)]]
