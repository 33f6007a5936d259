"""fastsd-select's files in its output folder OUT, and the records as read.

    OUT/select.json    the settings that decide what a problem's grading is (model, data, k, seed,
                       sampling); a restart with other settings is refused, naming the setting
    OUT/graded.jsonl   one line per graded problem, appended batch by batch: its index in the
                       data, question, passes of k, each sample's reward, the critic's verdict.
                       A restart skips what is here; a damaged last line (a stop mid-write) is
                       cut off and its problem graded again; damage before the last line is an error
    OUT/selected.jsonl the problems in the band, each record as read plus a "select" object
                       ({"passes", "k", "pass_rate", "model", "seed"}): a data file fastsd-train reads
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["GRADED", "SELECTED", "SETTINGS", "check_settings", "read_graded", "append_graded", "raw_records",
           "write_selected"]

SETTINGS, GRADED, SELECTED = "select.json", "graded.jsonl", "selected.jsonl"


def check_settings(out: Path, settings: dict) -> None:
    """Write OUT/select.json, or compare it with `settings` when it is there (a restart): a
    setting changed since is a ValueError naming it."""
    path = out / SETTINGS
    if path.exists():
        try:
            old = json.loads(path.read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--out: {path} cannot be read ({e}); remove it and {GRADED}, or choose another --out")
        for key, value in settings.items():
            if old.get(key) != value:
                raise ValueError(f"{key}: {old.get(key)!r} in the selection already in {out} ({path}), {value!r} "
                                 f"now: its graded problems would mix two settings; set it back, or choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings}, indent=1) + "\n")


def read_graded(out: Path) -> dict[int, dict]:
    """The graded problems in OUT/graded.jsonl by index. A last line that is not a whole JSON
    object (a stop while it was written) is cut from the file; any other bad line is an error."""
    path = out / GRADED
    if not path.exists():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows: dict[int, dict] = {}
    good_end = 0  # bytes of whole lines so far
    for n, line in enumerate(lines, start=1):
        last = n == len(lines) or (n == len(lines) - 1 and not lines[-1])
        if not line.strip():
            good_end += len(line) + 1
            continue
        try:
            row = json.loads(line)
            rows[int(row["index"])] = row
        except (ValueError, KeyError, TypeError) as e:
            if not last:
                raise ValueError(f"--out: {path}:{n} is damaged ({e}) and not the last line; remove {path} to grade "
                                 "again, or choose another --out") from None
            with open(path, "r+b") as f:  # a stop mid-write: its problem is graded again
                f.truncate(good_end)
            break
        good_end += len(line) + 1
    return rows


def append_graded(out: Path, rows: list[dict]) -> None:
    """Append `rows` to OUT/graded.jsonl, flushed to disk before returning."""
    if not rows:
        return
    with open(out / GRADED, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def raw_records(cfg, split: str) -> list[dict]:
    """The records of the data `split` ("train": data.path, "eval": data.eval_path) as read, in
    the order `fastsd.tasks.data.load_data` loads them (every field kept)."""
    from ..tasks.splits import make_records

    c = cfg.data
    path = c.path if split == "train" else c.eval_path
    if path == "builtin":
        return make_records("train" if split == "train" else "test", c.train_size if split == "train" else c.eval_size,
                            c.seed, c.task)
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, "rb") as f:
        return [json.loads(raw.decode("utf-8")) for raw in f if raw.strip()]


def write_selected(out: Path, records: list[dict], graded: dict[int, dict], keep: list[int], meta: dict) -> Path:
    """OUT/selected.jsonl: the records at `keep`, each with its "select" object; written whole, then renamed."""
    path, tmp = out / SELECTED, out / (SELECTED + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in keep:
            g = graded[i]
            select = {"passes": g["passes"], "k": g["k"], "pass_rate": g["passes"] / g["k"], **meta}
            f.write(json.dumps({**records[i], "select": select}, default=str) + "\n")
    os.replace(tmp, path)
    return path
