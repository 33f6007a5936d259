"""The run directory: config.yaml, metrics.jsonl, rollouts.jsonl made to agree with the run
about to start (fresh or resumed), the run's log lines (progress: `fastsd.run.progress`), and what a Ctrl-C
leaves behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

import yaml

from ..config import TrainConfig, to_dict, to_yaml
from ..feedback.registry import get_condition
from ..model.dist import Dist
from . import checkpoint as ckpt
from .progress import Progress
from .trackers import Trackers

__all__ = ["StoppedAfterStep", "flat_config", "LOGS", "RunLog", "prepare_run_dir", "rollout_rows", "step_row", "uninterrupted", "interrupted"]


class RunLog:
    """metrics.jsonl, rollouts.jsonl, evals.jsonl, log lines and progress (`fastsd.run.progress`)."""

    def __init__(self, cfg: TrainConfig, d: Dist, first_step: int, trackers: Trackers | None = None):
        self.cfg, self.on = cfg, d.main
        self.dir = cfg.run_dir
        self.shown = Progress(cfg, d.main, first_step)
        self.say, self.eval_progress, self.evaluated = self.shown.write, self.shown.eval_progress, self.shown.evaluated
        self.progress = self.shown.step
        self.trackers = trackers or Trackers([])  # log.report_to: every metrics row goes to them too
        self.trackers.begin(first_step)

    def close(self) -> None:
        self.shown.close()
        self.trackers.close()

    def metrics(self, row: dict, samples: list[dict] | None = None) -> None:
        """A row of metrics.jsonl; with the `samples` of the evaluation in it, evals.jsonl first."""
        if not self.on:
            return
        if samples is not None:
            self._evals(row, samples)
        self._append("metrics.jsonl", [row])
        self.trackers.log(row, samples)

    def rollouts(self, step: int, rows: list[dict]) -> None:
        if not self.on:
            return
        self._append("rollouts.jsonl", [{"step": step, **r} for r in rows])

    def _append(self, name: str, rows: list[dict]) -> None:
        """Rows appended to run_dir/name; a failed write (a full disk) names the file and what was kept."""
        path = f"{self.dir}/{name}"
        try:
            with open(path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        except OSError as e:
            from .lock import WriteFailed

            raise WriteFailed(self.dir, path, e) from e

    def _evals(self, row: dict, samples: list[dict]) -> None:
        """The samples of the evaluation in metrics row `row`, one line per question, marked with
        its step (and `final`) so that a resume cuts them back with it."""
        mark = {"step": row["step"], **({"final": True} if row.get("final") else {})}
        self._append("evals.jsonl", [{**mark, **r} for r in samples])


def step_row(cfg: TrainConfig, d: Dist, step: int, rolls: list, upd: dict, lr: float,
             times: list[float]) -> tuple[dict, str | None]:
    """The metrics row of optimizer step `step` (summed over ranks), and the line to log about its
    failed critiques (None when none failed). `times`: perf_counter readings at the start and
    after rollout, feedback and update."""
    t0, t1, t2, t3 = times
    failed = Counter(r.critique_error for r in rolls if r.critique_error)
    cond = get_condition(cfg)
    counts = cond.counters(rolls)  # the condition's own figures: (numerator, denominator or None)
    flat = [x for num, den in counts.values() for x in ((num,) if den is None else (num, den))]
    # Counts come back as floats from more than one process (a float64 all-reduce): logged as ints.
    n_roll, reward_sum, usable, no_answer, resp_tokens, n_failed, *summed = d.all_sum(
        len(rolls), sum(r.reward for r in rolls), sum(r.trained or getattr(r, "pg", False) for r in rolls),
        sum(r.parsed.answer is None for r in rolls), sum(len(r.response) for r in rolls), sum(failed.values()), *flat)
    n = max(n_roll, 1)
    row = {"step": step, "loss": upd["divergence"], "reward": reward_sum / n, "usable": usable / n,
           "no_answer": no_answer / n, "gap": upd["gap"], "grad_norm": upd["grad_norm"], "lr": lr,
           "tok_s": resp_tokens / (t3 - t0), "time_rollout": t1 - t0, "time_feedback": t2 - t1, "time_update": t3 - t2}
    for name, (_, den) in counts.items():
        num = summed.pop(0)
        row[name] = int(num) if den is None else num / max(summed.pop(0), 1.0)
    row["entropy"] = upd.get("entropy")  # the student's mean per-token entropy
    if upd.get("is_clipped") is not None:  # loss.is_clip: share of tokens whose weight the clip cut
        row["is_clipped"] = upd["is_clipped"]
    said = None
    n_failed = int(n_failed)
    if cond.uses_critic() and n_failed:
        why = ", ".join(f"{k} {reason}" for reason, k in failed.most_common(3))
        said = (f"[fastsd] step {step}: {n_failed} of {n_roll:.0f} critiques failed, "
                f"those rollouts get no loss (rank {d.rank}: {why or 'none'})")
    return row, said


@contextlib.contextmanager
def uninterrupted():
    """Hold a Ctrl-C (SIGINT) back until the block is done, so that what it writes (a step's log
    rows, a checkpoint) is written whole; then raise the KeyboardInterrupt. Outside the main
    thread, where Python handles no signals, a plain block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []

    def hold(signum, frame):
        if not caught and os.environ.get("RANK", "0") == "0":
            print("[fastsd] Ctrl-C: stopping once this step's logs and checkpoint are written", file=sys.stderr, flush=True)
        caught.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise StoppedAfterStep


class StoppedAfterStep(KeyboardInterrupt):
    """A Ctrl-C held back by `uninterrupted`, raised once the step's logs (and its checkpoint, if
    one was due) were written."""


def interrupted(cfg: TrainConfig, after_step: bool = False) -> str:
    """What to tell a user whose Ctrl-C stopped the run: what became of the step in progress,
    where the last checkpoint is, and how to go on. `after_step`: the Ctrl-C came while a step
    was being written, and the step was written whole (`StoppedAfterStep`)."""
    last = ckpt.latest_checkpoint(cfg.run_dir)
    head = ("[fastsd] stopped by Ctrl-C once the step's logs (and its checkpoint, if one was due) were written."
            if after_step else "[fastsd] stopped by Ctrl-C: the step in progress was abandoned (nothing of it was written).")
    if last is None:
        return (f"{head}\n[fastsd] no checkpoint in {cfg.run_dir} yet (checkpoint.every={cfg.checkpoint.every}"
                f"{': only the last step saves one' if not cfg.checkpoint.every else ''}); "
                "running the same command again starts the run afresh.")
    again = ("running the same command again resumes from it" if cfg.resume == "auto" else
             f"run the command again with resume=auto (not resume={cfg.resume}) to resume from it")
    return f"{head}\n[fastsd] last checkpoint: {last}; {again}."


def rollout_rows(rolls: list, tok) -> list[dict]:
    """One row per rollout; `prompt` and `teacher_prompt` are what each side read before the
    response, decoded from the ids the model saw (chat template and special tokens included);
    `response` is the text the answer was parsed from; the `*_ids` are the token ids as trained;
    `truth` and `answer` are what the reward compared."""
    return [{"question": r.example.question, "truth": r.example.answer, "prompt": tok.decode(r.prompt),
             "response": tok.decode(r.response, skip_special_tokens=True), "answer": r.parsed.answer,
             "reward": r.reward, "context": r.context,
             "teacher_prompt": None if r.teacher_prompt is None else tok.decode(r.teacher_prompt),
             "trained": r.trained, **({"critique_error": r.critique_error} if r.critique_error else {}),
             **({"notes": r.notes} if r.notes else {}),
             "prompt_ids": list(r.prompt), "response_ids": list(r.response),
             "teacher_prompt_ids": None if r.teacher_prompt is None else list(r.teacher_prompt)} for r in rolls]


LOGS = ("metrics.jsonl", "rollouts.jsonl", "evals.jsonl")


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A config tree (`to_dict`, or config.yaml read back) as {dotted key: value}."""
    out = {}
    for k, v in tree.items():
        out.update(flat_config(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _aside(path: Path, name: str) -> Path:
    """run_dir/name, or name.1, name.2, ...: the first that does not exist (nothing is overwritten)."""
    free = path.parent / name
    i = 0
    while free.exists():
        i += 1
        free = path.parent / f"{name}.{i}"
    os.replace(path, free)
    return free


def prepare_run_dir(cfg: TrainConfig, resume: Path | None, step: int, damaged: list = ()) -> list[str]:
    """Make run_dir agree with the run about to start (rank 0 only); returns what it did, to log.

    Resuming at `step`: rows the logs hold for later steps (and the final evaluation), which the
    run will write again, are cut. Starting afresh: earlier logs and config are moved to *.old. A
    config that differs from the saved one is saved; the old one is kept as
    config.before_step_N.yaml. `damaged`: (checkpoint, why) that resume=auto passed over, moved
    aside to *.damaged (out of the way of resume and pruning; never deleted)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    said = [f"checkpoint {path.name} is damaged ({why}): moved to {_aside(path, path.name + '.damaged').name}, "
            f"resumed from the one before it" for path, why in damaged]
    saved = run_dir / "config.yaml"
    if resume is None:
        for path in (*(run_dir / name for name in LOGS), saved):
            if path.exists():
                said.append(f"no checkpoint to resume: the earlier {path.name} moved to "
                            f"{_aside(path, path.name + '.old').name}")
        saved.write_text(to_yaml(cfg))
        return said
    for name in LOGS:
        path = run_dir / name
        if not path.exists():
            continue
        keep, cut, damaged = [], 0, []
        with open(path, errors="surrogateescape") as f:
            for number, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):  # torn by a kill mid-write, or garbled
                    row = None
                if not isinstance(row, dict):
                    damaged.append(json.dumps({"line": number, "text": line}) + "\n")
                elif row.get("step", 0) <= step and not row.get("final"):
                    keep.append(line)
                else:
                    cut += 1
        if damaged:  # kept beside, with their line numbers: never dropped in silence
            with open(run_dir / f"{name}.damaged", "a") as f:
                f.writelines(damaged)
            lines = ", ".join(str(json.loads(d)["line"]) for d in damaged[:10]) + (", ..." if len(damaged) > 10 else "")
            said.append(f"{name}: {len(damaged)} damaged line(s) (line {lines}: not a JSON object) moved to "
                        f"{name}.damaged with their line numbers; the rows they held are not written again")
        if cut or damaged:
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(keep), errors="surrogateescape")
            os.replace(tmp, path)
        if cut:
            said.append(f"{name}: cut back to step {step} ({cut} rows of later steps, written again as the run goes on)")
    if saved.exists():
        try:
            data = yaml.safe_load(saved.read_text())
        except yaml.YAMLError:
            data = None
        old = flat_config(data) if isinstance(data, dict) else {"config.yaml": "unreadable"}
        new = flat_config(to_dict(cfg))
        changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k) and k not in ("resume", "run_dir")]  # how, not what
        if changed:
            kept = _aside(saved, f"config.before_step_{step}.yaml")
            said.append(f"config changed since the checkpoint ({'; '.join(changed)}); the earlier one is {kept.name}")
    saved.write_text(to_yaml(cfg))
    return said
