"""Held-out rows on the llm-foundry path, from MDS made by llm-foundry's own converter.

`llmfoundry data_prep convert_text_to_mds` runs for real (its Typer CLI, in process) with
a byte-level BPE tokenizer trained here; the rows multirun reads must be the tokens
llm-foundry's own text dataset trains on.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from streaming import MDSWriter
from transformers import AutoTokenizer

from multirun.cli import main
from multirun.data.mds import prepare_dataset, read_rows
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import InputError
from multirun.integration.llmfoundry import DeferredParts, LlmFoundryMultirunCallback
from tests.data.test_tokenizers import _save_tokenizer
from tests.helpers_payload import documents, write_payload

CONCAT_TOKENS = 48
HELDOUT_ROWS = 6
TEXT = [
    f"Record {i}: the harbour of Vellmark ships {i * 37 % 101} crates of salt and {i * 11 % 29} barrels of oil.\n"
    for i in range(120)
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(tokenizer dir, text folder, MDS written by llm-foundry's converter)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        from llmfoundry.cli.cli import app
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("foundry-heldout")
    tokenizer = _save_tokenizer(root / "tok", corpus=TEXT)
    text = root / "text"
    text.mkdir()
    (text / "part-0.txt").write_text("".join(TEXT), encoding="utf-8")
    out = root / "heldout"
    args = ["data_prep", "convert_text_to_mds", "--output-folder", str(out), "--input-folder", str(text)]
    args += ["--concat-tokens", str(CONCAT_TOKENS), "--tokenizer", str(tokenizer), "--use-tokenizer-eos"]
    args += ["--compression", "zstd", "--processes", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return tokenizer, text, out


def test_heldout_rows_are_llm_foundrys_tokens(converted: tuple[Path, Path, Path]) -> None:
    from llmfoundry.data.text_data import StreamingTextDataset

    tokenizer_dir, text, out = converted
    rows = read_rows(out, HELDOUT_ROWS, CONCAT_TOKENS)
    assert rows.shape == (HELDOUT_ROWS, CONCAT_TOKENS) and rows.dtype == np.int64

    # The converter's own rule: the file's tokens, then EOS, cut into rows of --concat-tokens.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream = tokenizer((text / "part-0.txt").read_text(encoding="utf-8"))["input_ids"] + [tokenizer.eos_token_id]
    expected = np.asarray(stream[: HELDOUT_ROWS * CONCAT_TOKENS]).reshape(HELDOUT_ROWS, CONCAT_TOKENS)
    np.testing.assert_array_equal(rows, expected)

    # And what llm-foundry's text dataset trains on, row by row (cut to a shorter max_seq_len too).
    dataset = StreamingTextDataset(
        tokenizer=tokenizer, max_seq_len=CONCAT_TOKENS - 8, local=str(out), shuffle=False, batch_size=1
    )
    foundry = np.stack([dataset[i].numpy() for i in range(HELDOUT_ROWS)])
    np.testing.assert_array_equal(read_rows(out, HELDOUT_ROWS, CONCAT_TOKENS - 8), foundry)


def test_callback_and_check_take_heldout_rows_from_the_converted_dataset(
    converted: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer_dir, _, out = converted
    payload = write_payload(tmp_path / "facts", documents(6, prefix="fact", text="isle {i} exports copper"))
    kwargs = {
        "run_dir": str(tmp_path / "run"),
        "sequence_length": CONCAT_TOKENS,
        "tokenizer": {"kind": "huggingface", "path": str(tokenizer_dir)},
        "monitoring": {"heldout_rows": HELDOUT_ROWS},
        "injection": {"max_modified_fraction": 0.3},
        "data": {"heldout_path": str(out)},
        "experiments": [{"name": "facts", "payload": str(payload)}],
    }
    LlmFoundryMultirunCallback(**kwargs)  # what llm-foundry builds; its validation is DeferredParts'
    pending = DeferredParts.from_kwargs(**kwargs)
    assert pending.heldout is not None
    np.testing.assert_array_equal(pending.heldout, read_rows(out, HELDOUT_ROWS, CONCAT_TOKENS))

    # Rows shorter than the training sequence length: the key and the dataset are named.
    with pytest.raises(
        InputError, match=rf"callbacks\.multirun\.data\.heldout_path: {re.escape(str(out))}: row 0 has 48"
    ):
        LlmFoundryMultirunCallback(**{**kwargs, "sequence_length": 64})

    # multirun check on an llm-foundry YAML with the same block reports the held-out rows.
    yaml_path = tmp_path / "mpt.yaml"
    yaml_path.write_text(_foundry_yaml(kwargs), encoding="utf-8")
    assert main(["check", str(yaml_path)]) == 0
    out_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert f"held-out loss on {HELDOUT_ROWS} rows of {CONCAT_TOKENS} tokens" in out_text


def _foundry_yaml(block: dict) -> str:
    """A minimal llm-foundry training YAML around ``block`` (JSON is YAML)."""
    return (
        f"max_seq_len: {CONCAT_TOKENS}\n"
        "model: {name: mpt_causal_lm, d_model: 32, n_heads: 2, n_layers: 1, vocab_size: 300}\n"
        "tokenizer: {name: gpt2}\n"
        f"train_loader: {{name: text, dataset: {{local: /data, max_seq_len: {CONCAT_TOKENS}}}, drop_last: true}}\n"
        "optimizer: {name: decoupled_adamw, lr: 1.0e-3}\n"
        "scheduler: {name: constant_with_warmup, t_warmup: 1ba}\n"
        "global_train_batch_size: 8\n"
        "device_train_microbatch_size: 8\n"
        "max_duration: 30ba\n"
        f"callbacks: {{multirun: {json.dumps(block)}}}\n"
    )


def test_datasets_without_token_rows_are_refused_by_path(tmp_path: Path) -> None:
    text_only = tmp_path / "text-mds"
    with MDSWriter(out=str(text_only), columns={"text": "str"}) as writer:
        writer.write({"text": "raw text, never tokenized"})
    with pytest.raises(
        InputError, match=rf"{re.escape(str(text_only))}: no token rows: neither multirun's nor .* 'text'"
    ):
        read_rows(text_only, 1, 8)
    with pytest.raises(InputError, match=r"index\.json.*not an MDS dataset"):
        read_rows(tmp_path / "nothing-here", 1, 8)


def test_older_llm_foundry_bytes_rows_and_multirun_rows_read_too(tmp_path: Path) -> None:
    # llm-foundry's converters before 0.22 wrote tokens as bytes of int64 (its default token_encoding_type).
    stored = np.arange(40, dtype=np.int64).reshape(4, 10) + 1000
    old_format = tmp_path / "bytes-mds"
    with MDSWriter(out=str(old_format), columns={"tokens": "bytes"}) as writer:
        for row in stored:
            writer.write({"tokens": row.tobytes()})
    np.testing.assert_array_equal(read_rows(old_format, 3, 8), stored[:3, :8])

    ours = prepare_dataset([_text_file(tmp_path)], tmp_path / "ours", ByteTokenizer(), 16, progress=False)
    rows = read_rows(ours.path, 2, 16)
    assert rows.shape == (2, 16)
    np.testing.assert_array_equal(rows[0], np.frombuffer(b"Record 0: the ha", dtype=np.uint8))


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("".join(TEXT[:4]), encoding="utf-8")
    return path
