"""A controller from a third-party package: registered only through the
``multirun.controllers`` entry-point group of a (real, minimal) installed distribution,
found by name and built by the run's factory, its options checked like a built-in's."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from multirun.config import load_config
from multirun.control.controllers import CONTROLLERS, Controller, controllers
from multirun.control.loop import ControlLoop, build_controllers
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError
from multirun.kinds.registry import monitors
from multirun.plan.run_plan import build_run_plan
from multirun.types import BatchGeometry
from tests.helpers_payload import documents, minimal_config, write_config, write_payload

TOK = ByteTokenizer()

PLUGIN = '''
from multirun.control.controllers import ControllerBase, Option
from multirun.control.controllers.options import at_least_one, check_metric


class EveryItemController(ControllerBase):
    """``spans`` spans of every treated item per window, whatever the scores."""

    name = "every-item"
    OPTIONS = {
        "metric": Option(str, help="a monitor metric (only checked)"),
        "spans": Option(int, 1, at_least_one, "spans per item per window"),
    }

    def __init__(self, experiment, *, metric, spans, window_steps, num_steps):
        super().__init__(experiment, window_steps=window_steps, num_steps=num_steps)
        self.metric, self.spans = metric, spans

    @classmethod
    def validate(cls, opts, metrics_available):
        check_metric(opts["metric"], metrics_available)

    def decide(self, *, step, records, experiment, num_steps):
        lo, hi = self._begin(step, experiment, num_steps)
        chosen = {}
        for item in self.treated_items if hi > lo else ():
            seqs = self.seqs_of(item).tolist()
            chosen[item] = [seqs[k % len(seqs)] for k in range(self.spans)]
        return self._decision(step, (lo, hi), chosen, {"spans": sum(map(len, chosen.values()))})

    def state_dict(self):
        return self._base_state()

    def load_state_dict(self, state):
        self._load_base(state)
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    site = tmp_path / "site"
    dist = site / "multirun_test_controller-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: multirun-test-controller\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[multirun.controllers]\nevery-item = multirun_test_controller:EveryItemController\n"
    )
    (site / "multirun_test_controller.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(site))
    controllers.refresh()
    try:
        yield
    finally:
        monkeypatch.undo()
        controllers.refresh()


def _loaded(tmp: Path, options: dict):  # type: ignore[no-untyped-def]
    write_payload(tmp / "payloads" / "p", documents(6))
    doc = minimal_config(
        docs={
            "payload": "payloads/p",
            "monitor": {"every": "10ba"},
            "controller": {"name": "every-item", "options": options},
        }
    )
    doc["injection"] = {"max_modified_fraction": 0.5}
    loaded = load_config(write_config(tmp / "run.yaml", doc), env={})
    plan = build_run_plan(loaded, tokenizer=TOK, geometry=BatchGeometry(4, 64, 100))
    return loaded, plan


def test_an_entry_point_controller_is_found_and_built_by_the_run(plugin: None, tmp_path: Path) -> None:
    assert "every-item" in controllers.names() and "every-item" not in CONTROLLERS
    loaded, plan = _loaded(tmp_path, {"metric": "text_logprob", "spans": 2})
    built = build_controllers(loaded, plan, {"docs": monitors.get("documents")})
    ctl = built["docs"]
    assert type(ctl).__name__ == "EveryItemController" and type(ctl).__module__ == "multirun_test_controller"
    assert isinstance(ctl, Controller) and ctl.acquired_at is None
    # It runs in the control loop like a built-in: decisions are placed, acquisition is not its business.
    loop = ControlLoop(built, plan, run_dir=tmp_path / "run", max_modified_fraction=0.5)
    exp = plan.experiments[0]
    (decision,) = loop.decide(step=10, records=[])
    treated = [i for i, t in zip(exp.item_ids, exp.treated) if t]
    assert decision.controller == "every-item" and decision.window == (10, 20)
    assert decision.exposures == dict.fromkeys(treated, 2)
    assert not loop.all_acquired() and loop.write_acquisition(None) == {}
    assert (tmp_path / "run" / "controller.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize(
    "options, key",
    [
        ({"metric": "text_logprob", "span": 2}, "experiments[0].controller.span"),  # mistyped option name
        ({"metric": "text_logprob", "spans": "two"}, "experiments[0].controller.spans"),  # wrong type
        ({"metric": "nope"}, "experiments[0].controller.metric"),  # the plugin's own validate
    ],
)
def test_a_bad_option_of_an_entry_point_controller_names_the_key(
    plugin: None, tmp_path: Path, options: dict, key: str
) -> None:
    loaded, plan = _loaded(tmp_path, options)
    with pytest.raises(ConfigError) as err:
        build_controllers(loaded, plan, {"docs": monitors.get("documents")})
    assert err.value.key == key and key in str(err.value) and "run.yaml" in str(err.value)


def test_without_the_distribution_the_name_is_unknown(tmp_path: Path) -> None:
    controllers.refresh()
    loaded, plan = _loaded(tmp_path, {"metric": "text_logprob"})
    with pytest.raises(ConfigError, match=r"unknown controller 'every-item'.*multirun\.controllers") as err:
        build_controllers(loaded, plan, {"docs": monitors.get("documents")})
    assert err.value.key == "experiments[0].controller.name"
