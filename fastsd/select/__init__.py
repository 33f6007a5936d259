"""fastsd-select: the paper's data step. Sample k responses per problem, grade them, keep the
problems whose pass count lies in a band (by default the paper's: fewer than 5 of 16).

    cli.py     fastsd-select: its flags, the config (fastsd-train's keys), then select()
    run.py     select(): batches seeded by their index, sharded over ranks, graded, the band kept
    files.py   the output folder: select.json (settings), graded.jsonl (append-only), selected.jsonl
"""

from .run import SelectOptions, select

__all__ = ["SelectOptions", "select"]
