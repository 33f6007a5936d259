"""The HTTP critic's validated replies, cached on disk by the content of the request, so that a
resumed run does not pay for them again."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["ReplyCache"]


class ReplyCache:
    """Validated replies keyed by a hash of the request body, in `directory/rank{R}.jsonl`.

    Every file in the directory is read (any rank may reuse any reply); each process appends to
    its own, one flushed line per reply, so a crash loses at most the line being written (a torn
    last line is skipped when read back).
    """

    def __init__(self, directory: str | os.PathLike, rank: int = 0):
        self.dir = Path(directory)  # made by the first put: building a critic writes nothing
        self.replies: dict[str, str] = {}
        for path in sorted(self.dir.glob("*.jsonl")):
            with open(path, "rb") as f:
                for line in f:  # ASCII lines (json escapes the rest): a torn one fails to parse
                    try:
                        row = json.loads(line)
                        self.replies[row["key"]] = row["reply"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn line from an interrupted write
        self._path = self.dir / f"rank{rank}.jsonl"
        if self._path.exists() and self._path.stat().st_size:
            with open(self._path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # end a torn line, so the next record starts on its own

    @staticmethod
    def key(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        self.replies[key] = reply
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self._path, "a", encoding="ascii") as f:
            f.write(json.dumps({"key": key, "reply": reply}) + "\n")
