"""The step's feedback stage: what each rollout is trained on, by condition (grpo, reference, critique)."""

from __future__ import annotations

from collections import Counter

import torch

from .prompts import encode, teacher_text

__all__ = ["feedback", "CriticFailed", "FailedSteps"]


def feedback(cfg, tok, rollouts, critic) -> None:
    """Fill in what each rollout is trained on: group advantages (grpo) or the teacher prompt.

    A rollout whose critique failed keeps `trained=False` and records `critique_error`."""
    if cfg.condition == "grpo":
        groups: dict[int, list] = {}
        for r in rollouts:
            groups.setdefault(r.group, []).append(r)
        for members in groups.values():
            rewards = torch.tensor([r.reward for r in members])
            std = rewards.std(unbiased=False)
            for r, a in zip(members, ((rewards - rewards.mean()) / (std + 1e-6)).tolist()):
                r.advantage, r.trained = a, bool(std > 0) and len(r.response) > 0
        return
    if cfg.condition == "critique":  # all at once: a remote critic answers them concurrently
        crits = critic.critique_batch([(r.example.question, r.example.answer, r.parsed.steps, r.parsed.answer,
                                        r.example.reference_solution) for r in rollouts])
    for i, r in enumerate(rollouts):
        q = r.example.question
        if cfg.condition == "reference":
            r.context = r.example.reference_solution
        else:
            if not crits[i].ok:
                r.critique_error = crits[i].error or "unknown"
                continue  # no usable context: no loss for this rollout (counted in the logs)
            r.context = crits[i].text
        # The teacher's own prompt; the student's sampled response ids follow it unchanged (batch.py).
        r.teacher_prompt = encode(tok, teacher_text(cfg.templates, tok, cfg.condition, q, r.context))
        r.trained = len(r.response) > 0


class CriticFailed(ValueError):
    """critic.max_failed_steps consecutive steps in which every critique failed: the run stops (exit 2)."""


class FailedSteps:
    """Counts consecutive steps in which every critique failed. It reads a step's metrics row,
    whose figures are summed over ranks, so that every rank comes to the same verdict."""

    def __init__(self, cfg):
        self.cfg, self.streak = cfg, 0

    def after(self, step: int, row: dict, rollouts) -> CriticFailed | None:
        """The error to stop with after optimizer step `step` (its `row` and this rank's `rollouts`),
        or None to go on."""
        limit, total = self.cfg.critic.max_failed_steps, self.cfg.questions_per_step * self.cfg.group_size
        if self.cfg.condition != "critique" or row.get("critique_failed", 0) < total:
            self.streak = 0
            return None
        self.streak += 1
        if not limit or self.streak < limit:
            return None
        why = Counter(r.critique_error for r in rollouts if r.critique_error)
        reasons = ", ".join(f"{n} {reason}" for reason, n in why.most_common(3)) or "none on this rank"
        return CriticFailed(f"critic: every critique failed in {self.streak} consecutive steps ({step - self.streak + 1} "
                            f"to {step}; critic.max_failed_steps={limit}), so the run stopped; the last step's reasons: "
                            f"{reasons}. Those steps trained nothing; a checkpoint of step {step} is saved: fix the "
                            "critic (docs/critic.md) and run the same command to go on")
