"""MDS preparation, the id-carrying StreamingDataset, dataloaders and the cached demo corpus."""

from __future__ import annotations

import json
import os
import sysconfig
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from multirun.data.mds import (
    INFO_FILE,
    IdStreamingDataset,
    PreparedDataset,
    build_dataloader,
    build_demo_dataset,
    collate_lm_batch,
    demo_corpus_sources,
    prepare_dataset,
    read_dataset_info,
)
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import InputError

TOK = ByteTokenizer()
L = 16

# Sorted order of the files below (relative paths): a.txt, b.txt, empty.txt, sub/c.txt, sub/d.md
DOCS = {
    "b.txt": "Second document, with accents: déjà vu. " * 3,
    "a.txt": "First document.\nIt has two lines and some words to fill rows. " * 4,
    "sub/c.txt": "Third: 東京 and Zürich, multi-byte characters across row boundaries. " * 2,
    "sub/d.md": "A markdown file, filtered out by suffix in one test.\n",
    "empty.txt": "",
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for rel, text in DOCS.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


def _expected_stream(names: list[str]) -> list[int]:
    out: list[int] = []
    for name in names:
        if DOCS[name]:  # empty files are skipped
            out += TOK.encode(DOCS[name]) + [TOK.eos_token_id]
    return out


ALL_SORTED = ["a.txt", "b.txt", "empty.txt", "sub/c.txt", "sub/d.md"]


@pytest.fixture
def prepared(corpus: Path, tmp_path: Path) -> PreparedDataset:
    return prepare_dataset([corpus], tmp_path / "mds", TOK, L, progress=False, size_limit=1024)


def _rows(info: PreparedDataset) -> np.ndarray:
    ds = build_dataloader(info.path, batch_size=1, shuffle=False).dataset
    assert isinstance(ds, IdStreamingDataset)
    return np.stack([ds.get_item(i)["input_ids"].numpy() for i in range(ds.num_samples)])


# --------------------------------------------------------------------------- preparation


def test_round_trip_rows_and_text(prepared: PreparedDataset) -> None:
    stream = _expected_stream(ALL_SORTED)
    assert prepared.num_samples == len(stream) // L
    assert prepared.sequence_length == L and prepared.tokenizer == "bytes"
    # size_limit=1024 forces several shards, so ids cross shard boundaries.
    index = json.loads((prepared.path / "index.json").read_text())
    assert len(index["shards"]) > 1

    rows = _rows(prepared)
    assert rows.shape == (prepared.num_samples, L)
    assert rows.flatten().tolist() == stream[: prepared.num_samples * L]

    # Decoding the rows gives back the documents, separated by EOS (the last one cut).
    flat = rows.flatten().tolist()
    docs, cur = [], []
    for t in flat:
        if t == TOK.eos_token_id:
            docs.append(TOK.decode(cur))
            cur = []
        else:
            cur.append(t)
    texts = [DOCS[n] for n in ALL_SORTED if DOCS[n]]
    assert docs == texts[: len(docs)]
    assert bytes(cur) == texts[len(docs)].encode()[: len(cur)]

    meta = prepared.metadata
    assert meta["dropped_tail_tokens"] == len(stream) - prepared.num_samples * L
    assert meta["skipped_empty"] == 1 and meta["num_documents"] == 4
    assert meta["tokenizer_fingerprint"] == TOK.fingerprint() == prepared.tokenizer_fingerprint


def test_info_file_and_fingerprints(prepared: PreparedDataset, corpus: Path, tmp_path: Path) -> None:
    on_disk = json.loads((prepared.path / INFO_FILE).read_text())
    for key in (
        "sequence_length",
        "num_samples",
        "tokenizer",
        "tokenizer_fingerprint",
        "sources_fingerprint",
        "fingerprint",
    ):
        assert key in on_disk
    again = read_dataset_info(prepared.path)
    assert again == prepared and again.metadata == on_disk
    assert read_dataset_info(prepared.path / INFO_FILE) == prepared

    # Same sources elsewhere -> same fingerprints; another length -> another dataset.
    moved = tmp_path / "moved"
    corpus.rename(moved)
    same = prepare_dataset([moved], tmp_path / "mds2", TOK, L, progress=False)
    assert same.fingerprint == prepared.fingerprint
    assert same.metadata["sources_fingerprint"] == on_disk["sources_fingerprint"]
    other = prepare_dataset([moved], tmp_path / "mds3", TOK, L + 1, progress=False)
    assert other.fingerprint != prepared.fingerprint


def test_suffixes_files_and_max_bytes(corpus: Path, tmp_path: Path) -> None:
    txt = prepare_dataset([corpus], tmp_path / "txt", TOK, L, progress=False, suffixes=[".txt"])
    stream = _expected_stream(["a.txt", "b.txt", "empty.txt", "sub/c.txt"])
    assert txt.num_samples == len(stream) // L
    assert _rows(txt).flatten().tolist() == stream[: txt.num_samples * L]

    # Explicit files keep their given order; max_bytes cuts inside c.txt's first multi-byte char.
    c_bytes = DOCS["sub/c.txt"].encode()
    cut = c_bytes.index("東".encode()) + 1
    budget = len(DOCS["a.txt"].encode()) + cut
    info = prepare_dataset(
        [corpus / "a.txt", corpus / "sub" / "c.txt", corpus / "b.txt"], tmp_path / "cut", TOK, 8,
        progress=False, max_bytes=budget,
    )  # fmt: skip
    meta = info.metadata
    assert meta["truncated_last_document"] is True
    assert meta["num_documents"] == 2
    # The split character is dropped, not half-kept.
    assert meta["num_source_bytes"] == budget - 1
    expected = TOK.encode(DOCS["a.txt"]) + [256] + list(c_bytes[: cut - 1]) + [256]
    assert _rows(info).flatten().tolist() == expected[: info.num_samples * 8]


def test_invalid_utf8_names_the_file(corpus: Path, tmp_path: Path) -> None:
    bad = corpus / "sub" / "bad.txt"
    bad.write_bytes(b"valid start \xff\xfe broken")
    out = tmp_path / "mds"
    with pytest.raises(InputError, match="UTF-8") as err:
        prepare_dataset([corpus], out, TOK, L, progress=False)
    assert err.value.file == str(bad)
    assert not out.exists()  # nothing half-written is left behind

    info = prepare_dataset([corpus], out, TOK, L, progress=False, skip_invalid=True)
    assert info.metadata["skipped_invalid"] == [str(bad)]
    assert info.num_samples == len(_expected_stream(ALL_SORTED)) // L


def test_prepare_input_errors(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as err:
        prepare_dataset([tmp_path / "missing"], tmp_path / "o1", TOK, L, progress=False)
    assert err.value.file == str(tmp_path / "missing")

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="not empty"):
        prepare_dataset([corpus], busy, TOK, L, progress=False)
    assert (busy / "keep.txt").read_text() == "user data"

    with pytest.raises(InputError, match="fewer than one sequence"):
        prepare_dataset([corpus / "sub" / "d.md"], tmp_path / "o2", TOK, 10_000, progress=False)
    assert not (tmp_path / "o2").exists()


def test_read_dataset_info_errors(prepared: PreparedDataset, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a multirun dataset") as err:
        read_dataset_info(tmp_path)
    assert err.value.file == str(tmp_path / INFO_FILE)

    info_file = prepared.path / INFO_FILE
    good = info_file.read_text()
    info_file.write_text("{not json")
    with pytest.raises(InputError) as err:
        read_dataset_info(prepared.path)
    assert err.value.file == str(info_file) and err.value.line == 1

    data = json.loads(good)
    del data["sequence_length"]
    info_file.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        read_dataset_info(prepared.path)
    assert err.value.key == "sequence_length" and err.value.file == str(info_file)


# --------------------------------------------------------------------------- loading


def test_sample_id_is_the_global_index_and_reaches_the_batch(prepared: PreparedDataset) -> None:
    rows = _rows(prepared)
    loader = build_dataloader(prepared.path, batch_size=4, shuffle=True)
    ds = loader.dataset
    sample = ds[3]
    assert sample["sample_id"] == 3 and sample["input_ids"].dtype == torch.int64
    assert sample["input_ids"].tolist() == rows[3].tolist()

    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, L) and batch["sample_id"].shape == (4,)
    for row, sid in zip(batch["input_ids"], batch["sample_id"].tolist()):
        assert row.tolist() == rows[sid].tolist()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_epoch_covers_each_sample_once(prepared: PreparedDataset, num_workers: int) -> None:
    n = prepared.num_samples
    assert n % 3 != 0  # the last batch is partial
    loader = build_dataloader(prepared.path, batch_size=3, shuffle=True, drop_last=False, num_workers=num_workers)
    ids = [int(i) for b in loader for i in b["sample_id"]]
    assert Counter(ids) == Counter(range(n))
    assert ids != sorted(ids)  # actually shuffled

    # drop_last drops exactly the partial batch.
    dropped = build_dataloader(prepared.path, batch_size=3, shuffle=True, num_workers=num_workers)
    kept = [int(i) for b in dropped for i in b["sample_id"]]
    assert len(kept) == n - n % 3 and len(set(kept)) == len(kept)


def test_two_loaders_over_one_dir_in_one_process(prepared: PreparedDataset) -> None:
    a = build_dataloader(prepared.path, batch_size=2, shuffle=True)
    b = build_dataloader(prepared.path, batch_size=2, shuffle=True)
    c = build_dataloader(prepared.path, batch_size=2, shuffle=True, shuffle_seed=1)
    # Interleaved iteration: the loaders share no state.
    pairs = list(zip(a, b))
    assert len(pairs) == prepared.num_samples // 2
    order_a = [int(i) for x, _ in pairs for i in x["sample_id"]]
    order_b = [int(i) for _, y in pairs for i in y["sample_id"]]
    assert order_a == order_b  # pinned seed and canonical nodes: same global order
    order_c = [int(i) for x in c for i in x["sample_id"]]
    assert order_c != order_a and len(order_c) == len(order_a) == len(set(order_c))
    # A second epoch over the first loader works too.
    assert len([1 for _ in a]) == len(pairs)


def test_build_dataloader_rejects_non_mds(tmp_path: Path, prepared: PreparedDataset) -> None:
    with pytest.raises(InputError, match=r"index\.json") as err:
        build_dataloader(tmp_path, batch_size=2)
    assert err.value.file == str(tmp_path / "index.json")


def test_collate_lm_batch() -> None:
    samples = [{"input_ids": torch.arange(5) + k, "sample_id": 10 + k} for k in range(3)]
    batch = collate_lm_batch(samples)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "sample_id"}
    assert batch["input_ids"].shape == (3, 5) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"], batch["input_ids"])
    batch["labels"][0, 0] = -100
    assert batch["input_ids"][0, 0] == 0  # labels is a copy
    assert batch["attention_mask"].dtype == torch.int64 and bool((batch["attention_mask"] == 1).all())
    assert batch["sample_id"].tolist() == [10, 11, 12] and batch["sample_id"].dtype == torch.int64
    with pytest.raises(ValueError):
        collate_lm_batch(
            [{"input_ids": torch.arange(5), "sample_id": 0}, {"input_ids": torch.arange(4), "sample_id": 1}]
        )


# --------------------------------------------------------------------------- demo corpus


def test_demo_corpus_sources() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = demo_corpus_sources()
    assert len(sources) > 100
    rel = [p.relative_to(stdlib) for p in sources]
    assert [r.parts for r in rel] == sorted(r.parts for r in rel)
    assert all(p.suffix == ".py" and p.is_file() for p in sources)
    for r in rel:
        assert not {"site-packages", "test", "idlelib"} & set(r.parts[:-1]), r
    assert stdlib / "os.py" in sources


def test_demo_dataset_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_demo_dataset(TOK, 64, max_bytes=200_000, cache_dir=tmp_path, progress=False)
    assert first.path.parent == tmp_path
    assert first.num_samples > 0 and first.metadata["num_source_bytes"] <= 200_000
    files = sorted(p for p in first.path.iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in files}

    t0 = time.perf_counter()
    second = build_demo_dataset(TOK, 64, max_bytes=200_000, cache_dir=tmp_path, progress=False)
    assert time.perf_counter() - t0 < 2.0
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in sorted(second.path.iterdir())} == stamps  # not rewritten
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temp dirs left

    # $MULTIRUN_CACHE is the default cache dir.
    monkeypatch.setenv("MULTIRUN_CACHE", str(tmp_path))
    assert build_demo_dataset(TOK, 64, max_bytes=200_000, progress=False).path == first.path

    # Another sequence length is another cache entry; a damaged entry is rebuilt.
    other = build_demo_dataset(TOK, 32, max_bytes=200_000, cache_dir=tmp_path, progress=False)
    assert other.path != first.path and other.fingerprint != first.fingerprint
    (first.path / INFO_FILE).unlink()
    rebuilt = build_demo_dataset(TOK, 64, max_bytes=200_000, cache_dir=tmp_path, progress=False)
    assert rebuilt == first and (rebuilt.path / INFO_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.path.name, other.path.name])

    # The rows really are the standard library's text.
    ds = build_dataloader(first.path, batch_size=1, shuffle=False).dataset
    head = TOK.decode(ds.get_item(0)["input_ids"].tolist())
    assert head == demo_corpus_sources()[0].read_text(encoding="utf-8")[: len(head)]
    assert os.path.basename(str(first.path)).startswith("demo-L64-")
