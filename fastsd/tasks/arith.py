"""Built-in task: chained integer arithmetic, solved as step-tagged traces.

A question is 3 to 5 non-negative integers joined by `+`, `-` or `*`, evaluated strictly
**left to right, with no operator precedence**: `12+7*3-5` means `((12+7)*3)-5` = 52.
Generation keeps every intermediate result in [0, 99] (so no negative numbers ever appear),
`+`/`-` operands in [1, 20] and `*` operands in [2, 9].

Canonical solution: one step per operator, each a single binary operation on the running result
and the next operand, written compactly as `left op right=result`:

    <step_1>12+7=19</step_1><step_2>19*3=57</step_2><step_3>57-5=52</step_3><answer>52</answer>

Step notation the task accepts as equivalent (used by the critic): any spaces around the
operator and `=`, leading zeros, and swapped operands for `+` and `*`.

Reference solution: a correct but different derivation, as if written by someone else. It
regroups the first place where that is possible (distributes `(v+a)*c` as `v*c + a*c`, or
collects two subtractions `v-a-b` as `v-(a+b)`), writes the operands of the other `+`/`*` steps
the other way round, and puts spaces around operators and `=`:

    <step_1>12 * 3 = 36</step_1><step_2>7 * 3 = 21</step_2><step_3>36 + 21 = 57</step_3>...

Splits: a question belongs to the held-out ("test") split iff a stable hash of its text falls in
one bucket of five, so train and test are disjoint for every seed and size, and each split is a
deterministic function of (seed, size).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .format import format_steps, parse_response

__all__ = [
    "ALPHABET",
    "SPLITS",
    "Problem",
    "Step",
    "parse_question",
    "solve",
    "canonical_solution",
    "reference_solution",
    "parse_step",
    "step_is_true",
    "verify_trace",
    "make_problem",
    "make_split",
    "make_records",
    "write_jsonl",
    "read_jsonl",
]

SPLITS = ("train", "test")
OPS = "+-*"
MAX_VALUE = 99
NUM_OPERANDS = (3, 5)
_TEST_BUCKETS = 5  # one question in five is held out
_MAX_TRIES_PER_ITEM = 1000
_QUESTION = re.compile(r"\d+(?:[+\-*]\d+)+")
_STEP = re.compile(r"\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*(\d+)\s*")
RECORD_KEYS = ("question", "answer", "solution", "reference_solution")
# Every character a question, solution, reference or critique of this task can contain.
ALPHABET = "".join(sorted(set("0123456789+-*= <>/_" + "step" + "answer")))


@dataclass(frozen=True)
class Step:
    """One binary operation `left op right = result`."""

    left: int
    op: str
    right: int
    result: int

    def render(self, spaced: bool = False) -> str:
        """`12+7=19`, or `12 + 7 = 19` when `spaced`."""
        sep = " " if spaced else ""
        return f"{self.left}{sep}{self.op}{sep}{self.right}{sep}={sep}{self.result}"


@dataclass(frozen=True)
class Problem:
    """One task item; `to_dict` gives its jsonl record."""

    question: str
    answer: str
    solution: str
    reference_solution: str

    def to_dict(self) -> dict[str, str]:
        """The jsonl record: question, answer, solution, reference_solution."""
        return asdict(self)


def _apply(left: int, op: str, right: int) -> int:
    """Value of `left op right`."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    raise ValueError(f"op: expected one of {OPS!r}, got {op!r}")


def parse_question(question: str) -> tuple[list[int], list[str]]:
    """Split a question into its operands and operators; ValueError if it is not one."""
    if not isinstance(question, str) or not _QUESTION.fullmatch(question.strip()):
        raise ValueError(f"question: expected e.g. '12+7*3-5', got {question!r}")
    tokens = re.findall(r"\d+|[+\-*]", question)
    return [int(t) for t in tokens[0::2]], tokens[1::2]


def solve(question: str) -> list[Step]:
    """The canonical steps: fold the operands left to right."""
    operands, ops = parse_question(question)
    steps, value = [], operands[0]
    for op, right in zip(ops, operands[1:]):
        result = _apply(value, op, right)
        steps.append(Step(value, op, right, result))
        value = result
    return steps


def canonical_solution(question: str) -> str:
    """The canonical step-tagged trace of `question`."""
    steps = solve(question)
    return format_steps([s.render() for s in steps], steps[-1].result)


def _regroup(a: Step, b: Step) -> list[Step] | None:
    """A different derivation of the two chained steps `a`, `b`, or None if none applies."""
    v, x = a.left, a.right
    if a.op in "+-" and b.op == "*":  # (v +- x) * c = v*c +- x*c
        c = b.right
        return [Step(v, "*", c, v * c), Step(x, "*", c, x * c), Step(v * c, a.op, x * c, b.result)]
    if a.op == "-" and b.op == "-":  # v - x - y = v - (x + y)
        s = x + b.right
        return [Step(x, "+", b.right, s), Step(v, "-", s, b.result)]
    return None


def _reference_steps(steps: list[Step]) -> list[Step]:
    """Regroup the first applicable pair of steps, swap the operands of the other `+`/`*` steps."""
    out: list[Step] = []
    i, regrouped = 0, False
    while i < len(steps):
        pair = _regroup(steps[i], steps[i + 1]) if not regrouped and i + 1 < len(steps) else None
        if pair is not None:
            out.extend(pair)
            i, regrouped = i + 2, True
            continue
        s = steps[i]
        out.append(Step(s.right, s.op, s.left, s.result) if s.op in "+*" else s)
        i += 1
    return out


def reference_solution(question: str) -> str:
    """A correct derivation of the answer worded differently from `canonical_solution`."""
    steps = _reference_steps(solve(question))
    return format_steps([s.render(spaced=True) for s in steps], steps[-1].result)


def parse_step(text: str) -> Step | None:
    """Read a step written `a op b = r` (any spacing); None if the text is not one."""
    m = _STEP.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        return None
    return Step(int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4)))


def step_is_true(step: Step) -> bool:
    """The step's arithmetic is right."""
    return _apply(step.left, step.op, step.right) == step.result


def verify_trace(question: str, text: str, answer: str | int) -> bool:
    """`text` is a well-formed derivation of `answer` from the numbers of `question`.

    Every step must be true arithmetic on numbers available at that point (operands of the
    question or results of earlier steps), the last result must be `answer`, and so must the
    answer tag.
    """
    parsed = parse_response(text)
    if not parsed.well_formed or parsed.answer != str(answer).strip():
        return False
    available = set(parse_question(question)[0])
    for content in parsed.steps:
        step = parse_step(content)
        if step is None or not step_is_true(step) or not {step.left, step.right} <= available:
            return False
        available.add(step.result)
    return str(step.result) == parsed.answer


def make_problem(rng: random.Random) -> Problem:
    """Draw one problem from `rng` (see the module docstring for the ranges)."""
    value = rng.randint(1, 20)
    question = str(value)
    for _ in range(rng.randint(*NUM_OPERANDS) - 1):
        op, right = _draw_op(rng, value)
        question += f"{op}{right}"
        value = _apply(value, op, right)
    return Problem(question, str(value), canonical_solution(question), reference_solution(question))


def _draw_op(rng: random.Random, value: int) -> tuple[str, int]:
    """An operator and operand that keep the running value in [0, MAX_VALUE]."""
    choices = []
    if value < MAX_VALUE:
        choices.append(("+", 1, min(20, MAX_VALUE - value)))
    if value >= 1:
        choices.append(("-", 1, min(20, value)))
    if 2 <= value <= MAX_VALUE // 2:
        choices.append(("*", 2, min(9, MAX_VALUE // value)))
    op, lo, hi = rng.choice(choices)
    return op, rng.randint(lo, hi)


def _split_of(question: str) -> str:
    """The split a question belongs to, from a stable hash of its text."""
    digest = hashlib.sha256(question.encode()).digest()
    return "test" if digest[0] % _TEST_BUCKETS == 0 else "train"


def make_split(split: str, n: int, seed: int = 0) -> list[Problem]:
    """`n` distinct problems of `split` ("train" or "test"), deterministic in (split, n, seed)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    for _ in range(_MAX_TRIES_PER_ITEM * (n + 1)):
        if len(out) == n:
            break
        problem = make_problem(rng)
        if problem.question not in seen and _split_of(problem.question) == split:
            seen.add(problem.question)
            out.append(problem)
    if len(out) < n:
        raise ValueError(f"n: could not draw {n} distinct {split} problems (too many?)")
    return out


def make_records(split: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """`make_split` as jsonl records (question, answer, solution, reference_solution)."""
    return [p.to_dict() for p in make_split(split, n, seed)]


def write_jsonl(path: str | Path, records: list[dict[str, str]]) -> None:
    """Write one JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Read records written by `write_jsonl`; each needs question, answer and reference_solution."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [k for k in ("question", "answer", "reference_solution") if k not in record]
            if missing:
                raise ValueError(f"path: {path}:{line_no} lacks {missing}")
            records.append(record)
    return records
