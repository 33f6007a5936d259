"""Metrics over k sampled answers per question: avg@k, pass@k, maj@k.

An answer is the parsed final answer of one sample (`format.parse_response(...).answer`), None
when the sample has none. A sample is correct when the grader (`fastsd.tasks.grading`, config key
`grader`) says its answer equals the ground truth, as in `format.reward`; with no grader, when it
equals it after stripping surrounding whitespace.

- avg@k: mean accuracy over all samples of all questions;
- pass@k: share of questions with at least one correct sample;
- maj@k: share of questions whose majority-vote answer is correct. The vote counts the non-None
  answers by equivalence class under the grader, not by string (`0.75`, `3/4` and `\\frac{3}{4}`
  are three votes for one class under grader=math). The correct answers are one class; the others
  are grouped in sample order, each joining the first class whose first answer it equals, else
  starting a new one. The question counts as right when the correct class is the largest; a tie
  goes to the class that occurs first in the question's sample list, so the result is
  deterministic. A question with no answer at all counts as wrong. (Only the wrong answers are
  compared with each other, and only when they could outvote the right ones: grading stays
  about k calls per question.)
"""

from __future__ import annotations

import torch

from ..tasks.grading import ExactGrader, make_grader

__all__ = ["answer_hits", "majority_vote", "score_samples", "evaluate", "fmt_eval"]


def _classes(answers: list[str | None], grader) -> list[tuple[str, int, int]]:
    """(first answer, size, first position) of each class of the non-None `answers` (stripped),
    in order of first occurrence: each distinct answer joins the first class whose first answer
    it equals under `grader`, else starts one."""
    distinct: dict[str, list[int]] = {}  # answer -> [count, first position]; insertion ordered
    for pos, a in enumerate(answers):
        if a is not None:
            distinct.setdefault(a.strip(), [0, pos])[0] += 1
    classes: list[list] = []
    for a, (count, pos) in distinct.items():
        home = next((c for c in classes if grader.equal(a, c[0])), None)
        if home is None:
            classes.append([a, count, pos])
        else:
            home[1] += count
    return [tuple(c) for c in classes]


def majority_vote(answers: list[str | None], grader=None) -> str | None:
    """The first answer (stripped) of the largest equivalence class of non-None answers under
    `grader` (exact match when None); ties go to the class that occurs first."""
    classes = _classes(answers, grader or ExactGrader())
    if not classes:
        return None
    top = max(size for _, size, _ in classes)
    return next(a for a, size, _ in classes if size == top)


def _majority_right(row: list[str | None], hits: list[bool], grader) -> bool:
    """maj@k of one question (module docstring), given which samples are correct."""
    right = sum(hits)
    wrong = [a if not h else None for a, h in zip(row, hits)]
    if right == 0 or sum(a is not None for a in wrong) < right:  # no vote needed
        return right > 0
    first_right = hits.index(True)
    return all(size < right or (size == right and first_right < pos) for _, size, pos in _classes(wrong, grader))


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
    return _totals([_score_question(row, truth, grader) for row, truth in zip(answers, truths)], k)


def answer_hits(row: list[str | None], truth, grader) -> list[bool]:
    """Which of one question's sample answers are right."""
    truth = str(truth).strip()
    return [grader.equal(a, truth) for a in row]


def _score_question(row: list[str | None], truth, grader, hits: list[bool] | None = None) -> tuple[int, bool, bool]:
    """(correct samples, passed, majority right) of one question (`hits`: its `answer_hits`, if known)."""
    hits = answer_hits(row, truth, grader) if hits is None else hits
    return sum(hits), any(hits), _majority_right(row, hits, grader)


def _totals(scores: list[tuple[int, bool, bool]], k: int) -> dict:
    n = len(scores)
    return {"avg@k": sum(s[0] for s in scores) / (n * k), "pass@k": sum(s[1] for s in scores) / n,
            "maj@k": sum(s[2] for s in scores) / n, "k": k, "questions": n}


def evaluate(cfg, d, policy, tok, held, progress=None, samples: list | None = None) -> dict:
    """avg@k, pass@k, maj@k on the held-out questions. Every evaluation draws the same random
    numbers (its own seeded stream, so the training stream is untouched): evaluations of
    different checkpoints are a paired comparison, not two independent draws. Each rank grades
    its own questions; the per-question scores are gathered. `progress` is called as
    progress(batches_done, batches) as the samples are drawn (`rollout.sample`). `samples`, if
    given, is extended (on every rank) with one row per question: its truth, and each sample's
    response text, parsed answer and verdict, from which the metrics can be computed again."""
    from ..rollout import rollout

    mine = held[d.rank::d.world]
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 7919 * (d.rank + 1))
        rolls = rollout(cfg, d, policy, tok, mine, cfg.eval.k, cfg.eval.temperature, progress=progress,
                        batch_size=cfg.eval.batch_size)
    answers = [[r.parsed.answer for r in rolls[i * cfg.eval.k:(i + 1) * cfg.eval.k]] for i in range(len(mine))]
    grader = make_grader(cfg.grader)
    hits = [answer_hits(row, ex.answer, grader) for row, ex in zip(answers, mine)]
    scores = [_score_question(row, ex.answer, grader, h) for row, ex, h in zip(answers, mine, hits)]
    if samples is not None:
        k = cfg.eval.k
        rows = [{"question": ex.question, "truth": ex.answer,
                 "responses": [tok.decode(r.response, skip_special_tokens=True) for r in rolls[i * k:(i + 1) * k]],
                 "answers": answers[i], "correct": hits[i]} for i, ex in enumerate(mine)]
        samples.extend(r for part in d.gather_objects(rows) for r in part)
    return _totals([s for part in d.gather_objects(scores) for s in part], cfg.eval.k)


def fmt_eval(m: dict) -> str:
    """One line: avg@k, pass@k, maj@k of an evaluation."""
    return " ".join(f"{k}={m[k]:.3f}" for k in ("avg@k", "pass@k", "maj@k") if k in m) + f" (k={m.get('k')}, {m.get('questions')} questions)"
