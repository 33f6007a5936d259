"""Metrics over k sampled answers per question: avg@k, pass@k, maj@k.

An answer is the parsed final answer of one sample (`format.parse_response(...).answer`), None
when the sample has none. A sample is correct when its answer equals the ground truth after
stripping surrounding whitespace, as in `format.reward`.

- avg@k: mean accuracy over all samples of all questions;
- pass@k: share of questions with at least one correct sample;
- maj@k: share of questions whose majority-vote answer is correct. The vote counts the non-None
  answers (stripped); a question with no answer at all counts as wrong. A tie goes to the tied
  answer that occurs first in the question's sample list, so the result is deterministic.
"""

from __future__ import annotations

from collections import Counter

import torch

__all__ = ["majority_vote", "score_samples", "evaluate", "fmt_eval"]


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent non-None answer (stripped); ties go to the earliest first occurrence."""
    counts = Counter(a.strip() for a in answers if a is not None)  # insertion order = first occurrence
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a, c in counts.items() if c == top)


def score_samples(answers: list[list[str | None]], truths: list[str]) -> dict:
    """avg@k, pass@k and maj@k (floats in [0, 1]) of `answers[i]` (k answers to question i)
    against `truths[i]`, plus `k` and `questions`. Every question needs the same k >= 1."""
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
    correct = passed = majority = 0
    for row, truth in zip(answers, truths):
        truth = str(truth).strip()
        hits = sum(a is not None and a.strip() == truth for a in row)
        correct += hits
        passed += hits > 0
        majority += majority_vote(row) == truth
    n = len(answers)
    return {"avg@k": correct / (n * k), "pass@k": passed / n, "maj@k": majority / n, "k": k, "questions": n}


def evaluate(cfg, d, policy, tok, held, progress=None) -> dict:
    """avg@k, pass@k, maj@k on the held-out questions. Every evaluation draws the same random
    numbers (its own seeded stream, so the training stream is untouched): evaluations of
    different checkpoints are a paired comparison, not two independent draws. `progress` is
    called as progress(batches_done, batches) as the samples are drawn (`rollout.sample`)."""
    from .step import rollout

    mine = held[d.rank::d.world]
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 7919 * (d.rank + 1))
        rolls = rollout(cfg, d, policy, tok, mine, cfg.eval.k, cfg.eval.temperature, progress=progress)
    answers = [[r.parsed.answer for r in rolls[i * cfg.eval.k:(i + 1) * cfg.eval.k]] for i in range(len(mine))]
    pairs = [p for part in d.gather_objects(list(zip(answers, [ex.answer for ex in mine]))) for p in part]
    return score_samples([a for a, _ in pairs], [t for _, t in pairs])


def fmt_eval(m: dict) -> str:
    """One line: avg@k, pass@k, maj@k of an evaluation."""
    return " ".join(f"{k}={m[k]:.3f}" for k in ("avg@k", "pass@k", "maj@k") if k in m) + f" (k={m.get('k')}, {m.get('questions')} questions)"
