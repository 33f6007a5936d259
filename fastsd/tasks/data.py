"""Questions to train and evaluate on: a jsonl or parquet file, or the built-in arithmetic task
(shards, datasets folders and hub names: `fastsd.tasks.sources`, every record checked here).

Each record (a jsonl line holding one JSON object, or a parquet row) has these fields, read from
the columns `data.fields.*` names (defaults in brackets; e.g. OpenMathReasoning's are `problem`,
`expected_answer` and `generated_solution`):

    question            [question] str, non-empty
    answer              [answer] str or number, non-empty (a number is converted: 52 and 52.0 -> "52", 0.5 -> "0.5")
    reference_solution  [reference_solution] str, non-empty: the teacher's context for
                        condition=reference, where every record needs one; under the other
                        conditions it is optional (a missing, null or blank one is None), and the
                        http critic shows it as the correct solution when present
    context             [none: data.fields.context names it] str, non-empty: the teacher's context
                        for condition=context (through templates.context), where every record
                        needs one; otherwise not read

A path ending in .parquet is read with pyarrow (only the columns named); anything else as jsonl.
Other keys and columns are ignored, blank jsonl lines skipped. Anything else raises
ValueError("PATH:LINE: ...") for jsonl and ValueError("PATH: row N: ...") for parquet (N counts
from 1), naming the `data.fields.*` key of a field that is missing or bad. That includes what
JSON lets through but a run cannot use: a key given twice in one record (JSON keeps the last in
silence), a text with invalid Unicode (a lone surrogate such as "\ud800", which no tokenizer
encodes) and an integer longer than Python reads (`sys.get_int_max_str_digits()`, 4300 digits).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .splits import DEFAULT_TASK, make_split

if TYPE_CHECKING:
    from ..config import TrainConfig

__all__ = ["Example", "KEYS", "load_data", "load_examples", "load_jsonl", "load_parquet", "load_questions", "builtin_split",
           "step_questions", "key_error", "record_places"]

KEYS = ("question", "answer", "reference_solution", "context")
OPTIONAL = ("reference_solution", "context")  # needed only by some conditions


@dataclass(frozen=True)
class Example:
    """One question with its ground-truth final answer and a reference solution (None: none given)."""

    question: str
    answer: str
    reference_solution: str | None = None
    context: str | None = None  # data.fields.context's column: condition=context's teacher reads it


def _answer_text(value) -> str | None:
    """The answer as text that keeps its value under every grader: str as is; an integer in full
    (beyond 2^53 too); a finite float in positional notation, the shortest that reads back as it
    (never an exponent: math-verify reads "1e-05" as e - 5); a decimal as written; numpy scalars
    as their Python value. None for other types."""
    if isinstance(value, np.generic) and not isinstance(value, np.floating):
        value = value.item()
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else np.format_float_positional(value, unique=True, trim="-")
    if isinstance(value, Decimal) and value.is_finite():
        return format(value, "f")
    return None


class _Refused(ValueError):
    """A record JSON accepts but a run cannot use (a duplicate key, an integer too long to read)."""


class _LongInt:
    """An integer literal past Python's int-string limit, kept as its length until the record
    around it names its key."""

    def __init__(self, digits: str):
        self.digits = len(digits.lstrip("-"))


def _parse_int(text: str):
    try:
        return int(text)
    except ValueError:  # past sys.get_int_max_str_digits()
        return _LongInt(text)


def _object(pairs: list) -> dict:
    """json's object_pairs_hook: a dict, refusing a key given twice and an integer too long to read."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"key {key!r} appears twice in the record (JSON would keep the last in silence)")
        if isinstance(value, _LongInt):
            raise _Refused(f"{key!r} is an integer of {value.digits} digits, longer than Python reads "
                           f"({sys.get_int_max_str_digits()}, sys.set_int_max_str_digits); write it as a string")
        out[key] = value
    return out


def _unicode_error(text: str) -> str | None:
    """Why `text` cannot be encoded as UTF-8 (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"invalid Unicode: a lone surrogate {text[e.start]!r} at character {e.start + 1}"
    return None


def _columns(fields) -> dict[str, str]:
    """Field -> column name, from a `data.fields` config (None: the defaults)."""
    return {key: (getattr(fields, key) if fields is not None else key) for key in KEYS}


def _example(record, where: str, columns: dict[str, str], need_reference: bool, need_context: bool = False) -> Example:
    """Validate one record; `where` is "PATH:LINE" or "PATH: row N"."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    out = {}
    for key in KEYS:
        col, named = columns[key], f"data.fields.{key}"
        optional = key in OPTIONAL and not {"reference_solution": need_reference, "context": need_context}.get(key)
        value = record.get(col) if col else None
        if optional and (value is None or (isinstance(value, str) and not value.strip())):
            out[key] = None
            continue
        if col not in record:
            raise ValueError(f"{where}: missing key {col!r} ({named})")
        value = record[col]
        text = _answer_text(value) if key == "answer" else value if isinstance(value, str) else None
        if text is None:
            kind = "a string or a number" if key == "answer" else "a string"
            raise ValueError(f"{where}: {col!r} must be {kind}, got {type(value).__name__} {value!r} ({named})")
        if not text.strip():
            raise ValueError(f"{where}: {col!r} is empty ({named})")
        bad = _unicode_error(text)
        if bad:
            raise ValueError(f"{where}: {col!r} holds {bad} ({named})")
        out[key] = text
    return Example(**out)


def _check_path(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: {path} {'is not a file' if path.exists() else 'does not exist'}")
    return path


def load_examples(path: str | os.PathLike, fields=None, need_reference: bool = True,
                  need_context: bool = False) -> list[Example]:
    """Read questions from a .parquet file or a jsonl file (module docstring); `fields` is the
    `data.fields` config (None: the default column names)."""
    load = load_parquet if str(path).lower().endswith(".parquet") else load_jsonl
    return load(path, fields, need_reference, need_context)


def load_jsonl(path: str | os.PathLike, fields=None, need_reference: bool = True,
               need_context: bool = False) -> list[Example]:
    """Read questions from a jsonl file (format in the module docstring)."""
    path, columns = _check_path(path), _columns(fields)
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
                record = json.loads(line.rstrip("\r\n"), object_pairs_hook=_object, parse_int=_parse_int)
            except json.JSONDecodeError as e:  # (the rstrip: else an error at the end reads "column 1")
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            except _Refused as e:
                raise ValueError(f"{where}: {e}") from None
            if isinstance(record, _LongInt):
                raise ValueError(f"{where}: expected a JSON object, got an integer of {record.digits} digits")
            examples.append(_example(record, where, columns, need_reference, need_context))
    return examples


def load_parquet(path: str | os.PathLike, fields=None, need_reference: bool = True,
                 need_context: bool = False) -> list[Example]:
    """Read questions from a parquet file (format in the module docstring), only the columns used."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, columns = _check_path(path), _columns(fields)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    wanted = _wanted(set(pf.schema_arrow.names), columns, need_reference, need_context, str(path))
    examples, row = [], 0
    for batch in pf.iter_batches(columns=wanted, batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            examples.append(_example(record, f"{path}: row {row}", columns, need_reference, need_context))
    return examples


def _wanted(names: set, columns: dict[str, str], need_reference: bool, need_context: bool, where: str) -> list[str]:
    """The columns to read of a table with columns `names`; ValueError if one needed is missing."""
    for key in KEYS:
        col = columns[key]
        needed = {"reference_solution": need_reference, "context": need_context}.get(key, True)
        if col not in names and needed:
            raise ValueError(f"{where}: no column {col!r} ({f'data.fields.{key}'}); it has {sorted(names)}")
    return [c for c in dict.fromkeys(columns.values()) if c in names]


def load_questions(path: str, fields=None, need_reference: bool = True, need_context: bool = False,
                   **where) -> list[Example]:
    """Questions from a file, shards, a datasets folder or a hub name (`fastsd.tasks.sources`;
    `where`: its split, subset, split_key), every record checked as a file's."""
    from .sources import load_source

    columns = _columns(fields)
    return load_source(path, lambda f: load_examples(f, fields, need_reference, need_context),
                       lambda record, at: _example(record, at, columns, need_reference, need_context),
                       lambda names, at: _wanted(names, columns, need_reference, need_context, at), **where)


def builtin_split(split: str, n: int, seed: int = 0, task: str = DEFAULT_TASK) -> list[Example]:
    """`n` questions of the built-in arithmetic `task`'s `split` ("train" or "test"), deterministic
    in (split, n, seed, task); the two splits never share a question."""
    return [Example(p.question, p.answer, p.reference_solution) for p in make_split(split, n, seed, task)]


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


def record_places(path: str, indices: list[int]) -> list[str]:
    """Where the records of `load_questions(path)` at `indices` are: 'PATH:LINE' in a jsonl file (blank
    lines are skipped when loading), 'PATH (row N)' in a parquet file, each in its shard for a glob or
    folder of shards, 'builtin (question N)' for the built-in task, 'PATH (question N)' otherwise."""
    from .sources import shard_files, shard_places

    shards = shard_files(path) if path != "builtin" else None
    if shards:  # a glob or folder of shards: each record's shard and line or row
        return shard_places(shards, indices, record_places)
    if path == "builtin" or path.lower().endswith(".parquet"):
        return [f"{path} ({'question' if path == 'builtin' else 'row'} {i + 1})" for i in indices]
    try:
        with open(path, "rb") as f:
            lines = [n for n, raw in enumerate(f, start=1) if raw.strip()]
        return [f"{path}:{lines[i]}" for i in indices]
    except (OSError, IndexError):
        return [f"{path} (question {i + 1})" for i in indices]


def key_error(key: str, e: ValueError) -> ValueError:
    """A loader's error about its `path` argument, told as the config key it came from."""
    text = str(e)
    return ValueError(f"{key}:{text[len('path:'):]}" if text.startswith("path:") else f"{key}: {text}")


def load_data(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    c = cfg.data
    need = cfg.feedback_condition().required_fields()
    try:
        train = (builtin_split("train", c.train_size, c.seed, c.task) if c.path == "builtin"
                 else load_questions(c.path, c.fields, "reference_solution" in need, "context" in need,
                                     split=c.split, subset=c.subset))
    except ValueError as e:
        raise key_error("data.path", e) from None
    try:  # held-out questions are only sampled and graded: no reference solution needed
        held = (builtin_split("test", c.eval_size, c.seed, c.task) if c.eval_path == "builtin"
                else load_questions(c.eval_path, c.fields, need_reference=False, split=c.eval_split, subset=c.subset,
                                    split_key="data.eval_split"))
    except ValueError as e:
        raise key_error("data.eval_path", e) from None
    if not train:
        raise ValueError(f"data.path: no training questions in {c.path}")
    if not held:
        raise ValueError(f"data.eval_path: no held-out questions in {c.eval_path}")
    return train, held
