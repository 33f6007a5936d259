"""The run directory: config.yaml, metrics.jsonl, rollouts.jsonl made to agree with the run
about to start (fresh or resumed), and the run's log lines and progress bar."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from .config import TrainConfig, to_dict, to_yaml
from .dist import Dist

__all__ = ["LOGS", "RunLog", "prepare_run_dir", "rollout_rows"]


class RunLog:
    """metrics.jsonl, rollouts.jsonl, and a progress bar (terminal) or heartbeat lines."""

    def __init__(self, cfg: TrainConfig, d: Dist, first_step: int):
        self.cfg, self.on = cfg, d.main
        self.dir = cfg.run_dir
        self.bar = None
        if self.on and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=first_step, desc=f"fastsd {cfg.condition}", unit="step")

    def metrics(self, row: dict) -> None:
        if not self.on:
            return
        with open(f"{self.dir}/metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def rollouts(self, step: int, rows: list[dict]) -> None:
        if not self.on:
            return
        with open(f"{self.dir}/rollouts.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")

    def progress(self, step: int, row: dict) -> None:
        if not self.on:
            return
        short = {k: row[k] for k in ("loss", "reward", "usable", "tok_s") if row.get(k) is not None}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()})
        elif step % self.cfg.log_every == 0 or step == self.cfg.steps:
            print(f"[fastsd] step {step}/{self.cfg.steps} " + " ".join(f"{k}={v:.4g}" for k, v in short.items()), flush=True)

    def say(self, text: str) -> None:
        if self.on:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def rollout_rows(rolls: list, tok) -> list[dict]:
    """One row per rollout; `prompt` and `teacher_prompt` are what each side read before the
    response, decoded from the ids the model saw (chat template and special tokens included)."""
    return [{"question": r.example.question, "prompt": tok.decode(r.prompt),
             "response": tok.decode(r.response, skip_special_tokens=True), "reward": r.reward,
             "context": r.context, "teacher_prompt": None if r.teacher_prompt is None else tok.decode(r.teacher_prompt),
             "trained": r.trained, **({"critique_error": r.critique_error} if r.critique_error else {})} for r in rolls]


LOGS = ("metrics.jsonl", "rollouts.jsonl")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
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


def prepare_run_dir(cfg: TrainConfig, resume: Path | None, step: int) -> list[str]:
    """Make run_dir agree with the run about to start (rank 0 only); returns what it did, to log.

    Resuming at `step`: rows the logs hold for later steps (and the final evaluation), which the
    run will write again, are cut. Starting afresh: earlier logs and config are moved to *.old. A
    config that differs from the saved one is saved; the old one is kept as
    config.before_step_N.yaml."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    said = []
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
        keep, cut = [], 0
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # torn by a kill mid-write
                    row = None
                if isinstance(row, dict) and row.get("step", 0) <= step and not row.get("final"):
                    keep.append(line)
                else:
                    cut += 1
        if cut:
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)
            said.append(f"{name}: cut back to step {step} ({cut} rows, written again as the run goes on)")
    if saved.exists():
        try:
            data = yaml.safe_load(saved.read_text())
        except yaml.YAMLError:
            data = None
        old = _flat(data) if isinstance(data, dict) else {"config.yaml": "unreadable"}
        new = _flat(to_dict(cfg))
        changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k) and k not in ("resume", "run_dir")]  # how, not what
        if changed:
            kept = _aside(saved, f"config.before_step_{step}.yaml")
            said.append(f"config changed since the checkpoint ({'; '.join(changed)}); the earlier one is {kept.name}")
    saved.write_text(to_yaml(cfg))
    return said
