"""Built-in tasks: chained integer arithmetic solved as step-tagged traces (`long`, `short`)."""

from . import arith, splits
from .arith import Problem
from .jsonl import read_jsonl, write_jsonl
from .splits import DEFAULT_TASK, TASKS, make_records, make_split

__all__ = ["arith", "splits", "Problem", "DEFAULT_TASK", "TASKS", "make_records", "make_split", "read_jsonl",
           "write_jsonl"]
