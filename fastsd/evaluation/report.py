"""`fastsd-report RUN_DIR`: the figures a run logged, computed again from its files.

    fastsd-report runs/default      # prints a summary; exit 1 where a logged figure disagrees

From `rollouts.jsonl`: each rollout's answer (its response parsed under the run's `format`) and
reward (that answer graded against the truth under the run's `grader`), and per step the mean
reward, the no-answer share, the usable (trained) share and the counters of `metrics.jsonl`.
From `evals.jsonl`: each sample's answer and verdict, and per evaluation avg@k, pass@k and
maj@k. Losses, gradient norms and timings are measurements of the run, not functions of its
files: they are shown, not checked. Exit codes: 0 all agree, 1 a figure disagrees (each named),
2 the run directory lacks what the check needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from ..tasks.format import parse_response, reward
from ..tasks.grading import make_grader
from .metrics import answer_hits, fmt_eval, score_samples

__all__ = ["check_run", "main"]

TOL = 1e-9  # logged means are sums over ranks divided once: equal up to float rounding


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _differs(logged, computed) -> bool:
    if isinstance(logged, (int, float)) and isinstance(computed, (int, float)):
        return abs(logged - computed) > TOL
    return logged != computed


def check_run(run_dir: str | Path) -> tuple[list[str], list[str]]:
    """(summary lines, disagreements) of the run in `run_dir`; ValueError when a file it needs
    is missing or predates these records."""
    run_dir = Path(run_dir)
    need = [run_dir / n for n in ("config.yaml", "metrics.jsonl", "rollouts.jsonl")]
    if missing := [p.name for p in need if not p.is_file()]:
        raise ValueError(f"{run_dir}: no {', '.join(missing)} (not a fastsd run directory?)")
    cfg = yaml.safe_load(need[0].read_text())
    fmt, condition = cfg.get("format", "steps"), cfg.get("condition")
    metrics, rollouts = _rows(need[1]), _rows(need[2])
    if rollouts and "truth" not in rollouts[0]:
        raise ValueError(f"{need[2]}: rows without 'truth' (a run logged before fastsd-report): nothing to recompute")
    bad: list[str] = []
    grader = make_grader(cfg.get("grader", "exact"))
    try:
        by_step = defaultdict(list)
        for r in rollouts:
            by_step[r["step"]].append(r)
        train_rows = [m for m in metrics if "reward" in m]
        for m in train_rows:
            bad += _check_step(m, by_step.get(m["step"], []), fmt, condition, grader)
        eval_rows = [m for m in metrics if "eval" in m]
        bad += _check_evals(run_dir, eval_rows, fmt, grader)
    finally:
        getattr(grader, "close", lambda: None)()
    summary = [f"{run_dir}: condition={condition}, {len(train_rows)} steps, {len(rollouts)} rollouts"]
    if train_rows:
        first, last = train_rows[0], train_rows[-1]
        summary.append(f"reward: step {first['step']} {first['reward']:.3f}, step {last['step']} {last['reward']:.3f}"
                       + (f"; loss {first['loss']:.4g} -> {last['loss']:.4g}" if last.get("loss") is not None
                          and first.get("loss") is not None else ""))
    summary += [f"eval at step {m['step']}{' (final)' if m.get('final') else ''}: {fmt_eval(m['eval'])}" for m in eval_rows]
    return summary, bad


def _check_step(m: dict, rolls: list[dict], fmt: str, condition, grader) -> list[str]:
    step, bad = m["step"], []
    if not rolls:
        return [f"step {step}: metrics.jsonl has the step, rollouts.jsonl no rollout of it"]
    rewards, no_answer = [], 0
    for i, r in enumerate(rolls):
        parsed = parse_response(r["response"], fmt)
        if parsed.answer != r["answer"]:
            bad.append(f"step {step}, rollout {i}: answer logged {r['answer']!r}, parsed {parsed.answer!r}")
        value = reward(parsed, str(r["truth"]), grader)
        if value != r["reward"]:
            bad.append(f"step {step}, rollout {i}: reward logged {r['reward']}, graded {value}")
        rewards.append(value)
        no_answer += parsed.answer is None
    n = len(rolls)
    computed = {"reward": sum(rewards) / n, "no_answer": no_answer / n, "usable": sum(r["trained"] for r in rolls) / n}
    if condition == "critique" and "critique_failed" in m:
        computed["critique_failed"] = sum("critique_error" in r for r in rolls)
    if condition == "grpo" and "zero_variance_rollouts" in m:
        computed["zero_variance_rollouts"] = sum(not r["trained"] for r in rolls)
    bad += [f"step {step}: {k} logged {m.get(k)}, from rollouts.jsonl {v}" for k, v in computed.items() if _differs(m.get(k), v)]
    return bad


def _check_evals(run_dir: Path, eval_rows: list[dict], fmt: str, grader) -> list[str]:
    if not eval_rows:
        return []
    path = run_dir / "evals.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: missing, while metrics.jsonl holds {len(eval_rows)} evaluations")
    samples = defaultdict(list)
    for r in _rows(path):
        samples[(r["step"], bool(r.get("final")))].append(r)
    bad = []
    for m in eval_rows:
        where = f"eval at step {m['step']}{' (final)' if m.get('final') else ''}"
        rows = samples.get((m["step"], bool(m.get("final"))))
        if not rows:
            bad.append(f"{where}: no samples in evals.jsonl")
            continue
        answers = []
        for q, r in enumerate(rows):
            parsed = [parse_response(text, fmt).answer for text in r["responses"]]
            verdicts = answer_hits(parsed, r["truth"], grader)
            if parsed != r["answers"] or verdicts != r["correct"]:
                bad.append(f"{where}, question {q}: answers or verdicts differ from the responses'")
            answers.append(parsed)
        computed = score_samples(answers, [str(r["truth"]) for r in rows], grader)
        bad += [f"{where}: {k} logged {m['eval'].get(k)}, from evals.jsonl {v}"
                for k, v in computed.items() if _differs(m["eval"].get(k), v)]
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastsd-report", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a fastsd-train run directory (run_dir)")
    args = parser.parse_args(argv)
    try:
        summary, bad = check_run(args.run_dir)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"fastsd-report: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary))
    if bad:
        print(f"fastsd-report: {len(bad)} logged figures disagree with their files:", file=sys.stderr)
        print("\n".join(f"  {b}" for b in bad), file=sys.stderr)
        return 1
    print("every recomputable figure agrees with the files it came from")
    return 0


if __name__ == "__main__":
    sys.exit(main())
