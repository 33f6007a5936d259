"""The condition interface: what each rollout's teacher reads, and the registry of conditions by name.

A condition is a class (subclass `Condition`) that says, for one step's rollouts of one process
(whole groups: every question's G rollouts are on the same process):

- `teacher`: whether a teacher runs at all (False: trained on the group advantages only, `grpo`);
- `context(r, group, critique)`: the text the teacher of rollout `r` reads after the question,
  through the condition's template (`template()`, with the field `field`), or None: no teacher for
  this rollout (it gets no distillation loss; counted as not usable);
- `group_size`: rollouts per question when `rollout.group_size=0`; `min_group_size`: the fewest it accepts;
- `uses_critic()`: whether the critic's critiques are computed (all of a step's at once) and passed in;
- `keys(cfg)`: which of the condition-specific config keys (`CONDITION_KEYS`) it reads: --dry-run
  marks the others "# ignored:";
- `counters(rollouts)`: what it logs in metrics.jsonl, as {name: (numerator, denominator)}, each
  summed over processes; a denominator of None logs the summed numerator as an int;
- `check()`: validation of the config before the model loads (a ValueError naming the key);
- `example_context(example)`: the context --dry-run and the preflight render for one training
  question (`example_text`: the whole teacher prompt).

`condition=NAME` picks a registered one (`register`); `condition=module.path:Class` imports a user
condition (docs/conditions.md), checked when the config loads (`fastsd.feedback.registry`). The interface leaves room for a
condition that needs more than one teacher context per rollout later: `feedback` is the one place
that turns contexts into teacher prompts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .prompts import check_template, encode, render_teacher

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..rollout import Rollout

__all__ = ["CONDITION_KEYS", "Condition", "by_group", "register"]

# Config keys (a dotted key or a section) only some conditions read; a condition's `keys` names its own.
CONDITION_KEYS = ("templates.reference", "templates.critique", "templates.context", "data.fields.context", "critic",
                  "peer")

_REGISTRY: dict[str, type[Condition]] = {}


class Condition:
    """One way of giving each rollout's teacher a context (see the module docstring). The default
    methods make a condition whose teacher reads `template` filled with {question} and {context}."""

    name: ClassVar[str] = ""
    teacher: ClassVar[bool] = True
    group_size: ClassVar[int] = 1
    min_group_size: ClassVar[int] = 1
    template_key: ClassVar[str | None] = None  # templates.<key> holds the template; None: `default_template`
    default_template: ClassVar[str] = "Q:{question}\nContext:{context}\n"
    field: ClassVar[str] = "context"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def template(self) -> str:
        """The teacher's template: fields {question} and {`field`}."""
        return getattr(self.cfg.templates, self.template_key) if self.template_key else self.default_template

    def uses_critic(self) -> bool:
        return False

    def keys(self) -> tuple[str, ...]:
        """Which of `CONDITION_KEYS` this condition reads (the critic's keys when it uses one)."""
        return (f"templates.{self.template_key}",) * bool(self.template_key) + ("critic",) * self.uses_critic()

    def check(self) -> None:
        """ValueError naming the key for a config this condition cannot run; before the model loads."""
        if self.teacher:
            check_template(f"templates.{self.template_key}" if self.template_key else "condition",
                           self.template(), ("question", self.field))

    def context(self, r: Rollout, group: list[Rollout], critique) -> str | None:
        """What rollout `r`'s teacher reads after the question; None: no teacher for `r`."""
        raise NotImplementedError(f"{type(self).__name__}.context")

    def example_context(self, example) -> str | None:
        """The context --dry-run shows for one training question (no rollout exists yet)."""
        return f"[condition={self.name}'s context for this rollout]"

    def example_text(self, tok, example) -> str:
        """The teacher's whole prompt for one training question, before any rollout (--dry-run)."""
        return render_teacher(self.cfg.templates, tok, self.template(),
                              {"question": example.question, self.field: self.example_context(example)})

    def counters(self, rollouts: list[Rollout]) -> dict[str, tuple[float, float | None]]:
        return {}

    def feedback(self, tok, rollouts: list[Rollout], critic) -> None:
        """Fill in what each rollout is trained on: its teacher prompt (`context`, through `teach`).
        With a critic, every rollout is critiqued first, all at once (a remote critic answers them
        concurrently); a failed critique records `critique_error`."""
        groups = by_group(rollouts)
        for r, crit in zip(rollouts, self.critiques(rollouts, critic)):
            context = self.context(r, groups[r.group], crit)
            if context is not None:
                self.teach(tok, r, context)

    def critiques(self, rollouts: list[Rollout], critic) -> list:
        """The critic's critique of each rollout (None each without a critic); a failed one is
        recorded on its rollout (`critique_error`, counted in the logs)."""
        if not self.uses_critic():
            return [None] * len(rollouts)
        crits = critic.critique_batch([(r.example.question, r.example.answer, r.parsed.steps, r.parsed.answer,
                                        r.example.reference_solution) for r in rollouts])
        for r, crit in zip(rollouts, crits):
            if not crit.ok:
                r.critique_error = crit.error or "unknown"
        return crits

    def required_fields(self) -> tuple[str, ...]:
        """The data fields (data.fields.*) every training record must hold for this condition."""
        return ()

    def teach(self, tok, r: Rollout, context: str, template: str | None = None, field: str | None = None) -> None:
        """Give `r`'s teacher `context` through `template` (default: the condition's): the teacher's own
        prompt; the student's sampled response ids follow it unchanged (fastsd.model.batch)."""
        r.context = context
        text = render_teacher(self.cfg.templates, tok, template or self.template(),
                              {"question": r.example.question, field or self.field: context})
        r.teacher_prompt = encode(tok, text)
        r.trained = len(r.response) > 0


def by_group(rollouts: list[Rollout]) -> dict[int, list[Rollout]]:
    """Rollouts by question (group), each group in sampling order."""
    groups: dict[int, list] = {}
    for r in rollouts:
        groups.setdefault(r.group, []).append(r)
    return groups


def register(cls: type[Condition]) -> type[Condition]:
    """Class decorator: `condition=cls.name` picks `cls`."""
    _REGISTRY[cls.name] = cls
    return cls
