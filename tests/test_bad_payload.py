"""Bad payloads and bad YAML fail before training, clearly and within bounds (issue 16, items 4 and 6).

Each case writes a small project, breaks one thing in a payload package (or in the YAML
either file is written in), runs what ``multirun train`` runs before the first step
(load the config, prepare the experiments, plan them) and checks the error type, the
file, the line and the key. The memory cases also run under a memory bound: a Python
allocation peak measured by tracemalloc, and once in a subprocess under RLIMIT_AS.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from multirun.config import load_config
from multirun.data.tokenizers import ByteTokenizer
from multirun.errors import ConfigError, InputError, PayloadError
from multirun.kinds.experiments import build_experiments, check_payload
from multirun.kinds.payloads import file_xxh64, load_package
from multirun.kinds.sdk import is_blank
from multirun.plan.run_plan import plan_experiments
from multirun.types import BatchGeometry
from multirun.yaml_load import load_yaml
from tests.helpers_payload import documents, minimal_config, write_config, write_payload
from tests.support import REPO

GEO = BatchGeometry(global_batch_size=4, sequence_length=64, num_steps=100)
TOK = ByteTokenizer()

# Nine levels of nine aliases: 9**9 = 387 million strings once expanded.
BOMB = "".join(
    f"  {a}: &{a} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
    for p, a in zip(["", *"abcdefgh"], "abcdefghi")
)


def prepare(cfg: Path) -> None:
    """What `multirun train` does before the first step, minus the data: load, prepare, plan."""
    loaded = load_config(cfg, env={})
    experiments = build_experiments(loaded, tokenizer=TOK, geometry=GEO)
    plan_experiments(loaded, experiments, tokenizer=TOK, geometry=GEO)


def contamination(groups: list[Any]) -> list[dict[str, Any]]:
    return [{"id": f"q-{i}", "question": f"where is {i}?", "answer": "here", "group": g} for i, g in enumerate(groups)]


def project(tmp: Path, items: list[Any], *, kind: str = "documents", **spec: Any) -> Path:
    write_payload(tmp / "p", items, kind=kind)
    return write_config(tmp / "run.yaml", minimal_config(e={"payload": "p", **spec}))


@contextmanager
def bounded(*, mb: float = 64, seconds: float = 10) -> Iterator[None]:
    """Fail if the block allocates more than ``mb`` MB (Python and NumPy) or runs longer."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < mb * 1e6, f"peak allocation {peak / 1e6:.0f} MB"
        assert time.perf_counter() - started < seconds


def fails(call: Callable[[], Any], error: type[Exception], *says: str) -> InputError:
    with pytest.raises(error) as info:
        call()
    for s in says:
        assert s in str(info.value), (s, str(info.value))
    return info.value  # type: ignore[return-value]


# --------------------------------------------------------------------------- memory and size


def test_huge_contamination_group_is_refused_against_the_run_geometry(tmp_path: Path) -> None:
    cfg = project(tmp_path, contamination([0, 4, 1_000_000_000]), kind="contamination")
    with bounded():
        err = fails(lambda: prepare(cfg), PayloadError, "items.jsonl:3: group:", "doses too large", "q-2")
    assert "at most 1200" in str(err)  # 100 steps x the cap of 0.05 x 4 x 64 = 12 tokens


def test_largest_dose_the_run_can_hold_is_accepted(tmp_path: Path) -> None:
    # A 12-token item ([eos] "Q: q?\nA: a" [eos]) under a cap of 16 tokens per step, 100 steps.
    items = [
        {"id": "c", "question": "q?", "answer": "a", "group": 0},
        {"id": "t", "question": "q?", "answer": "a", "group": 100},
    ]
    write_payload(tmp_path / "p", items, kind="contamination")
    doc = minimal_config(e={"payload": "p"})
    doc["injection"] = {"max_modified_fraction": 0.0625}
    cfg = write_config(tmp_path / "run.yaml", doc)
    prepare(cfg)  # one span a step: planned
    items[1]["group"] = 133  # 1596 tokens: within the bound (the planner decides whether they fit)
    write_payload(tmp_path / "p", items, kind="contamination")
    (exp,) = build_experiments(load_config(cfg, env={}), tokenizer=TOK, geometry=GEO)
    assert exp.seq_lengths.tolist() == [12] and exp.seq_repetitions.tolist() == [133.0]
    items[1]["group"] = 134  # 1608 tokens > 100 steps x 16
    write_payload(tmp_path / "p", items, kind="contamination")
    fails(lambda: prepare(cfg), PayloadError, "items.jsonl:2: group:", "at most 1600")


def test_huge_item_repetitions_and_numbers_are_refused(tmp_path: Path) -> None:
    items = [*documents(3), {"id": "big", "text": "a canary", "repetitions": 1e12}]
    fails(lambda: prepare(project(tmp_path, items)), PayloadError, "items.jsonl:4: repetitions:", "doses too large")
    items[-1]["repetitions"] = 10**30  # a JSON integer beyond any count (and int64)
    fails(lambda: prepare(project(tmp_path, items)), PayloadError, "items.jsonl:4: repetitions:", "number too large")


def test_huge_dose_from_the_run_config_names_repetitions(tmp_path: Path) -> None:
    cfg = project(tmp_path, documents(3), repetitions=1e9)
    fails(lambda: prepare(cfg), ConfigError, "run.yaml:", "experiments[0].repetitions", "doses too large")


def test_alias_bomb_in_the_run_config_is_refused_at_its_line(tmp_path: Path) -> None:
    text = yaml.safe_dump(minimal_config(e={"payload": "p"}), sort_keys=False)
    text += "model:\n  config_overrides:\n    bomb:\n" + textwrap.indent(BOMB, "    ")
    cfg = project(tmp_path, documents(3))
    cfg.write_text(text, encoding="utf-8")
    with bounded():
        err = fails(lambda: load_config(cfg, env={}), ConfigError, "run.yaml:", "aliases expand to more than")
    assert err.line is not None and text.splitlines()[err.line - 1].lstrip().startswith(("c:", "d:", "e:"))


def test_alias_bomb_in_payload_yaml_is_refused(tmp_path: Path) -> None:
    cfg = project(tmp_path, documents(3))
    manifest = tmp_path / "p" / "payload.yaml"
    manifest.write_text(manifest.read_text() + "x-extra:\n" + BOMB, encoding="utf-8")
    with bounded():
        fails(lambda: prepare(cfg), PayloadError, "payload.yaml:", "aliases expand to more than")
    assert len(check_payload(tmp_path / "p", tokenizer=TOK, sequence_length=64).problems) == 1


def test_memory_cases_under_a_hard_memory_limit(tmp_path: Path) -> None:
    """The three memory cases of the issue in a process that cannot grow by more than 2 GiB."""
    cfg = project(tmp_path / "group", contamination([0, 4, 1_000_000_000]), kind="contamination")
    bomb = write_config(
        tmp_path / "bomb.yaml", "run_name: b\nmodel:\n  config_overrides:\n" + textwrap.indent(BOMB, "    ")
    )
    pay = project(tmp_path / "pay", documents(3))
    (tmp_path / "pay" / "p" / "payload.yaml").write_text(
        (tmp_path / "pay" / "p" / "payload.yaml").read_text() + "x:\n" + BOMB, encoding="utf-8"
    )
    script = f"""
import resource, sys
from pathlib import Path
from tests.test_bad_payload import prepare
from multirun.errors import InputError
# Everything imported (torch maps gigabytes of libraries): now at most 2 GiB more.
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), vm + (2 << 30)))
for cfg in {[str(cfg), str(bomb), str(pay)]!r}:
    try:
        prepare(Path(cfg))
    except InputError as e:
        print("refused:", e.file, e.line)
    else:
        sys.exit("accepted " + cfg)
"""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("refused:") == 3
    assert time.perf_counter() - started < 60


# --------------------------------------------------------------------------- YAML: duplicates and merges


def test_duplicate_keys_in_payload_yaml_are_refused(tmp_path: Path) -> None:
    cfg = project(tmp_path, documents(3))
    manifest = tmp_path / "p" / "payload.yaml"
    manifest.write_text(manifest.read_text() + "kind: memorization\n", encoding="utf-8")
    line = len(manifest.read_text().splitlines())
    err = fails(lambda: prepare(cfg), PayloadError, f"payload.yaml:{line}: kind: duplicate key (first on line 3)")
    assert err.key == "kind"


def test_merge_keys_with_overrides_are_accepted_in_both_files(tmp_path: Path) -> None:
    write_payload(tmp_path / "p", documents(4))
    text = textwrap.dedent(
        """\
        run_name: t
        train: {max_duration: 100ba, global_batch_size: 4}
        data: {sequence_length: 64}
        experiments:
          - &e {name: first, payload: p, repetitions: 2}
          - <<: *e
            name: second
            repetitions: 3
        """
    )
    cfg = write_config(tmp_path / "run.yaml", text)
    loaded = load_config(cfg, env={})
    assert [(e.name, e.repetitions) for e in loaded.config.experiments] == [("first", 2.0), ("second", 3.0)]
    assert loaded.line_of("experiments[1].name") == 7 and loaded.line_of("experiments[1].payload") == 5

    manifest = tmp_path / "p" / "payload.yaml"
    files = yaml.safe_load(manifest.read_text())["files"]
    manifest.write_text(
        "<<: {kind: memorization, license: MIT}\n"
        f"name: merged\nversion: '1'\nkind: documents\nfiles: {json.dumps(files)}\n",
        encoding="utf-8",
    )
    package = load_package(tmp_path / "p")  # explicit keys win over merged ones; the license is merged in
    assert (package.kind, package.license, package.name) == ("documents", "MIT", "merged")


def test_duplicate_merge_and_duplicate_run_keys_are_refused() -> None:
    fails(
        lambda: load_yaml("a: &a {x: 1}\nb:\n  <<: *a\n  <<: *a\n", source="f.yaml"),
        InputError,
        "f.yaml:4: b.<<: duplicate key",
    )
    fails(lambda: load_yaml("a: 1\nb: {c: 1, c: 2}\n", source="f.yaml"), InputError, "f.yaml:2: b.c: duplicate key")
    data, _ = load_yaml("a: &a {x: 1, y: 2}\nb: {<<: [{x: 0, z: 0}, *a], y: 3}\n", source="f.yaml")
    assert data["b"] == {"x": 0, "y": 3, "z": 0}  # the first merged mapping wins, explicit keys win over all


# --------------------------------------------------------------------------- text, names, digits


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('{"id": "s", "text": "bad \\ud800 text"}', "lone surrogate \\ud800"),
        ('{"id": "s\\udfff", "text": "fine"}', "lone surrogate \\udfff"),
        ('{"id": "n", "text": "\\u0000"}', "NUL character"),
        ('{"id": "n", "text": "a canary\\u0000with a NUL"}', "NUL character"),
        ('{"id": "z", "text": "\\u200b\\u200d\\u2060\\ufeff"}', "must be a non-empty string"),
        ('{"id": "z", "text": " \\u00a0\\u3000\\t\\u0001"}', "must be a non-empty string"),
        ('{"id": "\\u200b", "text": "fine"}', "must be a non-empty string"),
    ],
)
def test_payload_text_that_is_no_text_is_refused_at_its_line(tmp_path: Path, line: str, says: str) -> None:
    cfg = project(tmp_path, [*documents(2), line])
    err = fails(lambda: prepare(cfg), PayloadError, "items.jsonl:3:", says)
    assert err.line == 3 and err.key in ("id", "text")
    str(err).encode("utf-8")  # the message itself can be printed


def test_is_blank_keeps_visible_text() -> None:
    assert is_blank("") and is_blank("\u200b \u00ad\u202e")
    assert not is_blank("\u200bx") and not is_blank("\u0301") and not is_blank("日")


def test_pkg_refs_must_stay_inside_the_bundled_packages(tmp_path: Path) -> None:
    for ref in ("pkg:../..", "pkg:demo/../../multirun", "pkg:./demo/canaries", "pkg:demo\\..\\x", "pkg:"):
        cfg = write_config(tmp_path / "run.yaml", minimal_config(e={"payload": ref}))
        fails(partial(prepare, cfg), ConfigError, "run.yaml:", "experiments[0].payload", "plain relative name")
    cfg = write_config(tmp_path / "run.yaml", minimal_config(e={"payload": "pkg:demo/canaries"}))
    load_config(cfg, env={})  # a plain name still resolves


@pytest.mark.parametrize("group", ["\uff11\uff16", "\u0661\u0666", "16\u0661", "+16", "1e3", " 16\u00a0"])
def test_groups_are_ascii_digits_only(tmp_path: Path, group: str) -> None:
    cfg = project(tmp_path, contamination([0, 4, group]), kind="contamination")
    fails(lambda: prepare(cfg), PayloadError, "items.jsonl:3: group:", "must be an integer >= 0")


def test_ascii_digit_strings_are_still_groups(tmp_path: Path) -> None:
    cfg = project(tmp_path, contamination([0, " 4 ", "8"]), kind="contamination")
    (exp,) = build_experiments(load_config(cfg, env={}), tokenizer=TOK, geometry=GEO)
    assert exp.metadata["groups"] == [0, 4, 8]


def test_all_items_in_group_zero_is_refused(tmp_path: Path) -> None:
    cfg = project(tmp_path, contamination([0, 0, "0"]), kind="contamination")
    fails(lambda: prepare(cfg), PayloadError, "items.jsonl: group:", "every item is in group 0")


def test_package_file_paths_hold_no_nul(tmp_path: Path) -> None:
    write_payload(tmp_path / "p", documents(2))
    manifest = tmp_path / "p" / "payload.yaml"
    doc = yaml.safe_load(manifest.read_text())
    doc["files"]["items"]["path"] = "items\0.jsonl"
    manifest.write_text(yaml.safe_dump(doc), encoding="utf-8")
    fails(lambda: load_package(tmp_path / "p"), PayloadError, "payload.yaml:", "files.items.path", "NUL")
    assert file_xxh64(tmp_path / "p" / "items.jsonl")  # the package itself is untouched


# --------------------------------------------------------------------------- controllers: on_unplaceable


def test_controller_spans_that_cannot_be_placed_stop_the_run_with_on_unplaceable_error(tmp_path: Path) -> None:
    from multirun.errors import PlacementError
    from multirun.run.trainer import prepare_run
    from multirun.run_dir import read_jsonl
    from tests.support import make_dataset, make_payloads, run_config

    dataset = make_dataset(tmp_path / "mds", samples=40)
    facts = make_payloads(tmp_path / "payloads")["facts"]  # 30-token sequences
    controlled = {
        "name": "facts",
        "payload": str(facts),
        "controller": {"name": "acquire", "options": {"metric": "text_logprob", "threshold": -1.0}},
    }
    config = run_config(tmp_path, dataset, steps=8, save_interval=None, experiments=[controlled], name="ctl")
    # A cap of 0.05 x 8 rows x 64 tokens = 25 tokens per step: no fact fits anywhere.
    text = config.read_text().replace("max_modified_fraction: 0.3", "max_modified_fraction: 0.05")
    config.write_text(text + "monitoring: {every: 4ba, n_resamples: 100, ci_resamples: 100}\n")
    run = prepare_run(load_config(config), progress=False)
    try:
        with pytest.raises(
            PlacementError, match=r"experiment 'facts', step 0: \d+ of \d+ spans its acquire controller"
        ):
            run.fit()
    finally:
        run.close()
    (decision,) = read_jsonl(run.run_dir / "controller.jsonl")  # logged before stopping
    assert decision["step"] == 0 and decision["decision"]["unplaced"] > 0 and decision["decision"]["placed"] == 0
