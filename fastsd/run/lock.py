"""One writer per run directory: `run_dir/run.lock`, an exclusive `flock` taken before the model
loads and held for the run. The kernel releases it when its holder ends in any way (SIGKILL
included), so a lock file left by a dead run is no obstacle; a second run on a directory in use
fails at once, naming the holder's PID and host, which the holder writes into the file. Under
torchrun rank 0 takes it and every rank fails alike. flock is per host: two hosts sharing a
run directory over NFS may not see each other's lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from ..config import TrainConfig
from ..model.dist import Dist

__all__ = ["LOCK", "RunDirLock"]

LOCK = "run.lock"


class RunDirLock:
    """`with RunDirLock(cfg, d) as lock: ... lock.take() ...`: released when the block ends."""

    def __init__(self, cfg: TrainConfig, d: Dist):
        self.dir, self.d, self.fd = Path(cfg.run_dir), d, None

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def take(self) -> None:
        """Make run_dir and lock it (rank 0); ValueError naming run_dir on every rank if it cannot
        be written or another run holds it."""
        error = None
        if self.d.main:
            try:
                self.fd = _acquire(self.dir / LOCK)
            except ValueError as e:
                error = str(e)
        errors = self.d.gather_objects(error)
        if errors[0] is not None:
            raise ValueError(errors[0])


def _acquire(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"run_dir: {path.parent} cannot be written ({e.strerror}: {e.filename}); "
                         "choose a writable run_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process that has not written its name yet"
        os.close(fd)
        raise ValueError(f"run_dir: {path.parent} is in use by another run ({holder}; lock {path}): wait for it "
                         "to end, stop it, or choose another run_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(), 0)
    return fd
