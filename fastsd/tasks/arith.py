"""Built-in tasks: chained integer arithmetic, solved as step-tagged traces.

A question is non-negative integers joined by `+`, `-` or `*`, evaluated strictly **left to
right, with no operator precedence**: `12+7*3-5` means `((12+7)*3)-5` = 52. Generation keeps
every intermediate result in [0, 99] (so no negative numbers ever appear), `+`/`-` operands in
[1, 20] and `*` operands in [2, 9]. Two tasks (`TASKS`, config key `data.task`) differ in the
number of operands and in how the reference solution is written:

- `long` (the default since 2026-12-01): 9 to 12 operands, so 8 to 11 steps; a trace is 249
  characters on average, at most about 300 (one token each); the reference takes two
  operations per step.
- `short` (the task before): 3 to 5 operands; the reference regroups one pair of steps.

Canonical solution (the student's form, both tasks): one step per operator, each a single
binary operation on the running result and the next operand, written compactly:

    <step_1>12+7=19</step_1><step_2>19*3=57</step_2><step_3>57-5=52</step_3><answer>52</answer>

Step notation the task accepts as equivalent (used by the critic): any spaces around the
operator and `=`, leading zeros, and swapped operands for `+` and `*`.

Reference solution: a correct but different derivation, as if written by someone else, with
spaces around operators and `=`.
- `paired` (task `long`): another step granularity. Each step applies the next two operations
  at once, left to right as the question does, so only every other intermediate result is
  written: `<step_1>12 + 7 * 3 = 57</step_1><step_2>57 - 5 + 9 = 61</step_2>...` (an odd last
  operation is a step of its own).
- `regrouped` (task `short`): regroups the first place where that is possible (distributes
  `(v+a)*c` as `v*c + a*c`, or collects two subtractions `v-a-b` as `v-(a+b)`), and writes the
  operands of the other `+`/`*` steps the other way round:
  `<step_1>12 * 3 = 36</step_1><step_2>7 * 3 = 21</step_2><step_3>36 + 21 = 57</step_3>...`

Drawing questions and the train/test splits: `fastsd.tasks.splits`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .format import format_steps, parse_response

__all__ = [
    "ALPHABET",
    "Problem",
    "REFERENCE_STYLES",
    "Step",
    "apply_op",
    "parse_question",
    "solve",
    "canonical_solution",
    "reference_solution",
    "parse_step",
    "parse_chain",
    "step_is_true",
    "verify_trace",
]

OPS = "+-*"
MAX_VALUE = 99
_QUESTION = re.compile(r"\d+(?:[+\-*]\d+)+")
_STEP = re.compile(r"\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*(\d+)\s*")
_CHAIN = re.compile(r"\s*\d+(?:\s*[+\-*]\s*\d+)+\s*=\s*\d+\s*")
REFERENCE_STYLES = ("paired", "regrouped")
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


def apply_op(left: int, op: str, right: int) -> int:
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
        result = apply_op(value, op, right)
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


def _paired(steps: list[Step]) -> list[str]:
    """Two operations per step, `v op x op y = r`, spaced; an odd last operation alone."""
    out = []
    for i in range(0, len(steps), 2):
        pair = steps[i : i + 2]
        ops = "".join(f" {s.op} {s.right}" for s in pair)
        out.append(f"{pair[0].left}{ops} = {pair[-1].result}")
    return out


def reference_solution(question: str, style: str = "paired") -> str:
    """A correct derivation of the answer written differently from `canonical_solution`, in
    `style`: "paired" or "regrouped" (module docstring)."""
    if style not in REFERENCE_STYLES:
        raise ValueError(f"style: expected one of {REFERENCE_STYLES}, got {style!r}")
    steps = solve(question)
    if style == "paired":
        return format_steps(_paired(steps), steps[-1].result)
    steps = _reference_steps(steps)
    return format_steps([s.render(spaced=True) for s in steps], steps[-1].result)


def parse_step(text: str) -> Step | None:
    """Read a step written `a op b = r` (any spacing); None if the text is not one."""
    m = _STEP.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        return None
    return Step(int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4)))


def parse_chain(text: str) -> tuple[list[int], list[str], int] | None:
    """Read a step of one or more operations, `a op b [op c ...] = r` (any spacing), as
    (operands, operators, result); None if the text is not one."""
    if not isinstance(text, str) or _CHAIN.fullmatch(text) is None:
        return None
    tokens = re.findall(r"\d+|[+\-*=]", text)
    return [int(t) for t in tokens[0:-2:2]], tokens[1:-2:2], int(tokens[-1])


def step_is_true(step: Step) -> bool:
    """The step's arithmetic is right."""
    return apply_op(step.left, step.op, step.right) == step.result


def verify_trace(question: str, text: str, answer: str | int) -> bool:
    """`text` is a well-formed derivation of `answer` from the numbers of `question`.

    Every step must be true arithmetic, one or more operations evaluated left to right, on
    numbers available at that point (operands of the question or results of earlier steps); the
    last result must be `answer`, and so must the answer tag. (So one step that restates the
    whole question with its value is a valid trace: this checks derivations, not granularity.)
    """
    parsed = parse_response(text)
    if not parsed.well_formed or parsed.answer != str(answer).strip():
        return False
    available = set(parse_question(question)[0])
    for content in parsed.steps:
        chain = parse_chain(content)
        if chain is None or not set(chain[0]) <= available:
            return False
        operands, ops, result = chain
        value = operands[0]
        for op, right in zip(ops, operands[1:]):
            value = apply_op(value, op, right)
        if value != result:
            return False
        available.add(result)
    return str(result) == parsed.answer
