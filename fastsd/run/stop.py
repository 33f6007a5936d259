"""SIGTERM and SIGHUP: a scheduler's stop (SLURM, Kubernetes, `timeout`) or a closed terminal takes
Ctrl-C's path and uses the grace period before the SIGKILL that follows.

The step in progress is abandoned up to its update (nothing of it is written); from the update on
the step is finished and written. Then the last completed step is saved, within
`checkpoint.stop_timeout` seconds of the signal, unless a checkpoint of it is on disk already.
Until its update a step has changed nothing a checkpoint holds but the random state, so the
checkpoint holds the random state the step started from: the one checkpoint.every=1 would have
saved, and the same command resumes bit for bit.

One process: the handler raises at once (outside the held part of a step). Under torchrun (the
agent forwards the signal to every rank) a rank raising alone would leave the others waiting in a
collective, so the handler only records the signal and the ranks agree on it at fixed points of
the step (`StopSignals.poll`, a one-number all-reduce).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from ..config import TrainConfig
from ..model.dist import Dist
from . import checkpoint as ckpt

__all__ = ["STOP_SIGNALS", "Stopped", "StopSignals", "keep_last_step", "stopped_message"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
NOT_KEPT = 3  # the exit code of a stop that could not save the last completed step


class Stopped(KeyboardInterrupt):
    """A SIGTERM or SIGHUP ended the run: `after_step` (the step in progress was written whole) or
    it was abandoned; `kept`: the checkpoint of the last completed step, `why_not`: else why none."""

    def __init__(self, signum: int, after_step: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.after_step = signum, after_step
        self.step: int | None = None
        self.kept: Path | None = None
        self.why_not: str | None = None


class _SaveTimeout(Exception):
    pass


class StopSignals:
    """SIGTERM/SIGHUP handlers for the length of a run (`with StopSignals(d, timeout) as stop`);
    outside the main thread, where Python handles no signals, they are not installed."""

    def __init__(self, d: Dist, timeout: float):
        self.d, self.timeout = d, timeout
        self.signum, self.at, self.holding = 0, 0.0, False
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        first = not self.signum
        if first:
            self.signum, self.at = signum, time.monotonic()
            if self.d.main:
                what = ("at the next point every rank agrees on" if self.d.enabled else
                        "once this step is written" if self.holding else "abandoning the step in progress")
                print(f"[fastsd] {signal.Signals(signum).name}: stopping ({what}), then saving the last completed "
                      f"step within checkpoint.stop_timeout={self.timeout:g} s", file=sys.stderr, flush=True)
        if first and not self.d.enabled and not self.holding:
            raise Stopped(signum)

    def hold(self) -> None:
        """From here to the step's end (`poll(after_step=True)`) a stop signal waits: the step is
        finished and written (its update has begun to change the weights)."""
        self.holding = True

    def poll(self, after_step: bool = False) -> None:
        """Raise `Stopped` on every rank if any rank got a stop signal (a collective under torchrun)."""
        self.holding = self.holding and not after_step
        signum = self.d.all_max(self.signum) if self.d.enabled else self.signum
        if signum:
            if not self.signum:  # another rank's signal: this rank's arrives any moment
                self.signum, self.at = signum, time.monotonic()
            raise Stopped(signum, after_step)

    def remaining(self) -> float:
        """Seconds left of checkpoint.stop_timeout (the least over ranks, so that all agree)."""
        left = self.timeout - (time.monotonic() - self.at)
        return min(self.d.gather_objects(left))


def keep_last_step(e: Stopped, stop: StopSignals, cfg: TrainConfig, step: int, save) -> None:
    """Save the last completed `step` through `save(step)` unless it is on disk already, within
    the time left; record in `e` what was kept. Every rank calls it."""
    e.step = step
    last = ckpt.latest_checkpoint(cfg.run_dir)
    if step == 0 or (last is not None and last.name == f"step_{step:08d}"):
        e.kept = last
        return
    left = stop.remaining()
    if cfg.checkpoint.stop_timeout == 0 or left <= 0:
        e.why_not = ("checkpoint.stop_timeout=0" if cfg.checkpoint.stop_timeout == 0 else
                     f"checkpoint.stop_timeout={cfg.checkpoint.stop_timeout:g} s had passed")
        return

    saving = [True]

    def too_long(signum, frame):
        if saving[0]:
            raise _SaveTimeout

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, too_long) if main else None
    if main:
        signal.setitimer(signal.ITIMER_REAL, left)
    t0 = time.monotonic()
    try:
        e.kept = save(step)
        saving[0] = False
    except Exception as err:  # _SaveTimeout, or a failed write: the previous checkpoint is intact
        saving[0] = False
        timed_out = isinstance(err, _SaveTimeout) or "_SaveTimeout" in str(err)  # other ranks: by name
        e.why_not = (f"the save did not finish within checkpoint.stop_timeout={cfg.checkpoint.stop_timeout:g} s"
                     if timed_out else f"the save failed: {type(err).__name__}: {err}")
        last = ckpt.latest_checkpoint(cfg.run_dir)
        if last is not None and last.name == f"step_{step:08d}":  # published; only pruning was cut short
            e.kept, e.why_not = last, None
    finally:
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if e.kept is not None and stop.d.main:
        print(f"[fastsd] saved {e.kept} in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)


def stopped_message(cfg: TrainConfig, e: Stopped) -> tuple[str, int]:
    """What to tell a user whose run a SIGTERM/SIGHUP stopped, and the exit code: 128 + the signal's
    number when the last completed step is kept (or none was completed), else 3."""
    name = signal.Signals(e.signum).name
    head = (f"[fastsd] stopped by {name} once step {e.step}'s logs were written." if e.after_step else
            f"[fastsd] stopped by {name}: the step in progress was abandoned (nothing of it was written).")
    last = ckpt.latest_checkpoint(cfg.run_dir)
    again = ("running the same command again resumes from it" if cfg.resume == "auto" else
             f"run the command again with resume=auto (not resume={cfg.resume}) to resume from it")
    if e.kept is not None:
        return f"{head}\n[fastsd] step {e.step} is kept in {e.kept}; {again}.", 128 + e.signum
    if e.why_not is None:  # no step was completed (or the stop came before training began)
        where = f"last checkpoint: {last}; {again}" if last else "no checkpoint yet: the same command starts afresh"
        return f"{head}\n[fastsd] {where}.", 128 + e.signum
    where = (f"the last checkpoint is {last}; {again} (the steps after it run again)" if last else
             "no checkpoint: the same command starts afresh")
    return f"{head}\n[fastsd] step {e.step} was not saved ({e.why_not}); {where}.", NOT_KEPT
