"""Bad run configs are refused before training, by code that ``check`` and ``train`` share (issue 16, items 4-5).

Each case writes a small valid project, breaks one value of ``run.yaml`` and runs what
``multirun check`` runs (load, tokenizer, dataset, geometry, :func:`assemble_parts`,
:func:`check_model`); the error must be a :class:`ConfigError` naming the file, the key
and, where the key is in the file, its line. A few cases also go through
:func:`prepare_run` (what ``multirun train`` runs) to show that train refuses them the
same way, before a Trainer exists. The outcome table is docs/reliability-inputs.md.
"""

from __future__ import annotations

import copy
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import pytest

from multirun.cli import main
from multirun.config import ConfigWarning, load_config
from multirun.errors import ConfigError
from multirun.run.inputs import heldout_rows, resolve_dataset, run_dir_of, run_geometry, run_tokenizer
from multirun.run.model import check_model
from multirun.run.parts import RunParts, assemble_parts
from multirun.run.trainer import prepare_run
from tests.helpers_payload import documents, minimal_config, write_config, write_payload


def base(tmp: Path) -> dict[str, Any]:
    """100 steps of 16 x 64 tokens (cap 51 tokens per step), six 30-token documents."""
    doc = minimal_config(docs={"payload": "payloads/p"})
    doc["train"]["global_batch_size"] = 16
    doc["data"]["demo_max_bytes"] = 200_000
    doc["monitoring"] = {"heldout_rows": 0}
    doc["run_dir"] = str(tmp / "run")
    return doc


def project(tmp: Path, doc: dict[str, Any]) -> Path:
    write_payload(tmp / "payloads" / "p", documents(6))
    return write_config(tmp / "run.yaml", doc)


def check(cfg: Path) -> RunParts:
    """What `multirun check` runs, minus the printing."""
    loaded = load_config(cfg, env={})
    tokenizer = run_tokenizer(loaded)
    dataset = resolve_dataset(loaded, tokenizer, progress=False)
    parts = assemble_parts(
        loaded,
        tokenizer=tokenizer,
        geometry=run_geometry(loaded, dataset),
        run_dir=run_dir_of(loaded),
        heldout=heldout_rows(loaded, tokenizer, dataset.sequence_length),
    )
    check_model(loaded, tokenizer, dataset.sequence_length)
    return parts


def line_of(cfg: Path, key: str) -> int:
    for n, line in enumerate(cfg.read_text().splitlines(), start=1):
        if line.strip().removeprefix("- ").startswith(f"{key}:"):
            return n
    raise AssertionError(f"{key} not in {cfg}")


def setting(path: str, value: Any) -> Any:
    """A change of the base config: ``path`` dotted, ``experiments.0`` for list items."""

    def change(doc: dict[str, Any]) -> None:
        node: Any = doc
        *parents, last = path.split(".")
        for seg in parents:
            node = node[int(seg)] if seg.isdigit() else node.setdefault(seg, {})
        node[last] = value

    return change


# (id, changes, key the error names, words in the message); the line is asserted when
# the key's last segment is in the file.
CASES: list[tuple[str, list[Any], str, str]] = [
    ("seed_negative", [setting("seed", -5)], "seed", "greater than or equal to 0"),
    ("seed_too_large", [setting("seed", 2**40)], "seed", "less than or equal to"),
    (
        "placement_start_nan",
        [setting("experiments.0.placement", {"mode": "window", "start": float("nan")})],
        "experiments[0].placement.start",
        "finite",
    ),
    ("lr_inf", [setting("train.lr", float("inf"))], "train.lr", "finite"),
    ("weight_decay_inf", [setting("train.weight_decay", float("inf"))], "train.weight_decay", "finite"),
    ("betas_nan", [setting("train.betas", [float("nan"), 0.9])], "train.betas[0]", "finite"),
    ("alpha_f_nan", [setting("train.scheduler", {"alpha_f": float("nan")})], "train.scheduler.alpha_f", "finite"),
    ("clipping_inf", [setting("train.clipping", {"threshold": float("inf")})], "train.clipping.threshold", "finite"),
    ("monitoring_alpha_nan", [setting("monitoring.alpha", float("nan"))], "monitoring.alpha", "finite"),
    (
        "max_modified_fraction_nan",
        [setting("injection", {"max_modified_fraction": float("nan")})],
        "injection.max_modified_fraction",
        "finite",
    ),
    ("repetitions_inf", [setting("experiments.0.repetitions", float("inf"))], "experiments[0].repetitions", "finite"),
    (
        "repetitions_1e15",
        [setting("experiments.0.repetitions", 1e15)],
        "experiments[0].repetitions",
        "can hold at most 5100",
    ),
    (
        "dose_beyond_window",
        [
            setting("experiments.0.repetitions", 30),
            setting("experiments.0.placement", {"mode": "window", "end": 0.1}),
        ],
        "experiments[0].repetitions",
        "can hold at most 510 (10 steps x 51 tokens",
    ),
    (
        "doses_beyond_run_together",
        [
            setting(
                "experiments",
                [{"name": n, "payload": "payloads/p", "repetitions": 10} for n in ("a", "b", "c", "d", "e", "f")],
            )
        ],
        "experiments[5].repetitions",
        "together",
    ),
    (
        "repetitions_round_to_zero",
        [setting("experiments.0.repetitions", 0.001)],
        "experiments[0].repetitions",
        "rounds to 0",
    ),
    (
        "no_controls",
        [setting("experiments.0.control_fraction", 0)],
        "experiments[0].control_fraction",
        "no control items",
    ),
    (
        "no_treated_items",
        [setting("experiments.0.control_fraction", 0.95)],
        "experiments[0].control_fraction",
        "no treated items",
    ),
    ("max_duration_huge", [setting("train.max_duration", "100000000000000ba")], "train.max_duration", "at most"),
    ("max_duration_huge_tokens", [setting("train.max_duration", f"{10**30}tok")], "train.max_duration", "at most"),
    ("max_duration_zero", [setting("train.max_duration", "0ba")], "train.max_duration", "at least 1ba"),
    ("save_interval_zero", [setting("train.save_interval", "0ba")], "train.save_interval", "at least 1ba"),
    ("log_interval_zero", [setting("train.log_interval", "0tok")], "train.log_interval", "at least 1tok"),
    ("save_interval_gibberish", [setting("train.save_interval", "often")], "train.save_interval", "time string"),
    ("shuffle_seed_negative", [setting("data.shuffle_seed", -1)], "data.shuffle_seed", "greater than or equal"),
    ("canonical_nodes_huge", [setting("data.num_canonical_nodes", 10**9)], "data.num_canonical_nodes", "canonical"),
    ("n_resamples_huge", [setting("monitoring.n_resamples", 10**12)], "monitoring.n_resamples", "less than or equal"),
    ("interaction_steps_huge", [setting("interaction", {"steps": 10**15})], "interaction.steps", "less than or equal"),
    ("run_dir_is_a_file", [setting("run_dir", "{tmp}/afile")], "run_dir", "is not a directory"),
    ("run_dir_under_a_file", [setting("run_dir", "{tmp}/afile/run")], "run_dir", "is a file"),
    (
        "n_positions_short",
        [setting("model", {"config_overrides": {"n_positions": 16}})],
        "model.config_overrides.n_positions",
        "shorter than data.sequence_length 64",
    ),
    (
        "vocab_size_small",
        [setting("model", {"config_overrides": {"vocab_size": 10}})],
        "model.config_overrides.vocab_size",
        "smaller than the tokenizer's 258",
    ),
    ("n_embd_not_divisible", [setting("model", {"n_embd": 65})], "model.n_embd", "divisible"),
    ("model_too_large", [setting("model", {"n_embd": 10**12, "n_head": 1})], "model", "cannot be built"),
]


def _case(tmp: Path, changes: list[Any]) -> Path:
    (tmp / "afile").write_text("a file where a directory should be\n")
    doc = copy.deepcopy(base(tmp))
    for change in changes:
        change(doc)
    if isinstance(doc.get("run_dir"), str):
        doc["run_dir"] = doc["run_dir"].format(tmp=tmp)
    return project(tmp, doc)


def test_base_config_is_valid(tmp_path: Path) -> None:
    """Guards the cases: each fails because of its one change."""
    parts = check(_case(tmp_path, []))
    assert parts.plan.result.placed == {"docs": 3}


@pytest.mark.parametrize(("case", "changes", "key", "words"), CASES, ids=[c[0] for c in CASES])
def test_check_refuses(tmp_path: Path, case: str, changes: list[Any], key: str, words: str) -> None:
    cfg = _case(tmp_path, changes)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            check(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = info.value
    assert peak < 200 << 20, f"{case}: {peak / 2**20:.0f} MiB traced"  # no dose-sized array was made
    assert err.file is not None and Path(err.file) == cfg, case
    assert err.key == key, (case, str(err))
    assert words in str(err), (case, str(err))
    leaf = key.rsplit(".", 1)[-1]
    lines = cfg.read_text().splitlines()
    if not key.endswith("]") and any(_holds(line, leaf) for line in lines):
        # The line named is one that sets the key (the first one when only one experiment has it).
        assert err.line is not None and _holds(lines[err.line - 1], leaf), (case, str(err))
        if sum(_holds(line, leaf) for line in lines) == 1:
            assert err.line == line_of(cfg, leaf), (case, str(err))


def _holds(line: str, key: str) -> bool:
    return line.strip().removeprefix("- ").startswith(f"{key}:")


@pytest.mark.parametrize(
    "case", ["no_controls", "repetitions_1e15", "run_dir_is_a_file", "vocab_size_small", "save_interval_zero"]
)
def test_train_refuses_the_same_before_building(tmp_path: Path, case: str) -> None:
    """`multirun train` runs the same checks: the same error, and no run directory, no Trainer."""
    _, changes, key, words = next(c for c in CASES if c[0] == case)
    cfg = _case(tmp_path, changes)
    with pytest.raises(ConfigError) as info:
        prepare_run(load_config(cfg, env={}), progress=False)
    assert info.value.key == key and words in str(info.value)
    assert not (tmp_path / "run").exists()
    assert (tmp_path / "afile").is_file()


def test_explicit_run_dir_is_checked_too(tmp_path: Path) -> None:
    cfg = _case(tmp_path, [])
    with pytest.raises(ConfigError) as info:
        prepare_run(load_config(cfg, env={}), progress=False, run_dir=tmp_path / "afile" / "run")
    assert info.value.key == "--run-dir" and "is a file" in str(info.value)


def test_no_controls_is_fine_without_the_monitor(tmp_path: Path) -> None:
    """Documented: the two-arm requirement is the monitor's; an unmeasured experiment may have one arm."""
    cfg = _case(
        tmp_path,
        [setting("experiments.0.control_fraction", 0), setting("experiments.0.monitor", {"enabled": False})],
    )
    parts = check(cfg)
    assert parts.plan.result.placed == {"docs": 6}


def test_fractional_repetitions_below_one_warn(tmp_path: Path) -> None:
    """Some treated items get no span: allowed (it is how fractions work), but said, naming the experiment."""
    cfg = _case(tmp_path, [setting("experiments.0.repetitions", 0.5)])
    with pytest.warns(ConfigWarning, match="experiment 'docs': 3 of 3 treated sequences have repetitions below 1"):
        parts = check(cfg)
    assert parts.plan.result.placed == {"docs": 2}  # round(3 x 0.5) = 2 of the 3 treated documents


def test_check_prints_warnings_for_intervals_that_never_fire(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _case(
        tmp_path,
        [
            setting("train.save_interval", "500ba"),
            setting("train.log_interval", "2000sp"),
            setting("train.warmup", "1000000tok"),
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # check must catch them itself, not leak them
        assert main(["check", str(cfg)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: train.save_interval 500ba is 500 steps, longer than the run (100 steps)" in out
    assert "only the end-of-training checkpoint" in out
    assert "warning: train.log_interval 2000sp is 125 steps" in out
    assert "warning: train.warmup 1000000tok is 977 steps" in out


def test_cli_error_keeps_brackets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rich markup must not eat a message's brackets (``got [nan, 0.9]`` printed as ``got``)."""
    cfg = _case(tmp_path, [setting("train.betas", [0.9, 1.5])])
    assert main(["check", str(cfg)]) == 2
    assert "[0.9, 1.5]" in capsys.readouterr().out
