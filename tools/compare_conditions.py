"""The paper's comparison on the built-in task: grpo vs reference vs critique (or any registered
condition, or a user condition module.path:Class), several seeds.

    python tools/compare_conditions.py --out runs/compare            # 3 conditions x 3 seeds
    python tools/compare_conditions.py --conditions critique peer --dry-run   # each teacher's prompt; exit
    python tools/compare_conditions.py --hard-split --conditions grpo reference critique peer   # docs/hard-split.md
    python tools/compare_conditions.py --out runs/smoke --seeds 0 --steps 2 --eval-every 1 \\
        data.eval_size=4 eval.k=2                                    # extra args: fastsd-train overrides

Every run starts from the same checkpoint (`model.path`, the shipped warm-started tiny model by
default) with the same budget: `--steps` optimizer steps of `questions_per_step` questions.
Each condition samples its default group size per question (grpo and peer 8, the others 1)
unless rollout.group_size is given. Each run is a `fastsd-train`
process in OUT/CONDITION-seedS, checkpointed at every evaluation (so an interrupted comparison
resumes from its runs' last checkpoints; finished runs are kept), evaluated at step 0, every `--eval-every` steps and at the end (avg@k, pass@k,
maj@k on the held-out split). Then OUT/results.md (table: mean, standard deviation and range over
seeds, at the final step and at each run's best evaluation), OUT/results.json and
OUT/avg_vs_step.png (avg@k against step, the mean over seeds with a min-max band).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONDITIONS = ("grpo", "reference", "critique")
METRICS = ("avg@k", "pass@k", "maj@k")
# fastsd-select's output on the built-in task, fixed before the comparison ran on it (docs/hard-split.md)
HARD_SPLIT = Path(__file__).resolve().parents[1] / "bench" / "results" / "hard_split"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compare", help="directory for the runs and the results")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS),
                    help="registered conditions (grpo reference critique peer context) or module.path:Class")
    ap.add_argument("--dry-run", action="store_true",
                    help="print each condition's student and teacher prompt for the first training question; exit")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--eval-every", type=int, default=30, help="evaluate every N steps (and at 0 and the end)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each gets cpus / jobs threads)")
    ap.add_argument("--hard-split", action="store_true",
                    help=f"train and evaluate on the hard split ({HARD_SPLIT}/train.jsonl, test.jsonl; docs/hard-split.md)")
    ap.add_argument("overrides", nargs="*", help="fastsd-train key=value overrides for every run")
    args = ap.parse_args(argv)
    if args.hard_split:  # before the user's overrides, which may still change them
        args.overrides = [f"data={HARD_SPLIT}/train.jsonl", f"data.eval_path={HARD_SPLIT}/test.jsonl", *args.overrides]
    for item in args.overrides:
        if "=" not in item:
            ap.error(f"overrides: expected key=value, got {item!r}")
    if args.steps < 1 or args.eval_every < 1 or args.jobs < 1:
        ap.error("--steps, --eval-every and --jobs must be >= 1")
    from fastsd.feedback.registry import condition_class

    for name in args.conditions:
        try:
            condition_class(name, key="--conditions")
        except ValueError as e:
            ap.error(str(e))
    return args


def dry_run(args) -> str:
    """Each condition's prompts for the first training question, as `fastsd-train --dry-run` shows them."""
    from fastsd.config import load_config
    from fastsd.run.preflight import show_prompts

    return "".join(f"# condition={c}\n" + show_prompts(load_config(overrides=[*args.overrides, f"condition={c}"]))
                   for c in args.conditions)


def run_command(args, condition: str, seed: int) -> list[str]:
    run_dir = Path(args.out) / f"{condition}-seed{seed}"
    return [sys.executable, "-m", "fastsd.cli", f"condition={condition}", f"seed={seed}", f"steps={args.steps}",
            f"eval.every={args.eval_every}", f"checkpoint.every={args.eval_every}", f"run_dir={run_dir}",
            "log_every=1000000", *args.overrides]


def evals(run_dir: Path) -> list[tuple[int, dict]]:
    """(step, evaluation) pairs of a run, in step order (the last row per step wins)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    found = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "eval" in row:
            found[row["step"]] = row["eval"]
    return sorted(found.items())


def cost(run_dir: Path) -> tuple[int, float]:
    """(rollouts sampled per step, minutes of training steps: rollout + feedback + update)."""
    import yaml

    from fastsd.feedback.registry import condition_class

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    group = cfg["rollout"]["group_size"] or condition_class(cfg["condition"]).group_size
    rows = {}  # a resumed run repeats steps after its last checkpoint: the last row of a step counts
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "time_rollout" in row:
            rows[row["step"]] = row
    minutes = sum(r["time_rollout"] + r["time_feedback"] + r["time_update"] for r in rows.values()) / 60
    return cfg["questions_per_step"] * group, minutes


def no_signal(run_dir: Path, edge: int = 10) -> dict:
    """Share of a run's rollouts that gave no learning signal (1 - `usable` of each step: for grpo
    the rollouts in zero-variance groups, for peer those with no correct sibling and no fallback, for
    critique those without a valid critique): the mean over all steps, its first `edge` and last `edge`."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "usable" in row:
            rows[row["step"]] = 1.0 - row["usable"]
    shares = [rows[s] for s in sorted(rows)]
    if not shares:
        return {}
    return {"all": statistics.fmean(shares), "first": statistics.fmean(shares[:edge]),
            "last": statistics.fmean(shares[-edge:])}


def finished(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and any(json.loads(line).get("final") for line in path.read_text().splitlines())


def run_all(args) -> None:
    jobs = [(c, s) for s in args.seeds for c in args.conditions]
    todo = [(c, s) for c, s in jobs if not finished(Path(args.out) / f"{c}-seed{s}")]
    if len(todo) < len(jobs):
        print(f"[compare] {len(jobs) - len(todo)} of {len(jobs)} runs already finished in {args.out}", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done, t_start = 0, time.perf_counter()

    def one(job):
        condition, seed = job
        run_dir = Path(args.out) / f"{condition}-seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(run_dir / "stdout.log", "a") as log:
            rc = subprocess.call(run_command(args, condition, seed), stdout=log, stderr=subprocess.STDOUT, env=env)
        return condition, seed, rc, time.perf_counter() - t0

    with ThreadPoolExecutor(args.jobs) as pool:
        for condition, seed, rc, took in pool.map(one, todo):
            done += 1
            status = "done" if rc == 0 else f"FAILED (exit {rc}, see {args.out}/{condition}-seed{seed}/stdout.log)"
            print(f"[compare] {done}/{len(todo)} {condition} seed {seed} {status} in {took / 60:.1f} min "
                  f"({(time.perf_counter() - t_start) / 60:.1f} min so far)", flush=True)
            if rc != 0:
                raise SystemExit(1)


def summarise(args) -> dict:
    """Per condition: the eval curve per seed, and final / best statistics over seeds."""
    out = {}
    for c in args.conditions:
        curves = {s: evals(Path(args.out) / f"{c}-seed{s}") for s in args.seeds}
        finals = [curve[-1][1] for curve in curves.values() if curve]
        bests = [max(curve, key=lambda se: se[1]["avg@k"])[1] for curve in curves.values() if curve]
        firsts = [curve[0][1] for curve in curves.values() if curve]
        costs = [cost(Path(args.out) / f"{c}-seed{s}") for s, curve in curves.items() if curve]
        signal = [no_signal(Path(args.out) / f"{c}-seed{s}") for s, curve in curves.items() if curve]
        out[c] = {"curves": {str(s): [[step, e] for step, e in curve] for s, curve in curves.items()},
                  "no_signal": {k: [x[k] for x in signal if x] for k in ("all", "first", "last")},
                  "start": _stats(firsts), "final": _stats(finals), "best": _stats(bests),
                  "rollouts_per_step": costs[0][0] if costs else None,
                  "train_minutes": statistics.fmean(m for _, m in costs) if costs else None}
    return out


def _stats(rows: list[dict]) -> dict:
    res = {}
    for m in METRICS:
        xs = [r[m] for r in rows]
        if xs:
            res[m] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                      "min": min(xs), "max": max(xs), "n": len(xs)}
    return res


def table(summary: dict, k: int | None) -> str:
    ks = f"@{k}" if k else "@k"
    head = (f"| condition | when | {' | '.join(m.replace('@k', ks) for m in METRICS)} | rollouts/step | "
            f"train min/run | no-signal share (all; first, last 10 steps) |\n|---|---|---|---|---|---|---|---|\n")
    rows = []
    for c, s in summary.items():
        for when in ("start", "best", "final"):
            cells = [f"{s[when][m]['mean']:.3f} ± {s[when][m]['std']:.3f} ({s[when][m]['min']:.3f}-{s[when][m]['max']:.3f})"
                     if m in s[when] else "-" for m in METRICS]
            extra = [str(s["rollouts_per_step"]), f"{s['train_minutes']:.1f}", _shares(s.get("no_signal", {}))] \
                if when == "final" and s["train_minutes"] else ["", "", ""]
            rows.append(f"| {c} | {when} | {' | '.join(cells + extra)} |")
    return head + "\n".join(rows) + "\n"


def _shares(ns: dict) -> str:
    """The no-signal shares of a condition's runs: the range over seeds of each."""
    def rng(xs):
        return "-" if not xs else f"{min(xs):.2f}" if min(xs) == max(xs) else f"{min(xs):.2f}-{max(xs):.2f}"

    return f"{rng(ns.get('all', []))}; {rng(ns.get('first', []))}, {rng(ns.get('last', []))}"


def plot(summary: dict, path: Path, k: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), dpi=120, sharey=True)
    for c, s in summary.items():
        curves = [dict((step, e["avg@k"]) for step, e in curve) for curve in s["curves"].values() if curve]
        steps = sorted(set.intersection(*(set(cv) for cv in curves))) if curves else []
        if not steps:
            continue
        mean = [statistics.fmean(cv[st] for cv in curves) for st in steps]
        lo = [min(cv[st] for cv in curves) for st in steps]
        hi = [max(cv[st] for cv in curves) for st in steps]
        for ax, xs in ((axes[0], steps), (axes[1], [st * (s["rollouts_per_step"] or 0) for st in steps])):
            ax.plot(xs, mean, marker="o", label=f"{c} ({len(curves)} seeds)")
            ax.fill_between(xs, lo, hi, alpha=0.2)
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("rollouts sampled for training")
    axes[0].set_ylabel(f"avg@{k or 'k'} on held-out questions")
    fig.suptitle("fastsd built-in task: feedback conditions (mean over seeds, min-max band)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print(dry_run(args), end="")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_all(args)
    summary = summarise(args)
    first = next((e for s in summary.values() for cv in s["curves"].values() for _, e in cv), {})
    k = first.get("k")
    command = "python tools/compare_conditions.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"Command: `{command.strip()}`\n\n{table(summary, k)}\n"
            f"{len(args.seeds)} seeds; mean ± standard deviation (min-max) over seeds; {first.get('questions')} "
            f"held-out questions, k={k}; best: each run's best evaluation by avg@k.\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"command": command, "summary": summary}, indent=1))
    plot(summary, out / "avg_vs_step.png", k)
    print(text, end="")
    print(f"[compare] wrote {out}/results.md, results.json, avg_vs_step.png ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
