"""Shared pieces of the end-to-end tests: a tiny MDS dataset, payloads, configs, batch capture."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger

from multirun.data.mds import PreparedDataset, demo_corpus_sources, prepare_dataset
from multirun.data.tokenizers import ByteTokenizer
from tests.helpers_payload import documents, write_config, write_payload

REPO = Path(__file__).resolve().parents[1]
SEQUENCE_LENGTH = 64

#: Ledger columns that identify what was injected where, independent of which rank wrote it.
PLACEMENT_COLUMNS = [
    "step",
    "global_row",
    "sample_id",
    "offset",
    "length",
    "experiment",
    "item",
    "sequence",
    "repetition",
    "token_hash",
    "row_fingerprint",
]


def make_dataset(out: Path, *, samples: int, sequence_length: int = SEQUENCE_LENGTH) -> PreparedDataset:
    """A real MDS dataset of about ``samples`` rows cut from the standard library's source."""
    budget = samples * sequence_length  # the byte tokenizer makes one token per byte
    return prepare_dataset(
        demo_corpus_sources(), out, ByteTokenizer(), sequence_length, max_bytes=budget, progress=False
    )


def make_payloads(root: Path) -> dict[str, Path]:
    """Two documents payloads: short canaries and longer facts."""
    canaries = [
        {"id": f"canary-{i:02d}", "text": f"the secret code of vault {i} is {i * 7919 % 10007:05d} zebra"}
        for i in range(12)
    ]
    facts = documents(8, prefix="fact", text="isle Vorlat {i} exports copper")
    return {
        "canaries": write_payload(root / "canaries", canaries, name="canaries"),
        "facts": write_payload(root / "facts", facts, name="facts"),
    }


def run_config(
    tmp: Path,
    dataset: PreparedDataset,
    *,
    steps: int = 24,
    global_batch_size: int = 8,
    seed: int = 5,
    save_interval: str | None = "8ba",
    microbatch: int | None = None,
    experiments: Sequence[Mapping[str, Any]] | None = None,
    name: str = "run",
) -> Path:
    """Write a small run config over ``dataset`` with the two test payloads."""
    payloads = make_payloads(tmp / "payloads")
    if experiments is None:
        experiments = [
            {"name": "canaries", "payload": str(payloads["canaries"]), "repetitions": 3, "control_fraction": 0.25},
            {
                "name": "facts",
                "payload": str(payloads["facts"]),
                "repetitions": 1.5,
                "placement": {"mode": "window", "start": 0.25, "end": 0.75, "unit": "fraction"},
            },
        ]
    doc = {
        "run_name": name,
        "seed": seed,
        "run_dir": str(tmp / name),
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32},
        "data": {"source": "mds", "path": str(dataset.path), "sequence_length": dataset.sequence_length},
        "train": {
            "max_duration": f"{steps}ba",
            "global_batch_size": global_batch_size,
            "device_microbatch_size": microbatch,
            "save_interval": save_interval,
            "save_num_checkpoints_to_keep": -1,
            "warmup": "2ba",
            "device": "cpu",
        },
        "injection": {"max_modified_fraction": 0.3},
        "experiments": list(experiments),
    }
    return write_config(tmp / f"{name}.yaml", doc)


class CaptureBatches(Callback):
    """Records what the model trains on; placed after multirun's callback.

    ``batches[step]`` is the whole host batch after injection; ``microbatches[step]``
    the ``input_ids`` of each microbatch as it reached the model's forward pass.
    """

    def __init__(self) -> None:
        self.batches: dict[int, dict[str, torch.Tensor]] = {}
        self.microbatches: dict[int, list[torch.Tensor]] = {}

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        if event == Event.AFTER_DATALOADER:
            self.batches[step] = {k: v.clone() for k, v in state.batch.items()}
        elif event == Event.BEFORE_FORWARD:
            self.microbatches.setdefault(step, []).append(state.batch["input_ids"].detach().cpu().clone())


def run_cli(
    args: Sequence[str], *, cwd: Path, timeout: int = 600, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m multirun ARGS`` in a subprocess and return the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "multirun", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def placements(table: pa.Table) -> list[tuple]:
    """Ledger rows as comparable tuples, sorted (rank-independent)."""
    plain = table.select(PLACEMENT_COLUMNS).to_pylist()
    return sorted(
        tuple(str(row[c]) if c in ("experiment", "item") else row[c] for c in PLACEMENT_COLUMNS) for row in plain
    )


def free_port() -> int:
    """A TCP port nothing listens on now, for a launcher's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli_ranks(args: Sequence[str], *, cwd: Path, processes: int = 2, timeout: int = 600) -> tuple[int, str]:
    """Run ``python -m multirun ARGS`` under Composer's launcher with ``processes`` processes
    (gloo on CPU); return the exit code and the ranks' stderr logs (``cwd/err_{rank}.log``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable, "-m", "composer.cli.launcher", "-n", str(processes)]
    launcher += ["--master_port", str(free_port()), "--stdout", str(cwd / "out_{rank}.log")]
    launcher += ["--stderr", str(cwd / "err_{rank}.log"), "-m", "multirun", *args]
    done = subprocess.run(launcher, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, "".join(p.read_text() for p in sorted(cwd.glob("err_*.log")))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
