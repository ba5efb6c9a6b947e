"""The ``math`` injector: synthetic multi-step arithmetic word problems (iGSM-style).

Math reasoning as in Train Once, Answer All (MR, after iGSM, Ye et al. 2024): problems
over a small dependency graph of named quantities, all arithmetic modulo a small prime
so that every answer is one number, difficulty = the number of operations. Treated
problems are injected as documents (question, step-by-step solution, ``Answer: N``);
never-injected problems of every difficulty are the controls; the monitor
(:mod:`monitors.math`) measures few-shot greedy accuracy per difficulty.

Payload package
---------------
``payload.yaml``: ``kind: math``, and either

* role ``generate``: a one-line JSONL file with a generator spec; the problems and the
  shots are generated from it, deterministically (:func:`generate`)::

      {"n_per_difficulty": 40, "difficulties": [1, 2, 3], "modulus": 23, "seed": 7,
       "shots": 3, "style": "words"}

  ==================  ======================================  ================================
  key                 type                                    meaning
  ==================  ======================================  ================================
  n_per_difficulty    integer 2..100000, required             problems per difficulty (arms)
  difficulties        list of distinct integers 1..20,        operation counts
                      required
  modulus             prime 2..997, default 23                all arithmetic mod this
  seed                integer >= 0, required                  the generator's seed
  shots               integer >= 0, default 3                 few-shot exemplars per difficulty
  style               ``words`` or ``symbols``, default       ``Oak cats are 3 more than Elm
                      ``words``                               owls.`` or ``B=A+3.``
  ==================  ======================================  ================================

* or role ``items`` (and optionally ``shots``, the few-shot exemplars, same keys, no
  ``repetitions``), one problem a line::

      {"id": "op2-0000", "question": "Oak cats are 3 more than Elm owls. Elm owls are 5. How many Oak cats?",
       "solution": "Oak cats = 5+3 = 8.", "answer": 8, "difficulty": 1}

  ============  ===========================  ===========================================
  key           type                         meaning
  ============  ===========================  ===========================================
  id            string, required, unique     the problem id (unique over items and shots)
  question      string, required, non-empty  the problem statement; questions are unique
  solution      string, required, non-empty  the step-by-step solution
  answer        integer >= 0, required       the answer, written ``Answer: N``
  difficulty    integer >= 1, required       the number of operations
  repetitions   number > 0, optional         overrides the experiment's ``repetitions``
  ============  ===========================  ===========================================

Documents and arms
------------------
A problem's document is ``question \\n solution \\nAnswer: N``, injected as
``[eos] document [eos]`` (no EOS with ``wrap_eos: false``) ``repetitions`` times. The
arms are split per difficulty: ``round(control_fraction * n_d)`` of the ``n_d`` problems
of difficulty ``d`` are controls (the :attr:`~multirun.kinds.sdk.RandomStream.ARMS`
stream, difficulties in ascending order); every difficulty needs a treated problem and a
control. Shots are neither: never injected, never scored.

The injector takes no ``options``; the monitor's (``shots``) are checked here, before
training, because they constrain the payload (enough shots of each difficulty, prompts
that fit the sequence length).

Payload errors name the file, the line and the key: missing or mistyped keys, empty
texts, duplicate ids or questions, a shot that is also a problem, a negative answer, a
difficulty < 1, a document longer than the sequence, a difficulty without a control or
without a treated problem, a bad generator spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multirun.errors import PayloadError
from multirun.kinds.probes import MathProbes
from multirun.kinds.sdk import PrepareContext, RandomStream, read_items
from multirun.types import PreparedExperiment

__all__ = [
    "ANSWER_PREFIX",
    "STYLES",
    "GeneratorSpec",
    "MathInjector",
    "MathProblem",
    "Operation",
    "document_text",
    "evaluate_graph",
    "generate",
    "generate_problem",
    "parse_spec",
]

ANSWER_PREFIX = "\nAnswer: "
STYLES = ("words", "symbols")
MAX_DIFFICULTY = 20
MAX_MODULUS = 997
MAX_PER_DIFFICULTY = 100_000

# Short names keep a problem compact enough for few-shot prompts of small models.
_PLACES = ("Elm", "Oak", "Fen", "Bay", "Ash", "Ivy", "Dew", "Rye", "Yew", "Moss", "Reed", "Pine", "Hill", "Cove")
_THINGS = ("owls", "cats", "rams", "elks", "yaks", "bees", "eels", "hens", "foxes", "moles", "crows", "newts", "wrens")
_LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OPS = ("add", "sub", "mul", "sum")


@dataclass(frozen=True)
class Operation:
    """One operation of a problem's graph: ``target = op(args, const) mod p``.

    ``add``: ``args[0] + const``; ``sub``: ``args[0] - const``; ``mul``: ``const * args[0]``;
    ``sum``: ``args[0] + args[1]``.
    """

    target: str
    op: str
    args: tuple[str, ...]
    const: int | None


@dataclass(frozen=True)
class MathProblem:
    """A generated problem: its graph and its text."""

    id: str
    difficulty: int
    modulus: int
    leaves: tuple[tuple[str, int], ...]  # given quantities, in the order they were drawn
    operations: tuple[Operation, ...]  # in dependency order; the last one's target is asked for
    question: str
    solution: str
    answer: int

    def record(self) -> dict[str, Any]:
        """The problem as a line of an ``items`` / ``shots`` file."""
        return {
            "id": self.id,
            "question": self.question,
            "solution": self.solution,
            "answer": self.answer,
            "difficulty": self.difficulty,
        }


@dataclass(frozen=True)
class GeneratorSpec:
    """What :func:`generate` draws: see the module docstring's ``generate`` table."""

    n_per_difficulty: int
    difficulties: tuple[int, ...]
    seed: int
    modulus: int = 23
    shots: int = 3
    style: str = "words"


def document_text(question: str, solution: str, answer: int) -> str:
    """The injected document: ``question \\n solution \\nAnswer: N``."""
    return f"{question}\n{solution}{ANSWER_PREFIX}{answer}"


def evaluate_graph(leaves: Sequence[tuple[str, int]], operations: Sequence[Operation], modulus: int) -> int:
    """The value of the last operation's target, computed from the graph."""
    values = dict(leaves)
    for o in operations:
        a = values[o.args[0]]
        if o.op == "add":
            values[o.target] = (a + int(o.const or 0)) % modulus
        elif o.op == "sub":
            values[o.target] = (a - int(o.const or 0)) % modulus
        elif o.op == "mul":
            values[o.target] = (int(o.const or 0) * a) % modulus
        else:
            values[o.target] = (a + values[o.args[1]]) % modulus
    return values[operations[-1].target]


def _statement(style: str, o: Operation | None, name: str, value: int | None = None) -> str:
    if style == "symbols":
        if o is None:
            return f"{name}={value}."
        if o.op == "sum":
            return f"{name}={o.args[0]}+{o.args[1]}."
        return {"add": f"{name}={o.args[0]}+{o.const}.", "sub": f"{name}={o.args[0]}-{o.const}."}.get(
            o.op, f"{name}={o.const}*{o.args[0]}."
        )
    if o is None:
        return f"{name} are {value}."
    if o.op == "sum":
        return f"{name} are {o.args[0]} plus {o.args[1]}."
    return {
        "add": f"{name} are {o.const} more than {o.args[0]}.",
        "sub": f"{name} are {o.const} fewer than {o.args[0]}.",
    }.get(o.op, f"{name} are {o.const} times {o.args[0]}.")


def _step(style: str, o: Operation, values: Mapping[str, int], value: int) -> str:
    a = values[o.args[0]]
    expr = {"add": f"{a}+{o.const}", "sub": f"{a}-{o.const}", "mul": f"{o.const}*{a}"}.get(o.op)
    if expr is None:
        expr = f"{a}+{values[o.args[1]]}"
    return f"{o.target}={expr}={value}." if style == "symbols" else f"{o.target} = {expr} = {value}."


def generate_problem(
    rng: np.random.Generator, difficulty: int, modulus: int, style: str, problem_id: str
) -> MathProblem:
    """One problem of ``difficulty`` operations, drawn from ``rng``.

    The graph is a chain with branches: operation ``i`` always reads the quantity that
    operation ``i - 1`` defined (so the asked-for quantity needs every operation), and a
    ``sum`` also reads an earlier quantity or a new given one. The question states the
    given quantities and the operations in a random order (as iGSM does: the reader must
    find the order); the solution computes them in dependency order.
    """
    if style == "symbols":
        pool = list(_LETTERS)
    else:
        pool = [f"{p} {t}" for p in _PLACES for t in _THINGS]
    order = rng.permutation(len(pool))
    names = iter(pool[int(i)] for i in order)
    first = next(names)
    leaves: list[tuple[str, int]] = [(first, int(rng.integers(0, modulus)))]
    values = dict(leaves)
    defined = [first]
    operations: list[Operation] = []
    steps: list[str] = []
    for _ in range(difficulty):
        op = _OPS[int(rng.integers(0, len(_OPS)))]
        last = defined[-1]
        target = next(names)
        if op == "sum":
            earlier = defined[:-1]
            # A new given quantity half the time, or always when there is no earlier one.
            if not earlier or rng.integers(0, 2) == 0:
                leaf = next(names)
                leaves.append((leaf, int(rng.integers(0, modulus))))
                values[leaf] = leaves[-1][1]
                other = leaf
            else:
                other = earlier[int(rng.integers(0, len(earlier)))]
            operation = Operation(target, "sum", (last, other), None)
        else:
            low = 2 if op == "mul" else 1
            const = int(rng.integers(low, max(modulus, low + 1)))
            operation = Operation(target, op, (last,), const)
        value = evaluate_graph(list(values.items()), [operation], modulus)
        steps.append(_step(style, operation, values, value))
        values[target] = value
        operations.append(operation)
        defined.append(target)
    statements = [_statement(style, None, n, v) for n, v in leaves]
    statements += [_statement(style, o, o.target) for o in operations]
    statements = [statements[int(i)] for i in rng.permutation(len(statements))]
    ask = defined[-1]
    query = f"{ask}?" if style == "symbols" else f"How many {ask}?"
    return MathProblem(
        id=problem_id,
        difficulty=difficulty,
        modulus=modulus,
        leaves=tuple(leaves),
        operations=tuple(operations),
        question=" ".join([*statements, query]),
        solution=" ".join(steps),
        answer=values[ask],
    )


def generate(spec: GeneratorSpec) -> tuple[list[MathProblem], list[MathProblem]]:
    """``(problems, shots)``: ``n_per_difficulty`` problems and ``shots`` exemplars per difficulty.

    Deterministic from the spec: difficulty ``d`` draws from
    ``numpy.random.default_rng([seed, d])`` (problems first, then shots), so adding a
    difficulty leaves the others' problems unchanged. Every question is distinct (a
    redrawn duplicate costs nothing in determinism: the redraw comes from the same stream).

    Raises:
        ValueError: the spec's space has fewer distinct problems than asked for.
    """
    problems: list[MathProblem] = []
    shots: list[MathProblem] = []
    seen: set[str] = set()
    for d in spec.difficulties:
        rng = np.random.default_rng([spec.seed, d])
        for out, count, prefix in ((problems, spec.n_per_difficulty, f"op{d}-"), (shots, spec.shots, f"shot-op{d}-")):
            made, attempts = 0, 0
            while made < count:
                attempts += 1
                if attempts > 20 * count + 100:
                    raise ValueError(f"difficulty {d}: fewer than {count} distinct problems could be drawn")
                p = generate_problem(rng, d, spec.modulus, spec.style, f"{prefix}{made:04d}")
                if p.question in seen:
                    continue
                seen.add(p.question)
                out.append(p)
                made += 1
    return problems, shots


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, int(n**0.5) + 1))


def _int_in(rec: Mapping[str, Any], key: str, low: int, high: int, *, file: Path, line: int) -> int:
    value = rec[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PayloadError(f"must be an integer in {low}..{high}, got {value!r}", file=file, line=line, key=key)
    return value


def parse_spec(rec: Mapping[str, Any], *, file: Path, line: int) -> GeneratorSpec:
    """A ``generate`` line checked into a :class:`GeneratorSpec`; PayloadError naming file, line, key."""
    n = _int_in(rec, "n_per_difficulty", 2, MAX_PER_DIFFICULTY, file=file, line=line)
    seed = _int_in(rec, "seed", 0, 2**63 - 1, file=file, line=line)
    difficulties = rec["difficulties"]
    if not difficulties:
        raise PayloadError("must list at least one difficulty", file=file, line=line, key="difficulties")
    for j, d in enumerate(difficulties):
        if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= MAX_DIFFICULTY:
            raise PayloadError(
                f"must be an integer in 1..{MAX_DIFFICULTY} (operations), got {d!r}",
                file=file,
                line=line,
                key=f"difficulties[{j}]",
            )
        if d in difficulties[:j]:
            raise PayloadError(f"duplicate difficulty {d}", file=file, line=line, key=f"difficulties[{j}]")
    modulus = _int_in(rec, "modulus", 2, MAX_MODULUS, file=file, line=line) if "modulus" in rec else 23
    if not _is_prime(modulus):
        raise PayloadError(
            f"must be a prime (every non-zero multiplier then permutes the residues), got {modulus}",
            file=file,
            line=line,
            key="modulus",
        )
    shots = _int_in(rec, "shots", 0, 100, file=file, line=line) if "shots" in rec else 3
    style = rec.get("style", "words")
    if style not in STYLES:
        raise PayloadError(f"must be one of {', '.join(STYLES)}, got {style!r}", file=file, line=line, key="style")
    return GeneratorSpec(n, tuple(difficulties), seed, modulus=modulus, shots=shots, style=style)


_ITEM_KEYS: dict[str, type] = {"id": str, "question": str, "solution": str, "answer": int, "difficulty": int}
_SPEC_KEYS = {"n_per_difficulty": int, "difficulties": list, "seed": int}
_SPEC_OPTIONAL = {"modulus": int, "shots": int, "style": str}


@dataclass
class _Problem:
    id: str
    question: str
    solution: str
    answer: int
    difficulty: int
    line: int | None  # None: generated
    repetitions: float | None = None


def _check_problem(rec: Mapping[str, Any], *, file: Path, line: int) -> _Problem:
    if rec["answer"] < 0:
        raise PayloadError(f"must be an integer >= 0, got {rec['answer']}", file=file, line=line, key="answer")
    if rec["difficulty"] < 1:
        raise PayloadError(
            f"must be an integer >= 1 (the number of operations), got {rec['difficulty']}",
            file=file,
            line=line,
            key="difficulty",
        )
    reps = float(rec["repetitions"]) if "repetitions" in rec else None
    return _Problem(rec["id"], rec["question"], rec["solution"], rec["answer"], rec["difficulty"], line, reps)


class MathInjector:
    """Injects ``[eos] question \\n solution \\nAnswer: N [eos]`` for each treated problem.

    ``probes``: :class:`~multirun.kinds.probes.MathProbes`. ``metadata``: ``generate``
    (the spec, or None), ``difficulties`` (per item), ``item_repetitions``.
    """

    kind = "math"

    def prepare(self, ctx: PrepareContext) -> PreparedExperiment:
        ctx.check_no_options(self.kind)
        problems, shots, source, spec = self._read(ctx)
        lead = [ctx.eos] if ctx.spec.wrap_eos else []
        questions: list[list[int]] = []
        targets: list[list[int]] = []
        sequences: list[list[int]] = []
        # Every problem is tokenized and length-checked, controls too: whether a payload fits
        # must not depend on how the seed splits the arms. Question and target are tokenized
        # apart, so the monitor prompts and scores exactly the trained tokens.
        for p in problems:
            question = ctx.encode(p.question + "\n", wrap_eos=False)
            target = ctx.encode(p.solution + ANSWER_PREFIX + str(p.answer), wrap_eos=False)
            seq = lead + question + target + lead
            if len(seq) > ctx.sequence_length:
                raise PayloadError(
                    f"problem {p.id!r} is {len(seq)} tokens long as a document"
                    f"{' with its 2 EOS' if lead else ''}, longer than the sequence length {ctx.sequence_length}",
                    file=source,
                    line=p.line if p.line is not None else 1,
                    key="question" if p.line is not None else "difficulties",
                )
            questions.append(question)
            targets.append(target)
            sequences.append(seq)
        shot_documents = [
            ctx.encode(s.question + "\n", wrap_eos=False)
            + ctx.encode(s.solution + ANSWER_PREFIX + str(s.answer), wrap_eos=False)
            for s in shots
        ]

        treated = self._split(ctx, problems, source)
        reps = [p.repetitions if p.repetitions is not None else float(ctx.spec.repetitions) for p in problems]
        seq_items = np.flatnonzero(treated)
        shots_file = None
        if shots:
            shots_file = str(source if spec is not None else ctx.payload.path("shots"))
        experiment = ctx.experiment(
            self.kind,
            item_ids=[p.id for p in problems],
            treated=treated,
            sequences=[sequences[i] for i in seq_items],
            seq_items=seq_items,
            seq_repetitions=[reps[i] for i in seq_items],
            metadata={
                "generate": None if spec is None else asdict(spec),
                "difficulties": [p.difficulty for p in problems],
                "item_repetitions": reps,
            },
            probes=MathProbes(
                difficulties=[p.difficulty for p in problems],
                answers=[p.answer for p in problems],
                questions=questions,
                targets=targets,
                shot_difficulties=[s.difficulty for s in shots],
                shot_documents=shot_documents,
                shots_file=shots_file,
                lead=lead,
                separator=lead or ctx.encode("\n\n", wrap_eos=False),
            ),
        )
        ctx.check_monitor(experiment)
        return experiment

    def _read(self, ctx: PrepareContext) -> tuple[list[_Problem], list[_Problem], Path, GeneratorSpec | None]:
        """Problems and shots, from the generator spec or the files; the file errors should name."""
        payload = ctx.payload
        if "generate" in payload.files:
            if "items" in payload.files or "shots" in payload.files:
                raise PayloadError(
                    "a math payload has either a generate spec or items (and shots), not both",
                    file=payload.root / "payload.yaml",
                    key="files",
                )
            path = payload.path("generate")
            lines = payload.iter_jsonl("generate", required=_SPEC_KEYS, optional=_SPEC_OPTIONAL)
            if len(lines) != 1:
                raise PayloadError(
                    f"the generate spec is one line, found {len(lines)}",
                    file=path,
                    line=lines[1][0] if len(lines) > 1 else None,
                )
            line, rec = lines[0]
            spec = parse_spec(rec, file=path, line=line)
            try:
                made, made_shots = generate(spec)
            except ValueError as e:
                raise PayloadError(str(e), file=path, line=line, key="n_per_difficulty") from None

            def plain(p: MathProblem) -> _Problem:
                return _Problem(p.id, p.question, p.solution, p.answer, p.difficulty, None)

            return [plain(p) for p in made], [plain(s) for s in made_shots], path, spec

        path = payload.path("items")
        records = ctx.read_items(
            required=_ITEM_KEYS, optional={"repetitions": float}, text_keys=("question", "solution")
        )
        problems = [_check_problem(rec, file=path, line=line) for line, rec in records]
        first: dict[str, tuple[str, int]] = {}
        for p in problems:
            assert p.line is not None
            if p.question in first:
                raise PayloadError(
                    f"duplicate question (also {first[p.question][0]!r}, line {first[p.question][1]})",
                    file=path,
                    line=p.line,
                    key="question",
                )
            first[p.question] = (p.id, p.line)
        shots: list[_Problem] = []
        if "shots" in payload.files:
            shot_path = payload.path("shots")
            ids = {p.id: p.line for p in problems}
            shot_records = read_items(
                payload, "shots", required=_ITEM_KEYS, optional={}, text_keys=("question", "solution")
            )
            for line, rec in shot_records:
                shot = _check_problem(rec, file=shot_path, line=line)
                if shot.id in ids:
                    raise PayloadError(
                        f"id {shot.id!r} is also a problem's ({path.name} line {ids[shot.id]})",
                        file=shot_path,
                        line=line,
                        key="id",
                    )
                if shot.question in first:
                    other, other_line = first[shot.question]
                    raise PayloadError(
                        f"this shot is problem {other!r} ({path.name} line {other_line}): a shot is neither "
                        "injected nor scored, so it must not be a problem",
                        file=shot_path,
                        line=line,
                        key="question",
                    )
                shots.append(shot)
        return problems, shots, path, None

    @staticmethod
    def _split(ctx: PrepareContext, problems: Sequence[_Problem], source: Path) -> np.ndarray:
        """Treated mask, split per difficulty (ascending) from the ARMS stream: every
        difficulty gets ``round(control_fraction * n_d)`` controls."""
        difficulties = np.array([p.difficulty for p in problems], dtype=np.int64)
        treated = np.ones(len(problems), dtype=bool)
        rng = ctx.rng(RandomStream.ARMS)
        for d in np.unique(difficulties):
            members = np.flatnonzero(difficulties == d)
            n_control = round(ctx.spec.control_fraction * members.size)
            if n_control == 0 or n_control == members.size:
                first = next(p for p in problems if p.difficulty == d)
                raise PayloadError(
                    f"difficulty {d} has {members.size} problem(s): with control_fraction "
                    f"{ctx.spec.control_fraction} it would have {n_control} control(s) and "
                    f"{members.size - n_control} treated; each difficulty needs both",
                    file=source,
                    line=first.line if first.line is not None else 1,
                    key="difficulty" if first.line is not None else "n_per_difficulty",
                )
            treated[members[rng.permutation(members.size)[:n_control]]] = False
        return treated
