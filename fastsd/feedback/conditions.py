"""The step's feedback stage: what each rollout is trained on, by condition (grpo, reference, critique)."""

from __future__ import annotations

import torch

from .prompts import encode, teacher_text

__all__ = ["feedback"]


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
