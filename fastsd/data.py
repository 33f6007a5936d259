"""Questions to train and evaluate on: a jsonl file, or the built-in arithmetic task.

jsonl format: one JSON object per line with the keys

    question            str, non-empty
    answer              str or number, non-empty (a number is converted: 52 and 52.0 -> "52", 0.5 -> "0.5")
    reference_solution  str, non-empty (the teacher's context for condition=reference)

Extra keys are ignored and blank lines skipped. Anything else raises ValueError("PATH:LINE: ...").
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .tasks import arith

__all__ = ["Example", "KEYS", "load_jsonl", "builtin_split", "step_questions"]

KEYS = ("question", "answer", "reference_solution")


@dataclass(frozen=True)
class Example:
    """One question with its ground-truth final answer and a reference solution."""

    question: str
    answer: str
    reference_solution: str


def _answer_text(value) -> str | None:
    """The answer as text: str as is, an int or finite float as a number; None for other types."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _example(record, where: str) -> Example:
    """Validate one parsed jsonl line; `where` is "PATH:LINE"."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    fields = {}
    for key in KEYS:
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}")
        value = record[key]
        text = _answer_text(value) if key == "answer" else value if isinstance(value, str) else None
        if text is None:
            kind = "a string or a number" if key == "answer" else "a string"
            raise ValueError(f"{where}: {key!r} must be {kind}, got {type(value).__name__} {value!r}")
        if not text.strip():
            raise ValueError(f"{where}: {key!r} is empty")
        fields[key] = text
    return Example(**fields)


def load_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read questions from a jsonl file (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: {path} {'is not a file' if path.exists() else 'does not exist'}")
    examples = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # else an error at the end reads "column 1"
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            examples.append(_example(record, where))
    return examples


def builtin_split(split: str, n: int, seed: int = 0) -> list[Example]:
    """`n` questions of the built-in arithmetic task's `split` ("train" or "test"), deterministic in
    (split, n, seed); the two splits never share a question."""
    return [Example(p.question, p.answer, p.reference_solution) for p in arith.make_split(split, n, seed)]


def step_questions(train: list[Example], cfg, step: int) -> list[Example]:
    """The questions of optimizer step `step`: a fresh seeded permutation per epoch."""
    n, per = len(train), cfg.questions_per_step
    orders: dict[int, list[int]] = {}
    out = []
    for pos in range(step * per, (step + 1) * per):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(cfg.seed * 100_003 + epoch).shuffle(orders[epoch])
        out.append(train[orders[epoch][i]])
    return out
