"""Metrics over k sampled answers per question: avg@k, pass@k, maj@k.

An answer is the parsed final answer of one sample (`format.parse_response(...).answer`), None
when the sample has none. A sample is correct when the grader (`fastsd.tasks.grading`, config key
`grader`) says its answer equals the ground truth, as in `format.reward`; with no grader, when it
equals it after stripping surrounding whitespace.

- avg@k: mean accuracy over all samples of all questions;
- pass@k: share of questions with at least one correct sample;
- maj@k: share of questions whose majority-vote answer is correct. The vote counts the non-None
  answers by equivalence class under the grader (`0.75`, `3/4` and `\\frac{3}{4}` are one vote
  each for the same class under grader=math): each answer, in sample order, joins the first class
  whose first answer it equals, else starts a new class. A class is right when its first answer
  is. A question with no answer at all counts as wrong. A tie goes to the class that occurs first
  in the question's sample list, so the result is deterministic.
"""

from __future__ import annotations

import torch

from .tasks.grading import ExactGrader, make_grader

__all__ = ["majority_vote", "score_samples", "evaluate", "fmt_eval"]


def majority_vote(answers: list[str | None], grader=None) -> str | None:
    """The first answer (stripped) of the largest equivalence class of non-None answers under
    `grader` (exact match when None); ties go to the class that occurs first."""
    grader = grader or ExactGrader()
    firsts: list[str] = []  # each class's first answer, in order of first occurrence
    counts: list[int] = []
    for a in answers:
        if a is None:
            continue
        a = a.strip()
        i = next((j for j, rep in enumerate(firsts) if a == rep or grader.equal(a, rep)), None)
        if i is None:
            firsts.append(a)
            counts.append(1)
        else:
            counts[i] += 1
    if not firsts:
        return None
    return firsts[counts.index(max(counts))]


def score_samples(answers: list[list[str | None]], truths: list[str], grader=None) -> dict:
    """avg@k, pass@k and maj@k (floats in [0, 1]) of `answers[i]` (k answers to question i)
    against `truths[i]` under `grader` (exact match when None), plus `k` and `questions`. Every
    question needs the same k >= 1."""
    if len(answers) != len(truths):
        raise ValueError(f"truths: expected one per question ({len(answers)}), got {len(truths)}")
    if not answers:
        raise ValueError("answers: no questions to score")
    k = len(answers[0])
    if k < 1 or any(len(a) != k for a in answers):
        raise ValueError(f"answers: expected the same number k >= 1 of samples per question, "
                         f"got {sorted({len(a) for a in answers})}")
    for sample in (a for row in answers for a in row):
        if sample is not None and not isinstance(sample, str):
            raise ValueError(f"answers: expected str or None per sample, got {sample!r}")
    grader = grader or ExactGrader()
    correct = passed = majority = 0
    for row, truth in zip(answers, truths):
        truth = str(truth).strip()
        hits = sum(grader.equal(a, truth) for a in row)
        correct += hits
        passed += hits > 0
        vote = majority_vote(row, grader)
        majority += vote is not None and grader.equal(vote, truth)
    n = len(answers)
    return {"avg@k": correct / (n * k), "pass@k": passed / n, "maj@k": majority / n, "k": k, "questions": n}


def evaluate(cfg, d, policy, tok, held) -> dict:
    """avg@k, pass@k, maj@k on the held-out questions. Every evaluation draws the same random
    numbers (its own seeded stream, so the training stream is untouched): evaluations of
    different checkpoints are a paired comparison, not two independent draws."""
    from .step import rollout

    mine = held[d.rank::d.world]
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 7919 * (d.rank + 1))
        rolls = rollout(cfg, d, policy, tok, mine, cfg.eval.k, cfg.eval.temperature)
    answers = [[r.parsed.answer for r in rolls[i * cfg.eval.k:(i + 1) * cfg.eval.k]] for i in range(len(mine))]
    pairs = [p for part in d.gather_objects(list(zip(answers, [ex.answer for ex in mine]))) for p in part]
    return score_samples([a for a, _ in pairs], [t for _, t in pairs], make_grader(cfg.grader))


def fmt_eval(m: dict) -> str:
    """One line: avg@k, pass@k, maj@k of an evaluation."""
    return " ".join(f"{k}={m[k]:.3f}" for k in ("avg@k", "pass@k", "maj@k") if k in m) + f" (k={m.get('k')}, {m.get('questions')} questions)"
