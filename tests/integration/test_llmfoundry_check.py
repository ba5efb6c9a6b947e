"""`multirun check` on an llm-foundry training YAML: its callbacks.multirun block, validated without training.

The YAMLs are llm-foundry training YAMLs (variables, interpolation, the keys its `train`
requires), read by llm-foundry's own config code; nothing is mocked and nothing trains.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from multirun.cli import main
from multirun.data.mds import PreparedDataset
from multirun.integration.foundry_yaml import check_foundry_yaml, is_foundry_yaml
from multirun.integration.llmfoundry import DeferredParts
from multirun.types import BatchGeometry
from tests.support import make_dataset, make_payloads

# An llm-foundry training YAML as its `train` reads it (a tiny MPT). {callbacks} is the
# callbacks section; paths are filled in per test.
FOUNDRY_YAML = """\
variables:
  data_local: {data}
  max_seq_len: 64
  global_seed: 17

max_seq_len: ${{variables.max_seq_len}}
run_name: tiny-mpt

model:
  name: mpt_causal_lm
  init_device: cpu
  d_model: 32
  n_heads: 2
  n_layers: 1
  expansion_ratio: 2
  max_seq_len: ${{variables.max_seq_len}}
  vocab_size: 258

tokenizer:
  name: gpt2
  kwargs:
    model_max_length: ${{variables.max_seq_len}}

train_loader:
  name: text
  dataset:
    local: ${{variables.data_local}}
    split: null
    shuffle: true
    max_seq_len: ${{variables.max_seq_len}}
    shuffle_seed: ${{variables.global_seed}}
  drop_last: true
  num_workers: 0

scheduler:
  name: cosine_with_warmup
  t_warmup: 2ba
  alpha_f: 0.1

optimizer:
  name: decoupled_adamw
  lr: 6.0e-4
  betas: [0.9, 0.95]
  eps: 1.0e-08
  weight_decay: 0.0

max_duration: 20ba
eval_interval: 1000ba
global_train_batch_size: 8
seed: ${{variables.global_seed}}
device_train_microbatch_size: 4
precision: fp32

{callbacks}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], PreparedDataset]:
    root = tmp_path_factory.mktemp("foundry-check")
    # 40 rows of 64 tokens: 1 epoch = 40 // 8 = 5 steps.
    return root, make_payloads(root / "payloads"), make_dataset(root / "mds", samples=40)


def _inline_block(payloads: dict[str, Path], run_dir: Path) -> str:
    return f"""\
callbacks:
  multirun:
    run_dir: {run_dir}
    sequence_length: ${{variables.max_seq_len}}
    seed: 3
    injection: {{max_modified_fraction: 0.3}}
    experiments:
      - {{name: canaries, payload: {payloads["canaries"]}, repetitions: 2}}
      - {{name: facts, payload: {payloads["facts"]}, repetitions: 1}}
"""


def _write(setup: tuple[Path, dict[str, Path], PreparedDataset], name: str, callbacks: str | None = None) -> Path:
    root, payloads, dataset = setup
    if callbacks is None:
        callbacks = _inline_block(payloads, root / "run")
    path = root / name
    path.write_text(FOUNDRY_YAML.format(data=dataset.path, callbacks=callbacks), encoding="utf-8")
    return path


def _check(path: Path, *overrides: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`multirun check PATH --set ...` through the CLI's entry point: exit code and output, one line."""
    args = ["check", str(path)]
    for override in overrides:
        args += ["--set", override]
    code = main(args)
    out = capsys.readouterr().out
    # Rich folds long lines and draws tables: one line of words is what the assertions read.
    return code, re.sub(r"\s+", " ", re.sub(r"[\u2500-\u257f]", " ", out))


def test_inline_block_is_checked_and_planned(
    setup: tuple[Path, dict[str, Path], PreparedDataset], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(setup, "mpt.yaml")
    assert is_foundry_yaml(path)
    code, out = _check(path, capsys=capsys)
    assert code == 0, out
    assert "global_train_batch_size 8, sequence_length 64, max_duration 20ba = 20 steps" in out
    assert "plan: 20 steps x 8 rows x 64 tokens" in out
    assert "canaries" in out and "facts" in out
    assert "callbacks.multirun, payloads, placement, monitors and controllers are valid" in out
    # The plan is the callback's own: DeferredParts from the block, assembled for the YAML's geometry.
    block = yaml.safe_load(_inline_block(setup[1], setup[0] / "run"))["callbacks"]["multirun"]
    block["sequence_length"] = 64
    expected = DeferredParts.from_kwargs(**block).assemble_for(BatchGeometry(8, 64, 20)).plan
    assert check_foundry_yaml(path).parts.plan.fingerprint == expected.fingerprint
    assert not (setup[0] / "run").exists()  # nothing written


def test_config_form_is_checked_and_planned(
    setup: tuple[Path, dict[str, Path], PreparedDataset], capsys: pytest.CaptureFixture[str]
) -> None:
    root, payloads, _ = setup
    multirun_yaml = root / "multirun.yaml"
    multirun_yaml.write_text(
        "run_name: via-config\n"
        "seed: 3\n"
        "injection: {max_modified_fraction: 0.3}\n"
        "experiments:\n"
        f"  - {{name: canaries, payload: {payloads['canaries']}, repetitions: 2}}\n"
        f"  - name: facts\n"
        f"    payload: {payloads['facts']}\n"
        "    placement: {mode: window, unit: steps, start: 5, end: 15}\n",
        encoding="utf-8",
    )
    callbacks = (
        f"callbacks:\n  multirun:\n    config: {multirun_yaml}\n"
        "    sequence_length: ${variables.max_seq_len}\n"
        f"    run_dir: {root / 'run-config'}\n"
    )
    path = _write(setup, "mpt_config.yaml", callbacks)
    code, out = _check(path, capsys=capsys)
    assert code == 0, out
    assert "plan: 20 steps x 8 rows x 64 tokens" in out
    assert re.search(r"facts documents \d+ \d+ \d+ \d+ [\d.]+% 5-15", out), out

    # The window does not fit a 10-step run: the error names both files and the key.
    code, out = _check(path, "max_duration=10ba", capsys=capsys)
    assert code == 2
    assert f"{path}: callbacks.multirun.config: {multirun_yaml}:8: experiments[1].placement.end: window outside" in out


def test_set_overrides_as_llm_foundry_takes_them(
    setup: tuple[Path, dict[str, Path], PreparedDataset], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(setup, "mpt.yaml")
    code, out = _check(path, "max_duration=12ba", capsys=capsys)
    assert code == 0 and "plan: 12 steps x 8 rows x 64 tokens" in out, out
    code, out = _check(path, "max_duration=2049tok", capsys=capsys)  # rounded up to whole batches of 8 x 64
    assert code == 0 and "plan: 5 steps x 8 rows x 64 tokens" in out, out
    code, out = _check(path, "max_duration=80sp", "global_train_batch_size=16", capsys=capsys)
    assert code == 0 and "plan: 5 steps x 16 rows x 64 tokens" in out, out
    # One variable moves max_seq_len, the loader's and the callback's sequence_length together.
    code, out = _check(path, "variables.max_seq_len=128", capsys=capsys)
    assert code == 0 and "plan: 20 steps x 8 rows x 128 tokens" in out, out
    # A list item by index (OmegaConf's from_cli alone cannot merge into a list).
    code, out = _check(path, "callbacks.multirun.experiments.1.repetitions=3", capsys=capsys)
    assert code == 0 and re.search(r"facts documents 4 4 12 ", out), out


def test_epochs_are_counted_from_a_local_dataset_or_refused(
    setup: tuple[Path, dict[str, Path], PreparedDataset], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(setup, "mpt.yaml")
    code, out = _check(path, "max_duration=2ep", capsys=capsys)
    assert code == 0, out
    assert "max_duration 2ep = 10 steps" in out and "1ep = 5 steps: 40 samples" in out
    code, out = _check(path, "max_duration=2ep", "train_loader.dataset.remote=s3://bucket/data", capsys=capsys)
    assert code == 2
    assert f"{path}: max_duration: 2ep: the steps in an epoch are unknown here; give max_duration in ba" in out


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        pytest.param(
            ["callbacks.multirun.experiments.1.payload=/no/such/payload"],
            r"callbacks\.multirun\.experiments\[1\]\.payload: /no/such/payload: payload directory not found",
            id="unknown-payload",
        ),
        pytest.param(
            ["callbacks.multirun.experiments.1.repetitons=3"],
            r"callbacks\.multirun\.experiments\[1\]\.repetitons: unknown key \(allowed: name, payload",
            id="bad-experiment-key",
        ),
        pytest.param(
            ["callbacks.multirun.experiments.0.repetitions=-1"],
            r"callbacks\.multirun\.experiments\[0\]\.repetitions: Input should be greater than 0",
            id="bad-experiment-value",
        ),
        pytest.param(
            ["callbacks.multirun.sequence_length=128"],
            r"callbacks\.multirun\.sequence_length: sequence_length 128 differs from the YAML's max_seq_len 64, "
            r"train_loader\.dataset\.max_seq_len 64",
            id="sequence-length-mismatch",
        ),
        pytest.param(
            ["train_loader.dataset.max_seq_len=32"],
            r"callbacks\.multirun\.sequence_length: sequence_length 64 differs .* train_loader\.dataset\.max_seq_len 32",
            id="loader-sequence-length-mismatch",
        ),
        pytest.param(
            ["callbacks.multirun.sequence_length=null"],
            r"callbacks\.multirun\.sequence_length: set sequence_length to the training sequence length "
            r"\(the YAML has max_seq_len 64",
            id="no-sequence-length",
        ),
        pytest.param(
            ["callbacks.multirun.sequence_lenght=64"],
            r"callbacks\.multirun\.sequence_lenght: unknown key \(allowed: config, sequence_length",
            id="unknown-block-key",
        ),
        pytest.param(
            [
                "callbacks.multirun.experiments.0.placement.mode=window",
                "callbacks.multirun.experiments.0.placement.unit=steps",
                "callbacks.multirun.experiments.0.placement.end=30",
            ],
            r"callbacks\.multirun\.experiments\[0\]\.placement\.end: window outside the run: end 30 steps is "
            r"step 30, but the run has 20 steps",
            id="window-beyond-duration",
        ),
        pytest.param(
            ["max_duration=2ba"],
            # Refused before planning (multirun.plan.checks), at the key that sets the dose.
            r"callbacks\.multirun\.experiments\[0\]\.repetitions: doses too large for the run: .* can hold at most "
            r"\d+ \(2 steps x \d+ tokens, the per-step cap = max_modified_fraction 0\.3 x 8 rows x 64 tokens\)",
            id="too-little-room-in-batch-and-duration",
        ),
        pytest.param(
            ["callbacks.multirun.config=/elsewhere/multirun.yaml"],
            r"callbacks\.multirun\.experiments: give either config \(a multirun YAML\) or inline experiments, "
            r"not both",
            id="both-forms",
        ),
        pytest.param(
            ["model.vocab_size=200"],
            r"callbacks\.multirun\.tokenizer: the tokenizer 'bytes' has 258 ids, more than the model's vocab_size 200",
            id="tokenizer-larger-than-model-vocabulary",
        ),
        pytest.param(
            ["callbacks.multirun.data={path: /data}"],
            r"callbacks\.multirun\.data\.path: unknown key \(allowed: heldout_path",
            id="data-other-than-heldout",
        ),
    ],
)
def test_a_bad_block_names_the_yaml_and_the_key(
    setup: tuple[Path, dict[str, Path], PreparedDataset],
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    where: str,
) -> None:
    path = _write(setup, "mpt.yaml")
    code, out = _check(path, *overrides, capsys=capsys)
    assert code == 2, out
    assert re.search(f"error: {re.escape(str(path))}: {where}", out), out


def test_llm_foundrys_own_checks_name_the_yaml(
    setup: tuple[Path, dict[str, Path], PreparedDataset], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(setup, "mpt.yaml")
    code, out = _check(path, "max_seq_len=${variables.missing}", capsys=capsys)
    assert code == 2 and f"{path}: max_seq_len: Interpolation key 'variables.missing' not found" in out, out
    code, out = _check(path, "learning_rate=0.1", capsys=capsys)  # a top-level key llm-foundry's train rejects
    assert code == 2 and f"{path}: llm-foundry rejects the config: Unused parameters ['learning_rate']" in out, out
    code, out = _check(path, "max_duration", capsys=capsys)
    assert code == 2 and "override 'max_duration': expected KEY=VALUE" in out, out
    no_block = _write(setup, "no_block.yaml", callbacks="callbacks:\n  lr_monitor: {}\n")
    code, out = _check(no_block, capsys=capsys)
    assert code == 2 and f"{no_block}: callbacks.multirun: no multirun callback here" in out, out


def test_a_multirun_yaml_is_not_taken_for_an_llm_foundry_one(tmp_path: Path) -> None:
    multirun_yaml = tmp_path / "run.yaml"
    multirun_yaml.write_text("run_name: x\nmodel: {n_layer: 1}\ntrain: {max_duration: 10ba}\n")
    assert not is_foundry_yaml(multirun_yaml)
    assert not is_foundry_yaml(tmp_path / "missing.yaml")
