"""Acceptance: a Llama-style model from a local config trained by `multirun train` with loggers, a cosine
schedule and clipping; a second run continues from the first's exported Hugging Face weights."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from multirun.cli import main
from multirun.data.mds import read_dataset_info
from multirun.data.tokenizers import ByteTokenizer
from multirun.run.model import weights_fingerprint
from multirun.run.weights import load_weights
from tests.support import make_dataset, make_payloads

pytestmark = pytest.mark.e2e

STEPS, WARMUP, LR, ALPHA_F = 6, 2, 1.0e-3, 0.1
LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
}


def _config(tmp: Path, name: str, *, model: dict[str, Any], steps: int, train: dict[str, Any]) -> Path:
    if not (tmp / "mds").exists():  # both runs train on the same data
        make_dataset(tmp / "mds", samples=48)
        make_dataset(tmp / "heldout", samples=8)
        make_payloads(tmp / "payloads")
    dataset = read_dataset_info(tmp / "mds")
    doc = {
        "run_name": name,
        "seed": 5,
        "run_dir": str(tmp / name),
        "model": model,
        "data": {
            "source": "mds",
            "path": str(dataset.path),
            "heldout_path": str(tmp / "heldout"),
            "sequence_length": dataset.sequence_length,
        },
        "train": {
            "max_duration": f"{steps}ba",
            "global_batch_size": 4,
            "lr": LR,
            "warmup": f"{WARMUP}ba",
            "device": "cpu",
            "log_interval": "1ba",
            **train,
        },
        "monitoring": {"heldout_rows": 8},
        "injection": {"max_modified_fraction": 0.5},
        "experiments": [{"name": "canaries", "payload": str(tmp / "payloads" / "canaries"), "repetitions": 1}],
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _heldout(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["value"] for r in records if r.get("metric") == "heldout_loss"}


def _cosine(step: int) -> float:
    """Composer's CosineAnnealingWithWarmupScheduler over STEPS, written out."""
    if step < WARMUP:
        return LR * step / WARMUP
    frac = (step - WARMUP) / (STEPS - WARMUP)
    return LR * (ALPHA_F + (1 - ALPHA_F) * 0.5 * (1 + math.cos(math.pi * frac)))


def test_a_llama_trains_with_loggers_cosine_and_clipping_and_a_new_run_continues_from_its_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread: None
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may be written outside tmp_path
    mlruns = tmp_path / "mlruns"
    first = _config(
        tmp_path,
        "first",
        model={"kind": "hf", "config": LLAMA},
        steps=STEPS,
        train={
            "scheduler": {"name": "cosine", "alpha_f": ALPHA_F},
            "clipping": {"type": "norm", "threshold": 0.5},
            "loggers": {
                "file": {"filename": "logs/metrics.txt"},
                "tensorboard": {"log_dir": "tensorboard"},
                "mlflow": {"tracking_uri": mlruns.as_uri(), "experiment_name": "multirun-test", "synchronous": True},
            },
        },
    )
    assert main(["train", str(first), "--no-progress"]) == 0
    run = tmp_path / "first"

    # The file logger: the loss of every step.
    text = (run / "logs" / "metrics.txt").read_text()
    losses = re.findall(r"\[metric\]\[batch=(\d+)\]: loss/train/total: ([0-9.]+)", text)
    assert [int(step) for step, _ in losses] == list(range(STEPS))

    # MLflow's local file store: one run with the same losses, and the learning rate on the cosine.
    (run_metrics,) = mlruns.glob("*/*/metrics")
    logged = [line.split() for line in (run_metrics / "loss" / "train" / "total").read_text().splitlines()]
    assert [int(step) for _, _, step in logged] == list(range(STEPS))
    assert [float(v) for _, v, _ in logged] == pytest.approx([float(v) for _, v in losses], abs=1e-4)
    rates = [line.split() for line in (run_metrics / "lr-DecoupledAdamW" / "group0").read_text().splitlines()]
    # Logged at the end of each step, after the timestamp moved on: the entry of step s is step s - 1's rate.
    assert {int(s): float(v) for _, v, s in rates} == pytest.approx({s: _cosine(s - 1) for s in range(1, STEPS + 1)})

    # TensorBoard's event files (relative log_dir: inside the run directory): the same losses.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")}
    board = EventAccumulator(str(events))
    board.Reload()
    scalars = board.Scalars("loss/train/total")
    assert [e.step for e in scalars] == list(range(STEPS))
    assert [e.value for e in scalars] == pytest.approx([float(v) for _, v in losses], abs=1e-4)

    # The checkpoint is self-contained: the model class, its config and the byte tokenizer.
    checkpoint = run / "checkpoints" / "latest-rank0.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]
    hf_state = state["integrations"]["huggingface"]
    assert hf_state["model"]["config"]["class"] == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    assert "tokenizer.json" in hf_state["tokenizer"]
    assert "GradientClipping" in json.dumps(list(state["algorithms"]), default=str)
    weights = load_weights(checkpoint)
    assert weights.step == STEPS
    assert weights.tokenizer is not None
    assert weights.tokenizer.encode("héllo", add_special_tokens=False) == ByteTokenizer().encode("héllo")
    assert not list(tmp_path.glob("tokenizer-save-dir-*"))  # Composer's default folder for it, left behind

    # Continual pretraining: a new run from the weights `multirun export` wrote starts where the first ended.
    assert main(["export", str(run)]) == 0
    export = run / "export" / "model"
    assert AutoTokenizer.from_pretrained(export, local_files_only=True).encode(
        "héllo", add_special_tokens=False
    ) == ByteTokenizer().encode("héllo")
    second = _config(
        tmp_path, "second", model={"kind": "hf", "config": LLAMA, "init_from": str(export)}, steps=4, train={}
    )
    assert main(["train", str(second), "--no-progress"]) == 0
    first_heldout, second_heldout = _heldout(run), _heldout(tmp_path / "second")
    assert second_heldout[0] == first_heldout[STEPS]  # identical weights, identical held-out rows
    assert second_heldout[0] != first_heldout[0]
    resolved = yaml.safe_load((tmp_path / "second" / "resolved_config.yaml").read_text())
    assert resolved["model"]["init_from"] == str(export)
    assert resolved["model"]["init_fingerprint"] == weights_fingerprint(export)
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert summary["steps_trained"] == 4  # a new run from step 0, not a resumed one
