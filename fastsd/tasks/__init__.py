"""What the model is asked and how an answer is judged: the data, the built-in tasks, the
response formats and the graders.

    data.py     `load_data` (entry point): the run's training and held-out questions, from a jsonl
                or parquet file or the built-in task; `step_questions`, each step's questions
    sources.py  data.path as shards (a glob, a folder), a datasets.save_to_disk folder or a hub name
    arith.py    the built-in tasks' arithmetic: questions, solutions, step checks
    splits.py   the built-in tasks (`long`, `short`): drawing questions and the splits
    jsonl.py    one JSON object per line
    format.py   response formats (`steps`, `free`): tolerant parsing, the final-answer reward
    grading.py  graders (`exact`, `math` through math-verify)
"""

from . import arith, splits
from .arith import Problem
from .jsonl import read_jsonl, write_jsonl
from .splits import DEFAULT_TASK, TASKS, make_records, make_split

__all__ = ["arith", "splits", "Problem", "DEFAULT_TASK", "TASKS", "make_records", "make_split", "read_jsonl",
           "write_jsonl"]
