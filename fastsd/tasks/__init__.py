"""Built-in tasks. `arith`: chained integer arithmetic solved as step-tagged traces."""

from . import arith
from .arith import Problem, make_records, make_split, read_jsonl, write_jsonl

__all__ = ["arith", "Problem", "make_records", "make_split", "read_jsonl", "write_jsonl"]
