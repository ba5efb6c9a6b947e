"""The `multirun` command line: prepare, check, train, ledger, payload."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multirun.cli import main
from multirun.data.mds import read_dataset_info
from multirun.ledger import Ledger
from tests.helpers_payload import documents, write_payload
from tests.support import REPO, make_dataset, run_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    dataset = make_dataset(tmp / "mds", samples=60)
    config = run_config(tmp, dataset, steps=12, save_interval=None, name="cli")
    assert main(["train", str(config), "--no-progress"]) == 0
    return tmp / "cli"


def test_prepare_writes_an_mds_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "text"
    source.mkdir()
    (source / "a.txt").write_text("hello world " * 40)
    (source / "b.txt").write_text("second document " * 30)
    assert main(["prepare", str(tmp_path / "out"), str(source), "--sequence-length", "32"]) == 0
    info = read_dataset_info(tmp_path / "out")
    assert info.sequence_length == 32
    assert info.num_samples == (480 + 1 + 480 + 1) // 32
    assert f"wrote {info.num_samples} sequences" in capsys.readouterr().out


def test_train_prints_summary_and_writes_run_dir(trained_run: Path) -> None:
    assert (trained_run / "report" / "report.html").is_file()  # the run ends with its report
    assert (trained_run / "training.jsonl").is_file()
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["steps_trained"] == 12
    assert {e["experiment"] for e in summary["experiments"]} == {"canaries", "facts"}


def test_tables_piped_into_a_log_keep_their_rows_whole(trained_run: Path) -> None:
    # A cluster job's output goes to a file: an 80-column terminal width would fold the
    # ledger table's 8 columns (about 95 characters) into unreadable fragments.
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [sys.executable, "-m", "multirun", "ledger", str(trained_run)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert any("exposures/item" in line and "last step" in line for line in out.splitlines()), out


def test_ledger_summary_query_and_export(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = Ledger.open(trained_run)
    assert main(["ledger", str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "canaries" in out and "facts" in out

    first = ledger.table.to_pylist()[0]
    assert main(["ledger", str(trained_run), "--experiment", first["experiment"], "--item", first["item"]]) == 0
    assert "matching spans" in capsys.readouterr().out

    out_csv = tmp_path / "canaries.csv"
    assert main(["ledger", str(trained_run), "--experiment", "canaries", "--export", str(out_csv)]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    expected = ledger.query(experiment="canaries")
    assert len(rows) == expected.num_rows > 0
    assert {r["experiment"] for r in rows} == {"canaries"}

    out_jsonl = tmp_path / "all.jsonl"
    assert main(["ledger", str(trained_run), "--steps", "0:6", "--export", str(out_jsonl)]) == 0
    lines = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert lines and all(0 <= r["step"] < 6 for r in lines)
    assert len(lines) == ledger.query(steps=(0, 6)).num_rows


def test_report_command_writes_html_and_markdown(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(trained_run), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").read_text().count("data:image/png;base64") >= 3
    assert "report.html" in capsys.readouterr().out


def test_bad_config_exits_with_a_message_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("run_name: x\ntrain:\n  global_batch_sise: 4\n")
    assert main(["check", str(config)]) == 2
    out = capsys.readouterr().out
    assert "bad.yaml" in out and "global_batch_sise" in out


def test_payload_fingerprint_repairs_an_edited_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_payload(tmp_path / "p", documents(3))
    (root / "items.jsonl").write_text(json.dumps({"id": "new", "text": "edited"}) + "\n")
    assert main(["payload", "check", str(root)]) == 2
    assert "items.jsonl" in capsys.readouterr().out
    assert main(["payload", "fingerprint", str(root)]) == 0
    assert main(["payload", "check", str(root)]) == 0


@pytest.mark.parametrize(
    ("experiment", "key"),
    [
        (
            {
                "monitor": {"every": "4ba"},
                "controller": {"name": "acquire", "options": {"metric": "text_logprob", "treshold": 0.5}},
            },
            "treshold",
        ),
        ({"monitor": {"options": {"prefix_tokenz": 8}}}, "prefix_tokenz"),
    ],
    ids=["controller", "monitor"],
)
def test_check_rejects_mistyped_controller_and_monitor_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], experiment: dict, key: str
) -> None:
    # `check` assembles the run as `train` does: a typo fails here, not minutes into training.
    dataset = make_dataset(tmp_path / "mds", samples=60)
    good = run_config(tmp_path, dataset, steps=12, name="good")
    assert main(["check", str(good)]) == 0
    payloads = tmp_path / "payloads"
    bad = run_config(
        tmp_path,
        dataset,
        steps=12,
        name="bad",
        experiments=[{"name": "facts", "payload": str(payloads / "facts"), "repetitions": 1, **experiment}],
    )
    capsys.readouterr()
    assert main(["check", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "bad.yaml" in out and key in out and "experiments[0]" in out
