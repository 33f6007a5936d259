"""The built-in tasks (`TASKS`, config key `data.task`): drawing questions and the splits.

A question belongs to the held-out ("test") split iff a stable hash of its text falls in one
bucket of five, so train and test are disjoint for every seed and size, and each split is a
deterministic function of (task, split, size, seed). What the tasks are: `fastsd.tasks.arith`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from . import arith

__all__ = ["SPLITS", "TASKS", "DEFAULT_TASK", "TaskSpec", "make_problem", "make_split", "make_records"]

SPLITS = ("train", "test")
_TEST_BUCKETS = 5  # one question in five is held out
_MAX_TRIES_PER_ITEM = 1000


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: how many operands a question has and how its reference is written."""

    operands: tuple[int, int]
    reference: str  # one of arith.REFERENCE_STYLES


TASKS = {"long": TaskSpec((9, 12), "paired"), "short": TaskSpec((3, 5), "regrouped")}
DEFAULT_TASK = "long"


def _spec(task: str) -> TaskSpec:
    """The TaskSpec named `task`; ValueError naming the choices otherwise."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    return TASKS[task]


def make_problem(rng: random.Random, task: str = DEFAULT_TASK) -> arith.Problem:
    """Draw one problem of `task` from `rng` (ranges: `fastsd.tasks.arith`)."""
    spec = _spec(task)
    value = rng.randint(1, 20)
    question = str(value)
    for _ in range(rng.randint(*spec.operands) - 1):
        op, right = _draw_op(rng, value)
        question += f"{op}{right}"
        value = arith.apply_op(value, op, right)
    return arith.Problem(question, str(value), arith.canonical_solution(question),
                         arith.reference_solution(question, spec.reference))


def _draw_op(rng: random.Random, value: int) -> tuple[str, int]:
    """An operator and operand that keep the running value in [0, arith.MAX_VALUE]."""
    choices = []
    if value < arith.MAX_VALUE:
        choices.append(("+", 1, min(20, arith.MAX_VALUE - value)))
    if value >= 1:
        choices.append(("-", 1, min(20, value)))
    if 2 <= value <= arith.MAX_VALUE // 2:
        choices.append(("*", 2, min(9, arith.MAX_VALUE // value)))
    op, lo, hi = rng.choice(choices)
    return op, rng.randint(lo, hi)


def _split_of(question: str) -> str:
    """The split a question belongs to, from a stable hash of its text."""
    digest = hashlib.sha256(question.encode()).digest()
    return "test" if digest[0] % _TEST_BUCKETS == 0 else "train"


def make_split(split: str, n: int, seed: int = 0, task: str = DEFAULT_TASK) -> list[arith.Problem]:
    """`n` distinct problems of `task`'s `split` ("train" or "test"), deterministic in
    (split, n, seed, task)."""
    _spec(task)
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[arith.Problem] = []
    for _ in range(_MAX_TRIES_PER_ITEM * (n + 1)):
        if len(out) == n:
            break
        problem = make_problem(rng, task)
        if problem.question not in seen and _split_of(problem.question) == split:
            seen.add(problem.question)
            out.append(problem)
    if len(out) < n:
        raise ValueError(f"n: could not draw {n} distinct {split} problems (too many?)")
    return out


def make_records(split: str, n: int, seed: int = 0, task: str = DEFAULT_TASK) -> list[dict[str, str]]:
    """`make_split` as jsonl records (question, answer, solution, reference_solution)."""
    return [p.to_dict() for p in make_split(split, n, seed, task)]
