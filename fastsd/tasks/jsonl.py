"""One JSON object per line: the built-in tasks' record files."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_jsonl", "read_jsonl"]


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
