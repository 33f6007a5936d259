"""Per-token advantage report: where does the teacher disagree with the student?

    python tools/advantage_report.py --out runs/advantage                  # shipped model, both conditions
    python tools/advantage_report.py --model runs/default/checkpoints/step_00000060/hf \\
        --rollouts runs/default/rollouts.jsonl --step 60 --condition critique
    (extra key=value arguments are fastsd-train overrides, e.g. critic=http critic.base_url=...)

For a checkpoint, one or more conditions with a teacher (critique, reference, peer, context, or a
user condition module.path:Class) and a set of rollouts (sampled now from the checkpoint on
`--questions` held-out questions at the rollout temperature, as many per question as the
conditions need, peer 2; or read from a run's rollouts.jsonl, a question's rollouts of a step
one group), computes A_t = log p_teacher(y_t | x, c, y<t) - log p_student(y_t | x, y<t)
for every response token, with the checkpoint as both student and teacher (as `teacher=initial`
is at step 0), and writes per condition:

    OUT/CONDITION.html   every rollout, each token coloured by A_t (red < 0 < green), steps boxed,
                         the first wrong step outlined in red, the teacher's context above it
    OUT/CONDITION.png    mean A_t per segment, and A_t along three wrong rollouts; every condition of
                         one run on the same y-scales, so that the plots compare side by side
    OUT/summary.json, OUT/summary.md   the figures of `fastsd.evaluation.advantage.aggregate` per condition

The first wrong step comes from the built-in critic, exact on the built-in task (rollouts of
questions it cannot parse count as "other"). Segments are defined in `fastsd.evaluation.advantage`.
"""

from __future__ import annotations

import argparse
import copy
import html
import json
import sys
import time
from pathlib import Path

import torch

from fastsd.config import load_config
from fastsd.evaluation.advantage import (
    SEGMENTS,
    aggregate,
    segments,
    token_advantages,
    token_spans,
    token_steps,
)
from fastsd.feedback import feedback
from fastsd.feedback.critic import ArithCritic
from fastsd.feedback.prompts import encode, student_prompt
from fastsd.feedback.registry import condition_class
from fastsd.model.dist import Dist
from fastsd.rollout import Rollout, rollout
from fastsd.run.build import build_critic, build_models
from fastsd.tasks import TASKS, arith
from fastsd.tasks.data import Example, load_data
from fastsd.tasks.format import parse_response, reward

CONDITIONS = ("critique", "reference")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin", help="checkpoint directory (HF format); builtin: the shipped model")
    ap.add_argument("--condition", nargs="+", default=list(CONDITIONS),
                    help="conditions with a teacher: registered (critique reference peer context) or module.path:Class")
    ap.add_argument("--questions", type=int, default=128, help="held-out questions to sample rollouts for")
    ap.add_argument("--rollouts", help="a run's rollouts.jsonl to analyse instead of sampling")
    ap.add_argument("--step", type=int, help="with --rollouts: only this step's rollouts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=40, help="rollouts drawn in the HTML page")
    ap.add_argument("--out", default="runs/advantage")
    ap.add_argument("overrides", nargs="*", help="fastsd-train key=value overrides")
    args = ap.parse_args(argv)
    for name in args.condition:
        try:
            if not condition_class(name, key="--condition").teacher:
                ap.error(f"--condition: {name} has no teacher, so no A_t")
        except ValueError as e:
            ap.error(str(e))
    if args.questions < 1:
        ap.error("--questions: must be >= 1")
    return args


def _example(question: str, known: dict[str, Example], task: str) -> Example:
    if question in known:
        return known[question]
    canon = arith.solve(question)  # ValueError for questions that are not the built-in task's
    return Example(question, str(canon[-1].result), arith.reference_solution(question, TASKS[task].reference))


def read_rollouts(path: str, step: int | None, cfg, tok) -> list[Rollout]:
    """Rollouts from a run's rollouts.jsonl: the token ids as trained where the run logged them,
    else (runs logged before) the prompt rendered again and the response text re-encoded."""
    train, held = load_data(cfg)
    known = {ex.question: ex for ex in train + held}
    out, groups = [], {}
    for line_no, line in enumerate(Path(path).read_text().splitlines(), start=1):
        row = json.loads(line)
        if step is not None and row.get("step") != step:
            continue
        try:
            ex = _example(row["question"], known, cfg.data.task)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}:{line_no}: cannot find the question's answer ({e})") from None
        parsed = parse_response(row["response"])
        prompt = row.get("prompt_ids") or encode(tok, student_prompt(ex.question, cfg.templates.student))
        response = row["response_ids"] if "response_ids" in row else encode(tok, row["response"])
        group = groups.setdefault((row.get("step"), ex.question), len(groups))  # a question's rollouts of a step
        out.append(Rollout(ex, prompt, response, parsed, reward(parsed, ex.answer), group))
    if not out:
        raise ValueError(f"--rollouts: no rollouts in {path}" + (f" at step {step}" if step is not None else ""))
    return out


CRITIC = ArithCritic()


def first_error(r: Rollout) -> int | None | str:
    try:
        return CRITIC.critique(r.example.question, r.example.answer, r.parsed.steps, r.parsed.answer).first_error
    except ValueError:
        return "unknown"


def _colour(a: float) -> str:
    x = max(-1.0, min(1.0, a / 4.0))
    return f"rgba(215,48,39,{abs(x):.2f})" if x < 0 else f"rgba(26,152,80,{abs(x):.2f})"


def render_html(condition: str, rows: list[dict], summary: dict) -> str:
    parts = [f"<!doctype html><meta charset=utf-8><title>fastsd A_t: {condition}</title><style>"
             "body{font:14px sans-serif;max-width:70em;margin:2em auto}"
             ".r{margin:1.2em 0;padding:.5em;border-top:1px solid #ccc}.ctx{color:#666;font-size:12px}"
             ".t{font-family:monospace;white-space:pre}.s{border:1px solid #999;padding:1px;margin:1px}"
             ".w{border:2px solid #d73027}</style>",
             f"<h1>A<sub>t</sub> = log p<sub>teacher</sub> - log p<sub>student</sub>, condition {condition}</h1>",
             "<p>Red: the teacher finds the token less likely than the student did; green: more likely "
             "(full colour at |A<sub>t</sub>| = 4). Boxes are steps; the first wrong step is outlined in red. "
             "Hover a token for its value.</p><pre>" + html.escape(json.dumps(summary, indent=1)) + "</pre>"]
    for row in rows:
        fe = row["first_error"]
        where = fe + 1 if isinstance(fe, int) else fe
        head = (f"<b>{html.escape(row['question'])}</b> = {html.escape(row['answer'])}; reward {row['reward']:.0f}; "
                f"first wrong step: {where}")
        nsteps = max(row["steps"], default=0) - ("<answer>" in "".join(row["tokens"]))  # the answer part is n + 1
        groups: list[tuple[int, list[str]]] = []  # (step number, token spans), consecutive tokens
        for text, a, seg, step in zip(row["tokens"], row["adv"], row["segments"], row["steps"]):
            if not groups or groups[-1][0] != step:
                groups.append((step, []))
            groups[-1][1].append(f"<span class=t style='background:{_colour(a)}' title='{html.escape(repr(text))} "
                                 f"A={a:.2f}'>{html.escape(text) or '&#8718;'}</span>")
        body = "".join(
            f"<span class='{'s w' if isinstance(fe, int) and step == fe + 1 else 's' if 0 < step <= nsteps else ''}'>"
            f"{''.join(t)}</span>" for step, t in groups)
        parts.append(f"<div class=r>{head}<div class=ctx>teacher context: {html.escape(row['context'] or '')}</div>"
                     f"{body}</div>")
    return "\n".join(parts)


def shown_wrong(rows: list[dict]) -> list[dict]:
    """The rollouts drawn token by token: the first three with a wrong step (the same rollouts in
    every condition, which all read the same rollouts in the same order)."""
    return [r for r in rows if "first_wrong" in r["segments"]][:3]


def y_limits(rows: dict[str, list[dict]], summaries: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """y-limits shared by every condition's plot, so that they compare side by side: "segments"
    for the mean A_t by segment, "tokens" for A_t along the rollouts drawn."""
    seg = [summaries[c][f"mean_{s}"] or 0.0 for c in summaries for s in SEGMENTS if s != "other"]
    tok = [a for c in rows for r in shown_wrong(rows[c]) for a in r["adv"]]

    def padded(vals: list[float]) -> tuple[float, float]:
        lo, hi = min([0.0, *vals]), max([0.0, *vals])
        pad = 0.15 * (hi - lo) or 0.1
        return lo - pad, hi + pad

    return {"segments": padded(seg), "tokens": padded(tok)}


def render_png(condition: str, rows: list[dict], summary: dict, path: Path, limits: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrong = shown_wrong(rows)
    width = max(10.0, 0.15 * max((len(r["adv"]) for r in wrong), default=0))  # ~0.15 inch per token label
    fig, axes = plt.subplots(1 + len(wrong), 1, figsize=(width, 1.0 + 2.6 * (1 + len(wrong))), dpi=100, squeeze=False)
    segs = [s for s in SEGMENTS if s != "other"]
    vals = [summary[f"mean_{s}"] or 0.0 for s in segs]
    ax = axes[0][0]
    bars = ax.bar(segs, vals, color=["#4575b4", "#d73027", "#fdae61", "#1a9850"])
    ax.bar_label(bars, labels=[f"{v:+.3f}" for v in vals], fontsize=11, padding=2)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylim(*limits["segments"])
    ax.set_ylabel("mean A_t", fontsize=11)
    ax.tick_params(labelsize=11)
    ax.set_title(f"condition {condition}: mean A_t by segment ({sum(summary[f'tokens_{s}'] for s in SEGMENTS)} tokens; "
                 "same y-scale in every condition's plot)", fontsize=12)
    for ax, r in zip((a[0] for a in axes[1:]), wrong):
        xs = range(len(r["adv"]))
        ax.bar(xs, r["adv"], color=["#d73027" if s == "first_wrong" else "#777" for s in r["segments"]])
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(*limits["tokens"])
        ax.set_xlim(-0.7, len(r["adv"]) - 0.3)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([t if t.strip() else "·" for t in r["tokens"]], fontsize=10, family="monospace")
        ax.tick_params(axis="y", labelsize=10)
        ax.set_title(f"{r['question']}: A_t per response token (first wrong step {r['first_error'] + 1}, red)", fontsize=11)
        ax.set_ylabel("A_t", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = [f"model.path={args.model}", f"seed={args.seed}", f"data.eval_size={args.questions}", "teacher=current",
            f"run_dir={out}", *args.overrides]
    cfg = load_config(overrides=[*base, "condition=critique"])
    d = Dist()
    torch.manual_seed(args.seed)
    policy, _, tok = build_models(cfg, d)
    if args.rollouts:
        rolls = read_rollouts(args.rollouts, args.step, cfg, tok)
    else:
        _, held = load_data(cfg)  # per question as many rollouts as a condition needs (peer: 2 or more)
        k = max(condition_class(c).min_group_size for c in args.condition)
        rolls = rollout(cfg, d, policy, tok, held, k, cfg.rollout.temperature)
    errors = [first_error(r) for r in rolls]
    right = sum(r.reward == 1 for r in rolls)
    print(f"[advantage] {len(rolls)} rollouts, {right} with the right final answer (reward 1; some of them "
          "have a wrong step on the way, see the counts below)", flush=True)
    summaries, all_rows = {}, {}
    for condition in args.condition:
        ccfg = load_config(overrides=[*base, f"condition={condition}"])
        rs = copy.deepcopy(rolls)
        feedback(ccfg, tok, rs, build_critic(ccfg, d))
        keep = [i for i, r in enumerate(rs) if r.teacher_prompt is not None and r.response]
        adv = token_advantages(policy, policy, tok.pad_token_id, [rs[i].prompt for i in keep],
                               [rs[i].teacher_prompt for i in keep], [rs[i].response for i in keep])
        rows, labels = [], []
        for i, a in zip(keep, adv):
            r, fe = rs[i], errors[i]
            text = tok.decode(r.response, skip_special_tokens=True)
            spans = token_spans(tok, r.response)
            lab = ["other"] * len(spans) if fe == "unknown" else segments(text, spans, fe, r.reward == 1)
            step_of = token_steps(text, spans)
            labels.append(lab)
            rows.append({"question": r.example.question, "answer": r.example.answer, "reward": r.reward,
                         "first_error": fe, "context": r.context, "tokens": [text[s0:s1] for s0, s1 in spans],
                         "adv": [round(x, 4) for x in a.tolist()], "segments": lab, "steps": step_of})
        summary = aggregate(adv, labels)
        summary["rollouts_without_context"] = len(rs) - len(keep)
        summary["rollouts_wrong_step_right_answer"] = sum(
            r["reward"] == 1 and any(s in ("before", "first_wrong") for s in r["segments"]) for r in rows)
        summaries[condition], all_rows[condition] = summary, rows
        shown = sorted(rows, key=lambda r: (r["first_error"] in (None, "unknown"), str(r["question"])))[: args.show]
        (out / f"{condition}.html").write_text(render_html(condition, shown, summary), encoding="utf-8")
        with open(out / f"{condition}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    limits = y_limits(all_rows, summaries)
    for condition, rows in all_rows.items():
        render_png(condition, rows, summaries[condition], out / f"{condition}.png", limits)
    (out / "summary.json").write_text(json.dumps(summaries, indent=1))
    md = summary_table(summaries)
    (out / "summary.md").write_text(md)
    print(md, end="")
    print(f"[advantage] wrote {out}/ ({time.perf_counter() - t0:.0f} s)")
    return 0


def summary_table(summaries: dict) -> str:
    keys = [("mean_before", "mean A_t, steps before the first wrong one"),
            ("mean_first_wrong", "mean A_t, first wrong step"),
            ("mean_after", "mean A_t, after the first wrong step"),
            ("first_wrong_abs_share", "share of |A_t| on the first wrong step (wrong rollouts)"),
            ("mean_correct", "mean A_t, fully correct rollouts"),
            ("correct_negative_share", "share of all negative A_t on fully correct rollouts")]
    conds = list(summaries)
    lines = [f"| figure | {' | '.join(conds)} |", "|---|" + "---|" * len(conds)]
    for key, name in keys:
        cells = ["-" if summaries[c][key] is None else f"{summaries[c][key]:+.3f}" if key.startswith("mean")
                 else f"{summaries[c][key]:.3f}" for c in conds]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    n = summaries[conds[0]]
    lucky = n.get("rollouts_wrong_step_right_answer", 0)
    lines.append(f"\nRollouts: {n['rollouts_correct']} fully correct (the right answer, every step right), "
                 f"{n['rollouts_wrong_step']} with a wrong step ({lucky} of them still end in the right answer, so "
                 f"{n['rollouts_correct'] + lucky} earn reward 1), {n['rollouts_other']} other (no wrong step but no "
                 "right answer: cut off or the answer miscopied, or a question the built-in critic cannot read).\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
