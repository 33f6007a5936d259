"""The checkpoint folders on disk: the complete ones found, a new one published atomically, old
ones pruned.

Atomic-write scheme: everything, COMPLETE included, is written into a sibling
`step_XXXXXXXX.tmp-<uuid>` and fsynced; only then is that directory renamed (`os.replace`, atomic
on POSIX) to `step_XXXXXXXX`. `latest_checkpoint` accepts only directories named exactly
`step_<digits>` that contain COMPLETE, so a crash at any point leaves either nothing it accepts
(a tmp dir, cleaned up by the next save) or a finished checkpoint. Re-saving an existing step moves
the old copy aside to `step_XXXXXXXX.old-<uuid>` before the rename (a crash in between loses that
step, never yields a partial one); pruning renames a checkpoint to `.old-<uuid>` before deleting it,
so a half-deleted directory is never accepted either.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

__all__ = ["COMPLETE", "complete", "fsync", "is_complete", "make_tmp", "prune", "publish", "remove", "seal"]

log = logging.getLogger("fastsd")

COMPLETE = "COMPLETE"
_FINAL = re.compile(r"step_(\d{8,})")
_STALE = re.compile(r"step_\d{8,}\.(?:tmp|old)-.+")


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync(Path(dirpath, f))
        fsync(Path(dirpath))


def remove(path: Path) -> None:
    """Rename out of `latest_checkpoint`'s sight first, then delete."""
    trash = path if _STALE.fullmatch(path.name) else path.with_name(f"{path.name}.old-{uuid.uuid4().hex[:12]}")
    if trash != path:
        os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def complete(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints under `root`, by step."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _FINAL.fullmatch(p.name)) and (p / COMPLETE).is_file()]
    return sorted(found)


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE).is_file()


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished tmp dir to its final name (moving an older copy of the step aside)."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:12]}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:  # put the previous copy back
            os.replace(old, final)
        raise
    fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(root: Path, keep: int, just_saved: Path) -> None:
    """Keep the `keep` highest-step complete checkpoints (and the one just saved); drop stale dirs."""
    try:
        for _, path in complete(root)[:-keep]:
            if path != just_saved:
                remove(path)
        for path in root.iterdir():
            if _STALE.fullmatch(path.name):
                remove(path)
    except OSError as e:  # the new checkpoint is safe; old ones go next time
        log.warning("checkpoint.keep: could not remove old checkpoints in %s (%s)", root, e)


def make_tmp(final: Path) -> str:
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir(parents=True)
    return str(tmp)


def seal(tmp: Path, final: Path, step: int, world: int) -> None:
    """fsync everything, write COMPLETE (last, inside tmp), then rename tmp to `final`."""
    fsync_tree(tmp)
    with open(tmp / COMPLETE, "w") as f:
        f.write(json.dumps({"step": step, "world_size": world}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    publish(tmp, final)
