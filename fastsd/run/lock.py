"""The run directory claimed before the model loads: writable, with room for a checkpoint, and
locked; and a failed write there (a full disk) named, with what was kept.

One writer per run directory: `run_dir/run.lock`, an exclusive `flock` taken before the model
loads and held for the run. The kernel releases it when its holder ends in any way (SIGKILL
included), so a lock file left by a dead run is no obstacle; a second run on a directory in use
fails at once, naming the holder's PID and host, which the holder writes into the file. Under
torchrun rank 0 takes it and every rank fails alike. flock is per host: two hosts sharing a
run directory over NFS may not see each other's lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from ..config import TrainConfig
from ..model.dist import Dist

__all__ = ["LOCK", "RunDirLock", "WriteFailed", "checkpoint_bytes"]

LOCK = "run.lock"


class RunDirLock:
    """`with RunDirLock(cfg, d) as lock: ... lock.take() ...`: released when the block ends."""

    def __init__(self, cfg: TrainConfig, d: Dist):
        self.cfg, self.dir, self.d, self.fd = cfg, Path(cfg.run_dir), d, None

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def take(self) -> None:
        """Make run_dir and lock it (rank 0); ValueError naming run_dir on every rank if it cannot
        be written, another run holds it, or its disk has no room for a checkpoint."""
        error = None
        if self.d.main:
            try:
                self.fd = _acquire(self.dir / LOCK)
                _room(self.dir, *checkpoint_bytes(self.cfg))
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


_MB = 2**20


def checkpoint_bytes(cfg: TrainConfig) -> tuple[int, str]:
    """A floor on what one more checkpoint takes, and what it was estimated from: the newest
    checkpoint's size; else the model's weight files, times 3 for full fine-tuning (the weights
    and AdamW's two moments), once more for an ema teacher."""
    from .checkpoint import latest_checkpoint

    size = lambda root: sum(p.stat().st_size for p in root.rglob("*") if p.is_file())  # noqa: E731
    last = latest_checkpoint(cfg.run_dir)
    if last is not None:
        return size(last), f"the size of {last}"
    from ..model.load import DEFAULT_MODEL_DIR

    model = Path(DEFAULT_MODEL_DIR if cfg.model.path == "builtin" else cfg.model.path)
    weights = sum(p.stat().st_size for p in model.glob("*") if p.suffix in (".safetensors", ".bin"))
    times = (1 if cfg.model.lora.r else 3) + (cfg.teacher.kind == "ema")
    return weights * times, f"{model}'s weights x {times}"


def _room(run_dir: Path, want: int, source: str) -> None:
    free = shutil.disk_usage(run_dir).free
    want += 16 * _MB  # logs and config
    if free < want:
        raise ValueError(f"run_dir: {run_dir} has {free / _MB:.0f} MiB free, less than the {want / _MB:.0f} MiB a "
                         f"checkpoint needs (estimated from {source}); free space there or choose another run_dir")


class WriteFailed(RuntimeError):
    """A write to the run directory failed (a full disk, a read-only folder, a disk error): the
    message names the path, the space left, and what was kept."""

    def __init__(self, run_dir, what: str, error: BaseException):
        from .checkpoint import latest_checkpoint

        try:
            free = f"{shutil.disk_usage(run_dir).free / _MB:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        last = latest_checkpoint(run_dir)
        kept = (f"kept: the last checkpoint {last} (intact); free space and run the same command to resume from it"
                if last else "no checkpoint was kept; the same command starts afresh")
        super().__init__(f"{what}: could not be written ({type(error).__name__}: {error}); {free}; {kept}")
