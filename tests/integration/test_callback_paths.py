"""The callback outside `multirun train`: built from an llm-foundry YAML through the
`llmfoundry_callbacks_with_config` entry point, and on plain tensor batches without sample ids."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from composer import Callback, Trainer
from composer.models import ComposerModel
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from multirun.data.mds import PreparedDataset, build_dataloader
from multirun.errors import ConfigError, PayloadError
from multirun.integration.callback import MultirunCallback
from multirun.integration.llmfoundry import LlmFoundryMultirunCallback
from multirun.ledger import Ledger, token_hash
from multirun.run.model import build_gpt2
from tests.support import CaptureBatches, as_numpy, make_dataset, make_payloads

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return make_dataset(tmp_path_factory.mktemp("paths") / "mds", samples=80)


def _foundry_callback_kwargs(tmp: Path) -> dict:
    payloads = make_payloads(tmp / "payloads")
    # What an llm-foundry YAML gives under `callbacks:` (a dict of name -> kwargs).
    text = f"""
callbacks:
  multirun:
    run_dir: {tmp / "multirun"}
    sequence_length: 64
    seed: 3
    injection: {{max_modified_fraction: 0.3}}
    experiments:
      - {{name: canaries, payload: {payloads["canaries"]}, repetitions: 2}}
      - {{name: facts, payload: {payloads["facts"]}, repetitions: 1}}
"""
    return yaml.safe_load(text)["callbacks"]["multirun"]


def test_llmfoundry_entry_point_builds_a_working_callback(tmp_path: Path, dataset: PreparedDataset) -> None:
    (entry,) = [e for e in entry_points(group="llmfoundry_callbacks_with_config") if e.name == "multirun"]
    callback_class = entry.load()
    assert callback_class is LlmFoundryMultirunCallback and issubclass(callback_class, MultirunCallback)
    callback = callback_class(**_foundry_callback_kwargs(tmp_path))
    capture = CaptureBatches()
    trainer = Trainer(
        model=build_gpt2(vocab_size=258, sequence_length=64, n_layer=1, n_head=2, n_embd=32, eos_token_id=256),
        train_dataloader=build_dataloader(dataset.path, batch_size=4),
        max_duration="12ba",
        callbacks=[callback, capture],
        device="cpu",
        progress_bar=False,
    )
    trainer.fit()
    trainer.close()
    ledger = Ledger.open(tmp_path / "multirun")
    assert len(ledger) == len(callback.plan.spans) > 0  # planned at FIT_START from the trainer's batch and duration
    assert callback.plan.geometry.global_batch_size == 4 and callback.plan.geometry.num_steps == 12
    for row in ledger.table.to_pylist():
        batch = capture.batches[row["step"]]
        got = as_numpy(batch["input_ids"][row["local_row"], row["offset"] : row["offset"] + row["length"]])
        experiment = callback.plan.experiments[callback.plan.experiment_names.index(row["experiment"])]
        np.testing.assert_array_equal(got, experiment.sequence_tokens(row["sequence"]))
    assert (tmp_path / "multirun" / "summary.json").is_file()


def test_llmfoundry_path_runs_controllers_in_process(tmp_path: Path, dataset: PreparedDataset) -> None:
    kwargs = _foundry_callback_kwargs(tmp_path)
    kwargs["monitoring"] = {"every": "4ba", "n_resamples": 200}
    # Room for every span the controller asks for (what cannot be placed stops the run).
    kwargs["injection"] = {**kwargs.get("injection", {}), "max_modified_fraction": 0.5}
    kwargs["experiments"][1]["control_fraction"] = 0.25
    kwargs["experiments"][1]["controller"] = {
        "name": "acquire",
        "options": {"metric": "text_logprob", "threshold": 0.0, "initial_rate": 1, "max_rate": 2},
    }
    callback = LlmFoundryMultirunCallback(**kwargs)
    trainer = Trainer(
        model=build_gpt2(vocab_size=258, sequence_length=64, n_layer=1, n_head=2, n_embd=32, eos_token_id=256),
        train_dataloader=build_dataloader(dataset.path, batch_size=4),
        max_duration="12ba",
        callbacks=[callback],
        device="cpu",
        progress_bar=False,
    )
    trainer.fit()
    trainer.close()
    run_dir = tmp_path / "multirun"
    decisions = [json.loads(line) for line in (run_dir / "controller.jsonl").read_text().splitlines()]
    assert [d["step"] for d in decisions] == [0, 4, 8, 12]
    facts = Ledger.open(run_dir).query(experiment="facts").to_pylist()
    assert facts, "the controller placed no spans"
    for row in facts:  # every span was asked for by the decision of its window
        assert decisions[row["step"] // 4]["exposures"][row["item"]] > 0
    Ledger.open(run_dir).check_integrity()


def test_llmfoundry_kwargs_are_validated_at_construction(tmp_path: Path) -> None:
    kwargs = _foundry_callback_kwargs(tmp_path)
    with pytest.raises(ConfigError, match="sequence_length"):
        LlmFoundryMultirunCallback(**{k: v for k, v in kwargs.items() if k != "sequence_length"})
    with pytest.raises(ConfigError, match="repetitions"):
        LlmFoundryMultirunCallback(**{**kwargs, "experiments": [{"name": "x", "payload": "p", "repetitions": -1}]})
    broken = dict(kwargs)
    (Path(kwargs["experiments"][0]["payload"]) / "items.jsonl").write_text('{"id": "a", "text": "changed"}\n')
    with pytest.raises(PayloadError, match=r"items\.jsonl"):
        LlmFoundryMultirunCallback(**broken)


def test_llm_foundry_builds_the_callback_from_its_yaml_name(tmp_path: Path) -> None:
    # llm-foundry itself (the foundry extra), as `train_from_yaml` builds a callback from the
    # `callbacks:` section: its registry finds the entry point and hands it the YAML kwargs.
    from llmfoundry.command_utils import train_from_yaml
    from llmfoundry.utils.builders import build_callback

    assert callable(train_from_yaml)
    kwargs = _foundry_callback_kwargs(tmp_path)
    callback = build_callback("multirun", dict(kwargs))
    assert type(callback) is LlmFoundryMultirunCallback
    with pytest.raises(ConfigError, match="sequence_length"):
        build_callback("multirun", {k: v for k, v in kwargs.items() if k != "sequence_length"})


class TokenRows(Dataset):
    """Plain token tensors: no dict, no sample ids."""

    def __init__(self, rows: int, length: int) -> None:
        self.data = torch.randint(0, 200, (rows, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


class TensorBatchLM(ComposerModel):
    def __init__(self) -> None:
        super().__init__()
        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=258, n_positions=64, n_layer=1, n_head=2, n_embd=32))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def loss(self, outputs: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return outputs


def test_plain_tensor_batches_are_keyed_by_row_content(tmp_path: Path) -> None:
    kwargs = _foundry_callback_kwargs(tmp_path)
    callback = LlmFoundryMultirunCallback(**kwargs)
    data = TokenRows(48, 64)
    seen: list[torch.Tensor] = []

    class Keep(Callback):  # records the batch the model trained on
        def after_dataloader(self, state, logger):  # type: ignore[no-untyped-def]
            seen.append(state.batch.clone())

    trainer = Trainer(
        model=TensorBatchLM(),
        train_dataloader=DataLoader(data, batch_size=4, shuffle=False),
        max_duration="12ba",
        callbacks=[callback, Keep()],
        device="cpu",
        progress_bar=False,
    )
    trainer.fit()
    trainer.close()
    table = Ledger.open(tmp_path / "multirun").table.to_pylist()
    assert table and all(row["sample_id"] == -1 for row in table)
    injected = [np.zeros((4, 64), dtype=bool) for _ in seen]
    for row in table:
        # Without sample ids a step's rows are ordered by their original content's fingerprint.
        original = as_numpy(data.data[row["step"] * 4 : row["step"] * 4 + 4])
        fingerprints = [token_hash(r) for r in original]
        assert row["row_fingerprint"] == fingerprints[row["local_row"]]
        by_content = np.argsort(np.array(fingerprints, dtype=np.uint64).view(np.int64), kind="stable")
        assert row["global_row"] == int(np.flatnonzero(by_content == row["local_row"])[0])
        start, end = row["offset"], row["offset"] + row["length"]
        experiment = callback.plan.experiments[callback.plan.experiment_names.index(row["experiment"])]
        np.testing.assert_array_equal(
            as_numpy(seen[row["step"]][row["local_row"], start:end]), experiment.sequence_tokens(row["sequence"])
        )
        injected[row["step"]][row["local_row"], start:end] = True
    for step, batch in enumerate(seen):
        original = as_numpy(data.data[step * 4 : step * 4 + 4])
        np.testing.assert_array_equal(as_numpy(batch)[~injected[step]], original[~injected[step]])
