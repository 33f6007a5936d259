"""What a user watches while a run goes on: the step bar (a terminal) or a line per `log_every`
steps (a log file), and a bar or heartbeat lines for each evaluation.

The step bar's rate and time left count training steps only: an evaluation's minutes are not a
slow step. The time left adds the evaluations still due at the last one's duration. An
evaluation's progress moves within a batch of samples too (the samplers report each decode
step), so a long batch never sits at 0.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress", "ItemProgress", "HEARTBEAT_S"]

HEARTBEAT_S = 10.0  # without a terminal, an evaluation says how far it is at most this often


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress of one run on rank 0 (`on`; silent elsewhere). `cfg`: the run's TrainConfig."""

    def __init__(self, cfg, on: bool, first_step: int):
        self.cfg, self.on, self.first = cfg, on, first_step
        self.train_s, self.steps_timed, self.eval_s = 0.0, 0, None
        self.bar = None
        if on and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=first_step, desc=f"fastsd {cfg.condition}", unit="step",
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def _evals_due(self, step: int) -> int:
        """Evaluations still to run after `step` (the periodic ones and the final one)."""
        ev = self.cfg.eval
        if not ev.enabled:
            return 0
        every = ev.every or 0
        periodic = sum(1 for s in range(step + 1, self.cfg.steps) if every and s % every == 0)
        return periodic + 1

    def rate(self, step: int) -> str:
        """Seconds per training step so far in this process, and the time left (evaluations included)."""
        if not self.steps_timed:
            return ""
        per = self.train_s / self.steps_timed
        left = per * (self.cfg.steps - step) + (self.eval_s or 0.0) * self._evals_due(step)
        return f"{per:.3g} s/step, {_clock(left)} left"

    def step(self, step: int, row: dict) -> None:
        """Training step `step` is done; `row`: its metrics row (with its stage times)."""
        if not self.on:
            return
        self.train_s += sum(row.get(k) or 0.0 for k in ("time_rollout", "time_feedback", "time_update"))
        self.steps_timed += 1
        short = {k: row[k] for k in ("loss", "reward", "usable", "entropy", "is_clipped", "tok_s")
                 if row.get(k) is not None}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(", ".join([f"{k}={v:.3g}" for k, v in short.items()] + [self.rate(step)]))
        elif step % self.cfg.log_every == 0 or step == self.cfg.steps:
            print(f"[fastsd] step {step}/{self.cfg.steps} " + " ".join(f"{k}={v:.4g}" for k, v in short.items())
                  + f" ({self.rate(step)})", flush=True)

    def evaluated(self, seconds: float) -> None:
        """An evaluation took `seconds`: the time left counts each one still due at that."""
        self.eval_s = seconds

    def write(self, text: str) -> None:
        if self.on and self.bar is not None:
            self.bar.write(text)
        elif self.on:
            print(text, flush=True)

    def eval_progress(self, step: int, questions: int):
        """The `progress` callback of one evaluation (None off rank 0), called as
        progress(done, batches) where `done` counts batches of samples and may be fractional
        within one (decode steps taken of the most a batch can take): a bar under the step bar on
        a terminal; else a line when it starts, one per batch done, and one at most every
        HEARTBEAT_S seconds in between."""
        if not self.on:
            return None
        k, t0, bar, said = self.cfg.eval.k, time.perf_counter(), None, [time.perf_counter()]

        def what(total: int) -> str:  # said once, at the start: not built on every decode step
            return f"{questions} questions x {k} samples, {total} batch{'es' if total != 1 else ''}"

        def report(done: float, total: int) -> None:
            nonlocal bar
            now = time.perf_counter()
            if self.bar is not None:
                if bar is None:
                    from tqdm import tqdm

                    bar = tqdm(total=total, desc=f"eval at step {step}", unit="batch", leave=False,
                               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}[{elapsed}<{remaining}]")
                    bar.set_postfix_str(what(total) + " ")
                bar.update(done - bar.n)
                if done >= total:
                    bar.close()
            elif done == 0:
                self.write(f"[fastsd] eval at step {step}: {what(total)}")
            elif done == int(done):
                self.write(f"[fastsd] eval at step {step}: batch {int(done)}/{total} done ({now - t0:.0f} s)")
                said[0] = now
            elif now - said[0] >= HEARTBEAT_S:
                self.write(f"[fastsd] eval at step {step}: batch {int(done) + 1}/{total}, "
                           f"{100 * (done - int(done)):.0f}% of its decode steps ({now - t0:.0f} s)")
                said[0] = now

        return report

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ItemProgress:
    """Progress over `total` items of which `first` were done before (a restart), on rank 0
    (`on`): a bar on a terminal, else a line per `done` call at most every HEARTBEAT_S seconds
    (and the last). The rate counts the items done in this process only."""

    def __init__(self, name: str, total: int, first: int, on: bool, unit: str = "problems"):
        self.name, self.total, self.n, self.on, self.unit = name, total, first, on, unit
        self.first, self.kept, self.t0, self.said, self.bar = first, 0, time.perf_counter(), 0.0, None
        if on and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=first, desc=name, unit=unit[:-1] if unit.endswith("s") else unit)

    def rate(self) -> str:
        """Items per minute in this process, and the time left at that rate."""
        took, n = time.perf_counter() - self.t0, self.n - self.first
        if not n or took <= 0:
            return ""
        per_min = 60 * n / took
        return f"{per_min:.3g} {self.unit}/min, {_clock(60 * (self.total - self.n) / per_min)} left"

    def done(self, n: int, kept: int = 0) -> None:
        """`n` more items done, `kept` of them kept."""
        self.n, self.kept = self.n + n, self.kept + kept
        if not self.on:
            return
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(f"{self.kept} kept, {self.rate()}")
        elif time.perf_counter() - self.said >= HEARTBEAT_S or self.n >= self.total:
            self.said = time.perf_counter()
            print(f"[{self.name}] {self.n}/{self.total} {self.unit} ({self.kept} kept in this process; {self.rate()})",
                  flush=True)

    def within(self, n: int):
        """The `progress` callback of sampling the next `n` items (`rollout.sample`: done of total
        sampler calls, fractional within one): a heartbeat at most every HEARTBEAT_S seconds, so a
        batch of many minutes never sits silent. None off rank 0."""
        if not self.on:
            return None

        def report(done: float, total: int) -> None:
            share = f"{100 * done / max(total, 1):.0f}% of its decode steps"
            if self.bar is not None:
                self.bar.set_postfix_str(f"{self.kept} kept, next {n}: {share}")
            elif 0 < done < total and time.perf_counter() - self.said >= HEARTBEAT_S:
                self.said = time.perf_counter()
                print(f"[{self.name}] {self.n}/{self.total} {self.unit}; the next {n}: {share}", flush=True)

        return report

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
