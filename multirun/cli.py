"""The ``multirun`` command line.

Commands::

    multirun train [CONFIG] [--set KEY=VALUE ...]    train (no CONFIG: the embedded demo)
    multirun check CONFIG [--set ...]                validate config, payloads and placement; train nothing
                                                     (CONFIG may be an llm-foundry YAML: its callbacks.multirun)
    multirun prepare OUT SOURCE... --sequence-length N [--tokenizer PATH] [--heldout-fraction F]   text -> MDS
    multirun ledger RUN_DIR [--experiment E] [--item I] [--steps A:B] [--export FILE] [--removals]
    multirun report RUN_DIR [--baseline OTHER_RUN] [--out DIR]   HTML + Markdown report with plots
    multirun export RUN_DIR [--checkpoint PATH] [--out DIR]   HF model + tokenizer, inserted items as a dataset
    multirun inspect RUN_DIR --step T [--rows R,..] [--html FILE]   step T's rows with the injected spans marked
    multirun evaluate RUN_DIR --checkpoint PATH|HF_DIR [--name NAME]   monitors and statistics on saved weights
    multirun payload fingerprint DIR                 recompute a payload package's file fingerprints
    multirun payload check DIR [--tokenizer T] [--sequence-length N]
                                                     the kind's full validation; every problem at once
    multirun payload import FORMAT INPUT --out DIR [--shape S] [--tokenizer T] [--sequence-length N]
                                                     a benchmark (qa-text, mc-jsonl) as a contamination package
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from multirun.cli_tables import (
    console,
    print_effects,
    print_interaction,
    print_ledger_summary,
    print_plan,
    print_rows,
    print_summary,
)
from multirun.errors import InputError, MultirunError
from multirun.run_dir import RunDir

if TYPE_CHECKING:  # the commands import their stages lazily, so that `multirun --help` starts fast
    from multirun.config import LoadedConfig
    from multirun.data.tokenizers import Tokenizer
    from multirun.kinds.experiments import PayloadCheck

# Piped into a log file, rich would fold every table into 80 columns, and a log has no
# width to fit: there, tables take the width they need (up to 240 columns) unless
# COLUMNS says otherwise.


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except InputError as exc:
        # escape: a message quoting a list ("got [nan, 0.9]") is not rich markup.
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    except MultirunError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multirun", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a run (no config: the embedded CPU demo)")
    train.add_argument("config", nargs="?", help="run YAML; omitted: the embedded demo")
    _add_overrides(train)
    train.add_argument("--run-dir", help="override run_dir")
    train.add_argument("--overwrite", action="store_true", help="allow starting over in a finished run directory")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.set_defaults(handler=_train)

    check = commands.add_parser(
        "check",
        help="validate a config (or an llm-foundry YAML's callbacks.multirun), its payloads and placement "
        "without training",
    )
    check.add_argument("config", nargs="?", help="multirun YAML, or llm-foundry training YAML (--set max_duration=..)")
    _add_overrides(check)
    check.set_defaults(handler=_check)

    prepare = commands.add_parser("prepare", help="tokenize text files into an MDS dataset")
    prepare.add_argument("out", help="output directory")
    prepare.add_argument("sources", nargs="+", help="text files or directories")
    prepare.add_argument("--sequence-length", type=int, required=True)
    prepare.add_argument("--tokenizer", default="bytes", help="'bytes' or a local Hugging Face tokenizer directory")
    prepare.add_argument("--suffix", action="append", dest="suffixes", help="file suffixes to read from directories")
    prepare.add_argument("--max-bytes", type=int)
    prepare.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="hold out this share of the documents (whole files, chosen by a hash of their names) as OUT/heldout: "
        "the held-out loss of a run over OUT without data.heldout_path",
    )
    prepare.set_defaults(handler=_prepare)

    ledger = commands.add_parser("ledger", help="summarise, query and export a run's provenance ledger")
    ledger.add_argument("run_dir")
    ledger.add_argument("--experiment")
    ledger.add_argument("--item")
    ledger.add_argument("--steps", help="half-open step range A:B (0 <= A < B)")
    ledger.add_argument("--rank", type=int)
    ledger.add_argument("--limit", type=int, default=20, help="rows to print for a query")
    ledger.add_argument("--export", help="write the (filtered) rows to .parquet, .csv or .jsonl")
    ledger.add_argument(
        "--removals", action="store_true", help="the removals ledger: spans that removal experiments overwrote"
    )
    ledger.set_defaults(handler=_ledger)

    report = commands.add_parser("report", help="write an HTML + Markdown report of a run directory")
    report.add_argument("run_dir")
    report.add_argument("--baseline", help="another run directory to compare losses against (e.g. no experiments)")
    report.add_argument("--out", help="output folder (default RUN_DIR/report)")
    report.set_defaults(handler=_report)

    interact = commands.add_parser(
        "interact",
        help="interaction tests: arms none/alone/all(/leave-one-out) from a run's checkpoint",
    )
    interact.add_argument("run_dir")
    interact.add_argument("--checkpoint", help="start here (default: interaction_trigger.json's, else the latest)")
    interact.add_argument("--steps", type=int, help="steps per arm (default interaction.steps, 100)")
    interact.add_argument("--intensity", type=float, help="fraction of an arm's tokens per experiment (default 0.01)")
    interact.add_argument(
        "--experiments", help="comma-separated experiments to take part (default: every injected one)"
    )
    interact.add_argument("--leave-one-out", action="store_true", help="add the all-but-one arms")
    interact.add_argument("--lr", type=float, help="constant learning rate of the arms (default: the checkpoint's)")
    interact.add_argument(
        "--alpha", type=float, help="significance level after Holm correction (default interaction.alpha, 0.05)"
    )
    _add_overrides(interact)
    interact.add_argument("--out", help="output folder (default RUN_DIR/interaction)")
    interact.add_argument("--no-progress", action="store_true", help="no line per arm")
    interact.set_defaults(handler=_interact)

    export = commands.add_parser(
        "export", help="the trained model and tokenizer in Hugging Face format, and the inserted items as a dataset"
    )
    export.add_argument("run_dir")
    export.add_argument("--checkpoint", help="Composer checkpoint or HF folder (default: checkpoints/latest-rank0.pt)")
    export.add_argument("--out", help="output folder (default RUN_DIR/export)")
    export.set_defaults(handler=_export)

    inspect = commands.add_parser("inspect", help="the rows of one step as the model trained on them, spans marked")
    inspect.add_argument("run_dir")
    inspect.add_argument("--step", type=int, required=True, help="global step (0-based)")
    inspect.add_argument("--rows", help="comma-separated global rows to show (default: all)")
    inspect.add_argument("--html", help="also write a standalone HTML page here")
    inspect.add_argument("--width", type=int, help="terminal width for the coloured output")
    inspect.set_defaults(handler=_inspect)

    evaluate = commands.add_parser(
        "evaluate", help="score every experiment's monitors and statistics on a checkpoint or Hugging Face folder"
    )
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--checkpoint", required=True, help="a Composer checkpoint (.pt) or a save_pretrained folder")
    evaluate.add_argument("--name", help="folder under RUN_DIR/evaluations (default: the checkpoint's stem)")
    evaluate.add_argument("--step", type=int, help="the weights' training step, for a folder that does not record it")
    evaluate.add_argument("--device", choices=["auto", "cpu", "gpu"], help="default: the run's train.device")
    evaluate.add_argument("--no-progress", action="store_true", help="no line per stage")
    evaluate.set_defaults(handler=_evaluate)

    payload = commands.add_parser(
        "payload",
        help="payload package tools: check (the kind's full validation, every problem at once), fingerprint, "
        "import (a benchmark file as a package: import FORMAT INPUT --out DIR)",
    )
    payload.add_argument("action", choices=["fingerprint", "check", "import"])
    payload.add_argument("path", help="the package directory; for import, the FORMAT (qa-text, mc-jsonl)")
    payload.add_argument("input", nargs="?", help="import: the benchmark file")
    payload.add_argument("--out", help="import: the package directory to write (new or empty)")
    payload.add_argument("--shape", help="import mc-jsonl: arc, obqa, mmlu or hellaswag (default: detected per line)")
    payload.add_argument("--kind", default="contamination", help="import: the package's kind (contamination)")
    payload.add_argument("--name", help="import: the package name (default: the input's file name)")
    payload.add_argument("--license", help="import: the package's license (default: see the source benchmark's)")
    payload.add_argument(
        "--config", help="check as this run config's experiment of the payload: its options, tokenizer, sequence length"
    )
    payload.add_argument("--experiment", help="with --config: the experiment (default: the one using this payload)")
    _add_overrides(payload)
    payload.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="an injector option (YAML value)"
    )
    payload.add_argument("--tokenizer", help="'bytes' or a local Hugging Face tokenizer directory (default: bytes)")
    payload.add_argument("--sequence-length", type=int, help="what must fit in one row (default 128)")
    payload.set_defaults(handler=_payload)
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override a config value, e.g. --set train.max_duration=50ba (repeatable)",
    )


def _train(args: argparse.Namespace) -> int:
    from composer.utils import dist

    from multirun.config import load_config
    from multirun.run.trainer import prepare_run

    loaded = load_config(args.config, args.overrides)
    run = prepare_run(loaded, overwrite=args.overwrite, progress=not args.no_progress, run_dir=args.run_dir)
    if dist.get_global_rank() == 0:
        print_plan(run.plan)
    summary = run.fit()
    run.close()
    if dist.get_global_rank() == 0 and summary:
        print_summary(summary)
    if loaded.config.interaction.after != "none" and RunDir(run.run_dir).interaction_trigger.exists():
        from multirun.interaction.arms import run_interaction

        console.print(f"interaction tests from the checkpoint of interaction.after={loaded.config.interaction.after}:")
        result = run_interaction(run.run_dir, progress=not args.no_progress)
        if dist.get_global_rank() == 0:
            print_interaction(result)
    if dist.get_global_rank() == 0 and summary:
        from multirun.report import build_report

        report = build_report(run.run_dir)
        console.print(f"run directory: [bold]{run.run_dir}[/]")
        console.print(f"report: [bold]{report.html}[/] (Markdown: {report.markdown})")
    return 0


def _check(args: argparse.Namespace) -> int:
    from multirun.integration.foundry_yaml import is_foundry_yaml

    if args.config is not None and is_foundry_yaml(args.config):
        return _check_foundry(args)
    from multirun.config import ConfigWarning, load_config
    from multirun.run.inputs import heldout_rows, resolve_dataset, run_dir_of, run_geometry, run_tokenizer
    from multirun.run.model import check_model
    from multirun.run.parts import assemble_parts

    loaded = load_config(args.config, args.overrides)
    tokenizer = run_tokenizer(loaded)
    dataset = resolve_dataset(loaded, tokenizer)
    # The same assembly as `multirun train`: monitor and controller options, doses, arms and
    # the run directory are checked too; what would run but probably not as meant is a
    # ConfigWarning, printed here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        try:
            parts = assemble_parts(
                loaded,
                tokenizer=tokenizer,
                geometry=run_geometry(loaded, dataset),
                run_dir=run_dir_of(loaded),
                heldout=heldout_rows(loaded, tokenizer, dataset.sequence_length),
            )
        except InputError as exc:
            # A payload's problem stops the assembly at the first one; list them all at once.
            if _print_payload_problems(loaded, tokenizer, dataset.sequence_length, exc):
                return 2
            raise
    for warning in caught:
        if issubclass(warning.category, ConfigWarning):
            console.print(f"[yellow]warning:[/] {escape(str(warning.message))}", highlight=False)
        else:  # someone else's warning: as Python would show it
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    check_model(loaded, tokenizer, dataset.sequence_length)
    print_plan(parts.plan)
    console.print("[green]config, model, payloads, placement, monitors and controllers are valid[/]")
    return 0


def _check_foundry(args: argparse.Namespace) -> int:
    """``multirun check`` on an llm-foundry training YAML: its ``callbacks.multirun`` block."""
    from multirun.integration.foundry_yaml import check_foundry_yaml

    result = check_foundry_yaml(args.config, args.overrides)
    geometry = result.geometry
    console.print(
        f"{result.path}: global_train_batch_size {geometry.global_batch_size}, sequence_length "
        f"{geometry.sequence_length}, max_duration {result.max_duration} = {geometry.num_steps} steps",
        highlight=False,
    )
    for note in result.notes:
        console.print(f"  {note}", highlight=False)
    print_plan(result.parts.plan)
    heldout = result.parts.monitors.heldout
    if heldout is not None:
        console.print(f"held-out loss on {len(heldout)} rows of {heldout.shape[1]} tokens", highlight=False)
    console.print("[green]callbacks.multirun, payloads, placement, monitors and controllers are valid[/]")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from multirun.data.mds import prepare_dataset

    tokenizer = _load_tokenizer(args.tokenizer)
    info = prepare_dataset(
        args.sources,
        args.out,
        tokenizer,
        args.sequence_length,
        max_bytes=args.max_bytes,
        suffixes=tuple(args.suffixes) if args.suffixes else None,
        heldout_fraction=args.heldout_fraction,
    )
    documents = info.metadata.get("num_documents")
    console.print(
        f"wrote {info.num_samples} sequences of {info.sequence_length} tokens ({documents} documents) to {info.path}",
        highlight=False,
    )
    if info.heldout_path is not None:
        held = info.metadata["heldout"]
        console.print(
            f"held out {held['num_documents']} documents ({held['num_samples']} sequences) in {info.heldout_path}: "
            "the held-out loss of runs over this dataset without data.heldout_path",
            highlight=False,
        )
    return 0


def _ledger(args: argparse.Namespace) -> int:
    from multirun.ledger import Ledger, export_table

    ledger = Ledger.open_removals(args.run_dir) if args.removals else Ledger.open(args.run_dir)
    filtered = any(v is not None for v in (args.experiment, args.item, args.steps, args.rank))
    steps = _parse_steps(args.steps) if args.steps else None
    if args.export:
        if filtered:
            table = ledger.query(experiment=args.experiment, item=args.item, steps=steps, rank=args.rank)
            path = export_table(table, args.export)
        else:
            path = ledger.export(args.export)
        console.print(f"exported to {path}")
        return 0
    if filtered:
        table = ledger.query(experiment=args.experiment, item=args.item, steps=steps, rank=args.rank)
        print_rows(table, args.limit)
        return 0
    total = _tokens_trained(Path(args.run_dir))
    title = "removals ledger: removed spans per experiment" if args.removals else None
    print_ledger_summary(ledger.summary(total_training_tokens=total), title=title)
    return 0


def _interact(args: argparse.Namespace) -> int:
    from composer.utils import dist

    from multirun.interaction.arms import run_interaction
    from multirun.report import build_report

    overrides = list(args.overrides)
    for flag, key in (("steps", "steps"), ("intensity", "intensity"), ("lr", "lr"), ("alpha", "alpha")):
        if getattr(args, flag) is not None:
            overrides.append(f"interaction.{key}={getattr(args, flag)}")
    if args.leave_one_out:
        overrides.append("interaction.leave_one_out=true")
    if args.experiments:
        names = [n.strip() for n in args.experiments.split(",") if n.strip()]
        overrides.append(f"interaction.experiments=[{', '.join(names)}]")
    result = run_interaction(
        args.run_dir, checkpoint=args.checkpoint, overrides=overrides, out_dir=args.out, progress=not args.no_progress
    )
    if dist.get_global_rank() == 0:
        print_interaction(result)
        if args.out is None:
            report = build_report(args.run_dir)
            console.print(f"report: [bold]{report.html}[/]")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from multirun.run.reload import evaluate_checkpoint

    def say(line: str) -> None:
        console.print(line, highlight=False)

    result = evaluate_checkpoint(
        args.run_dir,
        args.checkpoint,
        name=args.name,
        step=args.step,
        device=args.device,
        progress=None if args.no_progress else say,
    )
    summary = result.summary
    step = summary["step"]
    console.print(
        f"evaluation {summary['name']!r} of {summary['source']} (step {'unknown' if step is None else step}, "
        f"weights {summary['weights_fingerprint']})",
        highlight=False,
    )
    if summary["effects"]:
        print_effects(summary["effects"], alpha=summary["alpha"])
    if summary["heldout_loss"] is not None:
        console.print(f"held-out loss: {summary['heldout_loss']:.4f} nats/token")
    console.print(f"written to [bold]{result.folder}[/] (metrics.jsonl, summary.json)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from multirun.report import build_report

    paths = build_report(args.run_dir, baseline=args.baseline, out_dir=args.out)
    console.print(f"report: [bold]{paths.html}[/] (Markdown: {paths.markdown}, {len(paths.plots)} plots)")
    return 0


def _print_payload_problems(loaded: LoadedConfig, tokenizer: Tokenizer, sequence_length: int, exc: InputError) -> bool:
    """Every problem of the payload package ``exc`` is in, as ``multirun payload check`` lists
    them (False: ``exc`` is not in a payload, or its package has no other problem)."""
    from multirun.kinds.experiments import check_payload
    from multirun.kinds.payloads import resolve_payload_ref

    if exc.file is None:
        return False
    failed = Path(exc.file).resolve()
    for spec in loaded.config.experiments:
        try:
            root = resolve_payload_ref(spec.payload, base_dir=loaded.base_dir).resolve()
        except InputError:
            continue
        if root != failed and root not in failed.parents:
            continue
        result = check_payload(
            root, tokenizer=tokenizer, sequence_length=sequence_length, seed=loaded.config.seed, spec=spec
        )
        if len(result.problems) < 2:
            return False
        _print_payload_check(
            result,
            f"[bold red]error:[/] experiment {spec.name!r}: {len(result.problems)} problems in its payload {root}",
        )
        return True
    return False


def _print_payload_check(result: PayloadCheck, header: str, *, after: str = "") -> None:
    """A payload check's problems, grouped by message with their lines, under ``header``."""
    more = " (stopped there: fix these first)" if result.truncated else ""
    console.print(f"{header}{more}{after}:", highlight=False)
    for line in _grouped_problems(result.problems):
        console.print(f"  {line}", highlight=False, soft_wrap=True)


def _payload(args: argparse.Namespace) -> int:
    from multirun.kinds.experiments import check_payload
    from multirun.kinds.payloads import resolve_payload_ref, write_fingerprints

    if args.action == "import":
        return _payload_import(args)
    if args.action == "fingerprint":
        write_fingerprints(args.path)
        console.print(f"updated fingerprints in {Path(args.path) / 'payload.yaml'}")
    root = resolve_payload_ref(str(Path(args.path).resolve()), base_dir=Path.cwd())
    spec, tokenizer, sequence_length, seed, source = _payload_setting(args, root)
    if sequence_length < 1:
        raise InputError(f"must be positive, got {sequence_length}", key="--sequence-length")
    options = dict(_parse_option(text) for text in args.option)
    result = check_payload(
        root, tokenizer=tokenizer, sequence_length=sequence_length, seed=seed, spec=spec, options=options
    )
    checked = f"tokenizer {tokenizer.name}, sequence length {sequence_length}, {source}"
    package = result.package
    if result.problems:
        what = f"{package.name} {package.version} ({package.kind})" if package else str(root)
        _print_payload_check(result, f"[bold red]{what}: {len(result.problems)} problem(s)", after=f"[/] ({checked})")
        return 2
    assert package is not None and result.experiment is not None
    experiment = result.experiment
    console.print(
        f"{package.name} {package.version} ({package.kind}): ok, fingerprint {package.fingerprint}; "
        f"{len(experiment.item_ids)} items, {len(experiment.seq_lengths)} treated sequences (checked with {checked})",
        highlight=False,
    )
    return 0


def _payload_import(args: argparse.Namespace) -> int:
    from multirun.kinds.importers import import_benchmark

    if args.input is None or args.out is None:
        raise InputError(
            "usage: multirun payload import FORMAT INPUT --out DIR", key="INPUT" if args.input is None else "--out"
        )
    if args.config is not None:
        raise InputError("import checks with --tokenizer and --sequence-length, not a run config", key="--config")
    length = args.sequence_length or 128
    if length < 1:
        raise InputError(f"must be positive, got {length}", key="--sequence-length")
    result = import_benchmark(
        args.path,
        args.input,
        args.out,
        tokenizer=_load_tokenizer(args.tokenizer or "bytes"),
        sequence_length=length,
        kind=args.kind,
        shape=args.shape,
        name=args.name,
        options=dict(_parse_option(text) for text in args.option),
        **({"license": args.license} if args.license else {}),
    )
    for item, first in result.duplicates:
        console.print(
            f"[yellow]warning:[/] {result.source}:{item.line}: question {item.id!r} has the prompt of {first.id!r} "
            f"(line {first.line}): kept, in one arm (arm_key {item.arm_key!r})",
            highlight=False,
        )
    if result.problems:
        more = " (stopped there: fix these first)" if result.truncated else ""
        console.print(
            f"[bold red]{result.source}: {len(result.problems)} problem(s){more}; nothing written:", highlight=False
        )
        for line in _grouped_problems(result.problems):
            console.print(f"  {line}", highlight=False, soft_wrap=True)
        return 2
    if result.too_long:
        console.print(f"{len(result.too_long)} item(s) do not fit ({result.checked_with}): left out", highlight=False)
    for item, reason in result.too_long:
        console.print(f"  {result.source}:{item.line}: {item.id}: {reason}", highlight=False, soft_wrap=True)
    console.print(
        f"wrote {result.out} ({len(result.items)} items, {len(result.duplicates)} duplicate prompts); "
        f"it passes `multirun payload check` ({result.checked_with})",
        highlight=False,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from multirun.export import export_run

    result = export_run(args.run_dir, checkpoint=args.checkpoint, out=args.out)
    inserts = result.manifest["inserts"]
    step = "" if result.step is None else f" (step {result.step})"
    console.print(f"model: [bold]{result.model_dir}[/] from {result.checkpoint}{step}", highlight=False)
    if result.tokenizer_written:
        console.print(f"tokenizer: saved with the model, from the {result.tokenizer_source}", highlight=False)
    else:
        console.print(f"[yellow]tokenizer: {result.manifest['tokenizer']['note']}[/]", highlight=False)
    console.print(
        f"inserts: {inserts['rows']} items ({inserts['treated_items']} treated, {inserts['exposures']} exposures) "
        f"in {result.out_dir / 'inserts.parquet'} and inserts.jsonl; manifest: export_manifest.json",
        highlight=False,
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from multirun.batch_view import render_plain, render_rich, view_step, write_html

    rows = None
    if args.rows:
        try:
            rows = [int(r) for r in args.rows.split(",") if r.strip()]
        except ValueError as exc:
            raise InputError(f"--rows must be comma-separated integers, got {args.rows!r}", key="--rows") from exc
    view = view_step(args.run_dir, args.step)
    if sys.stdout.isatty() or args.width is not None:
        terminal = Console(width=args.width)
        for renderable in render_rich(view, rows):
            terminal.print(renderable)
    else:  # a pipe or a log: exact text, unwrapped, spans as ⟦experiment/item: text⟧
        sys.stdout.write(render_plain(view, rows))
    if args.html:
        console.print(f"HTML: [bold]{write_html(view, args.html, rows)}[/]", highlight=False)
    return 0


def _payload_setting(args: argparse.Namespace, root: Path) -> tuple[Any, Tokenizer, int, int, str]:
    """``(experiment spec or None, tokenizer, sequence length, seed, how they were chosen)`` of ``payload check``.

    Flags win; then the run config's (``--config``); then bytes and 128.
    """
    if args.config is None:
        if args.experiment or args.overrides:
            raise InputError("needs --config", key="--experiment" if args.experiment else "--set")
        how = "default experiment settings" + (" and --option" if args.option else "")
        tokenizer = _load_tokenizer(args.tokenizer or "bytes")
        return None, tokenizer, args.sequence_length or 128, 0, how + " (pass --config RUN.yaml to check as your run)"
    from multirun.config import load_config
    from multirun.kinds.payloads import resolve_payload_ref
    from multirun.run.inputs import run_tokenizer

    loaded = load_config(args.config, args.overrides)
    experiments = loaded.config.experiments
    if args.experiment is not None:
        chosen = [e for e in experiments if e.name == args.experiment]
        missing = f"no experiment {args.experiment!r}"
    else:
        chosen = []
        for e in experiments:
            try:
                if resolve_payload_ref(e.payload, base_dir=loaded.base_dir).resolve() == root.resolve():
                    chosen.append(e)
            except MultirunError:
                continue
        missing = f"no experiment uses the payload {root}"
    if len(chosen) != 1:
        names = ", ".join(e.name for e in (chosen or experiments)) or "none"
        problem = missing if not chosen else "several experiments use this payload"
        raise InputError(f"{problem} (experiments: {names}); pick one with --experiment", file=loaded.source)
    spec = chosen[0]
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else run_tokenizer(loaded)
    length = args.sequence_length or loaded.config.data.sequence_length
    return spec, tokenizer, length, loaded.config.seed, f"experiment {spec.name!r} of {args.config}"


def _parse_option(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"must be KEY=VALUE, got {text!r}", key="--option")
    return key.strip(), yaml.safe_load(value)


def _grouped_problems(problems: Sequence[MultirunError]) -> list[str]:
    """One line per problem; the same message on many lines of one file once, with its lines."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    order: list[tuple[Any, ...]] = []
    for p in problems:
        line = getattr(p, "line", None)
        group: tuple[Any, ...] = (p.file, p.key, p.message) if isinstance(p, InputError) and line else (str(p),)
        if group not in groups:
            groups[group] = []
            order.append(group)
        if line is not None:
            groups[group].append(line)
    out = []
    for group in order:
        lines = groups[group]
        if len(group) == 1:
            out.append(group[0])
            continue
        file, key, message = group
        shown = ",".join(map(str, lines[:10])) + (f",... ({len(lines)} lines)" if len(lines) > 10 else "")
        out.append(": ".join(x for x in (f"{file}:{shown}", key, message) if x))
    return out


def _load_tokenizer(spec: str) -> Tokenizer:
    """``bytes`` or a local Hugging Face tokenizer directory (``prepare``, ``payload check``)."""
    from multirun.data.tokenizers import load_tokenizer

    return load_tokenizer("bytes") if spec == "bytes" else load_tokenizer("huggingface", spec)


def _parse_steps(text: str) -> tuple[int, int]:
    try:
        lo, hi = text.split(":")
        return int(lo), int(hi)
    except ValueError as exc:
        raise InputError(f"--steps must be A:B (half-open), got {text!r}", key="--steps") from exc


def _tokens_trained(run_dir: Path) -> int | None:
    summary = RunDir(run_dir).summary
    if summary.exists():
        return int(json.loads(summary.read_text())["tokens_trained"])
    return None


if __name__ == "__main__":
    sys.exit(main())
