"""Trainer settings from the run config: scheduler, clipping, FSDP, loggers (the Trainer's arguments)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from composer.algorithms import GradientClipping
from composer.loggers import FileLogger, MLFlowLogger
from composer.optim import ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler, LinearWithWarmupScheduler

from multirun.config import LoadedConfig, load_config
from multirun.errors import ConfigError
from multirun.run.trainer import build_scheduler, run_logging, trainer_settings


def _loaded(*overrides: str) -> LoadedConfig:
    return load_config(None, list(overrides), env={})


def _fields(scheduler: object) -> dict[str, object]:
    """A Composer scheduler's settings, those of the schedulers it is made of included."""
    return {
        k: _fields(v) if hasattr(v, "__dict__") and "Scheduler" in type(v).__name__ else v
        for k, v in vars(scheduler).items()
    }


def test_the_default_schedule_is_the_one_every_run_had() -> None:
    # LinearWithWarmupScheduler(t_warmup=train.warmup, alpha_f=0.1): the demo's schedule before the choice.
    for overrides in ((), ("train.warmup=25ba",)):
        loaded = _loaded(*overrides)
        scheduler = build_scheduler(loaded)
        expected = LinearWithWarmupScheduler(t_warmup=loaded.config.train.warmup, alpha_f=0.1)
        assert type(scheduler) is LinearWithWarmupScheduler
        assert _fields(scheduler) == _fields(expected)


def test_scheduler_names_map_to_composer_schedulers() -> None:
    cosine = build_scheduler(_loaded("train.scheduler={name: cosine, alpha_f: 0.2}"))
    assert isinstance(cosine, CosineAnnealingWithWarmupScheduler)
    assert _fields(cosine) == _fields(CosineAnnealingWithWarmupScheduler(t_warmup="10ba", alpha_f=0.2))
    constant = build_scheduler(_loaded("train.scheduler={name: constant, warmup: 5ba}", "train.warmup=5ba"))
    assert _fields(constant) == _fields(ConstantWithWarmupScheduler(t_warmup="5ba"))


def test_clipping_and_fsdp_are_shared_trainer_settings() -> None:
    settings = trainer_settings(
        _loaded(
            "train.clipping={type: norm, threshold: 1.5}",
            "train.fsdp={sharding_strategy: FULL_SHARD, mixed_precision: PURE, state_dict_type: sharded}",
        )
    )
    (clipping,) = settings["algorithms"]
    assert isinstance(clipping, GradientClipping)
    assert (clipping.clipping_type, clipping.clipping_threshold) == ("norm", 1.5)
    assert settings["parallelism_config"] == {
        "fsdp": {"sharding_strategy": "FULL_SHARD", "mixed_precision": "PURE", "state_dict_type": "sharded"}
    }
    plain = trainer_settings(_loaded())
    assert plain["algorithms"] == [] and "parallelism_config" not in plain
    assert plain["loggers"] == []  # interaction arms log nothing


def test_an_unknown_fsdp_setting_names_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        trainer_settings(_loaded("train.fsdp={sharding_stratgy: FULL_SHARD}"))
    assert info.value.key == "train.fsdp.sharding_stratgy"
    assert "sharding_strategy" in str(info.value)  # the known keys are listed


def test_loggers_are_composer_loggers_writing_into_the_run_directory(tmp_path: Path) -> None:
    loaded = _loaded(
        "train.loggers={console: true, file: {filename: 'logs/{rank}.txt'}, mlflow: {tracking_uri: 'file:///x'}}"
    )
    logging = run_logging(loaded, tmp_path / "run", progress=True)
    file, mlflow = logging["loggers"]
    assert isinstance(file, FileLogger) and isinstance(mlflow, MLFlowLogger)
    assert file.filename_format == str(tmp_path / "run" / "logs" / "{rank}.txt")
    assert mlflow.run_name == "demo" and mlflow.tracking_uri == "file:///x"
    # Console lines every train.log_interval instead of the progress bar.
    assert (logging["log_to_console"], logging["progress_bar"], logging["console_log_interval"]) == (
        True,
        False,
        "10ba",
    )
    default = run_logging(_loaded(), tmp_path, progress=True)
    assert (default["loggers"], default["log_to_console"], default["progress_bar"]) == ([], False, True)


def test_tensorboard_needs_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = _loaded("train.loggers={tensorboard: {}}")
    (logger,) = run_logging(loaded, Path("run"), progress=False)["loggers"]  # the test extra installs it
    assert type(logger).__name__ == "TensorboardLogger"
    # Not installed: a None entry in sys.modules is how importlib reports a missing module.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError) as info:
        run_logging(loaded, Path("run"), progress=False)
    assert info.value.key == "train.loggers.tensorboard"
    assert "pip install 'multirun-composer[tensorboard]'" in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.scheduler.warmup=5ba", "train.scheduler.warmup"),  # train.warmup is 10ba in the demo's file
        ("train.scheduler={name: constant, alpha_f: 0.5}", "train.scheduler.alpha_f"),
        ("train.scheduler.name=exponential", "train.scheduler.name"),
        ("train.clipping={type: norm}", "train.clipping.threshold"),
        ("train.fsdp=[1, 2]", "train.fsdp"),
        ("train.loggers.mlflow.tracking_url=x", "override 'train.loggers.mlflow.tracking_url=x'"),
    ],
)
def test_bad_trainer_settings_name_their_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _loaded(override)
    assert info.value.key == key
