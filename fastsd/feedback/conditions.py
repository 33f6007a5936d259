"""The step's feedback stage: `feedback` (entry point) and the built-in conditions grpo, reference,
critique and context (peer: `fastsd.feedback.peer`); the interface is `fastsd.feedback.condition`."""

from __future__ import annotations

from collections import Counter

import torch

from .condition import Condition, by_group, register
from .prompts import CRITIQUE_PLACEHOLDER

__all__ = ["feedback", "group_advantages", "CriticFailed", "FailedSteps"]


def feedback(cfg, tok, rollouts, critic) -> None:
    """Fill in what each rollout is trained on, by `cfg.condition`: the teacher prompt, or group
    advantages (grpo). With loss.pg_weight > 0 a teacher condition's rollouts get their group
    advantages too (`Rollout.pg`: trained on them as well); at loss.pg_weight=1 the teacher has no
    weight and is not asked (the step is grpo's). A rollout whose critique failed keeps
    `trained=False` and records `critique_error`."""
    cond = cfg.feedback_condition()
    if not cond.teacher or cfg.loss.pg_weight < 1:
        cond.feedback(tok, rollouts, critic)
    if cond.teacher and cfg.loss.pg_weight > 0:
        for r, has_signal in zip(rollouts, group_advantages(rollouts)):
            r.pg = has_signal


def group_advantages(rollouts) -> list[bool]:
    """GRPO's advantage: each reward standardised within its group (sets `advantage`); per rollout,
    whether it carries a signal (its group's rewards differ and it has a response)."""
    signal = {}
    for members in by_group(rollouts).values():
        rewards = torch.tensor([r.reward for r in members])
        std = rewards.std(unbiased=False)
        for r, a in zip(members, ((rewards - rewards.mean()) / (std + 1e-6)).tolist()):
            r.advantage = a
            signal[id(r)] = bool(std > 0) and len(r.response) > 0
    return [signal[id(r)] for r in rollouts]


@register
class Grpo(Condition):
    """No teacher: the clipped policy gradient on the group advantages of a binary reward."""

    name = "grpo"
    teacher = False
    group_size = 8
    min_group_size = 2

    def feedback(self, tok, rollouts, critic) -> None:
        for r, has_signal in zip(rollouts, group_advantages(rollouts)):
            r.trained = r.pg = has_signal

    def counters(self, rollouts):
        return {"zero_variance_rollouts": (sum(not r.trained for r in rollouts), None)}


@register
class Reference(Condition):
    """The teacher reads the record's reference solution (data.fields.reference_solution)."""

    name = "reference"
    template_key = field = "reference"

    def context(self, r, group, critique):
        return r.example.reference_solution

    def example_context(self, example):
        return example.reference_solution

    def required_fields(self):
        return ("reference_solution",)

    def check(self):
        super().check()
        if not self.cfg.data.fields.reference_solution.strip():
            raise ValueError("data.fields.reference_solution: condition=reference needs a column of reference "
                             "solutions")


@register
class Critique(Condition):
    """The teacher reads the critic's step-aligned critique of this very rollout."""

    name = "critique"
    template_key = field = "critique"

    def uses_critic(self):
        return True

    def context(self, r, group, critique):
        return critique.text if critique.ok else None  # none: no loss for this rollout (counted in the logs)

    def example_context(self, example):
        return CRITIQUE_PLACEHOLDER

    def counters(self, rollouts):
        return {"critique_failed": (sum(bool(r.critique_error) for r in rollouts), None)}


@register
class Context(Condition):
    """The teacher reads a column of the record (data.fields.context) through templates.context: a
    demonstration, a hint or a precomputed rubric, with no code."""

    name = "context"
    template_key = "context"

    def keys(self):
        return (*super().keys(), "data.fields.context")

    def required_fields(self):
        return ("context",)

    def check(self):
        super().check()
        if not self.cfg.data.fields.context.strip():
            raise ValueError("data.fields.context: condition=context needs the column the teacher reads "
                             "(e.g. data.fields.context=hint)")
        if self.cfg.data.path == "builtin":
            raise ValueError("data.path: condition=context reads a column of the training file (data.fields.context); "
                             "the built-in task has none")

    def context(self, r, group, critique):
        return r.example.context

    def example_context(self, example):
        return example.context


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
