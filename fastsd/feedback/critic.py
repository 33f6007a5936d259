"""Critics: a frozen judge that rewrites a student's attempt as a step-aligned critique.

The critique is in the "faithful scribe" form (see docs/method.md): a complete step-tagged trace
(`fastsd.tasks.format`) ending in the right answer, that copies the student's correct steps verbatim
up to the earliest wrong step, writes that step corrected in the student's own notation, then
continues the solution to the right answer. The self-teacher reads the question plus this text.

`ArithCritic` does this exactly for the built-in arithmetic task (`fastsd.tasks.arith`). Its
definition of a correct step, for student step k (0-based) against canonical step k
`v op x = r` of the question (v: the correct running value, x: the next operand):

    the step parses as `a op' b = c` (any spacing, leading zeros allowed), op' == op, c == r, and
    (a, b) == (v, x), or (a, b) == (x, v) when op is `+` or `*`.

Each step is judged against its own canonical step, i.e. given the correct previous results: a
step that carries an earlier mistake forward is wrong too. Steps beyond the canonical count are
wrong. The critique is rendered with `format_steps`, so text the student wrote between tags is
not kept; everything inside the copied step tags is.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..tasks import arith
from ..tasks.format import format_steps, parse_response

__all__ = ["Critique", "Critic", "ArithCritic", "check_items", "step_matches", "correct_step"]

# A step with its spacing kept: lead, a, gap, op, gap, b, gap, "=", gap, c, trail.
_STEP_PARTS = re.compile(r"(\s*)(\d+)(\s*)([+\-*])(\s*)(\d+)(\s*)=(\s*)(\d+)(\s*)")


@dataclass
class Critique:
    """A critic's feedback on one attempt.

    text: the faithful-scribe trace (complete, step-tagged, ends in the right answer).
    verdicts: one per student step, True iff that step is correct.
    first_error: index of the earliest wrong student step; None when every step is correct
        (the attempt may still be incomplete or have a wrong answer: `text` fixes both).
    ok: a usable critique was produced (a model-based critic may fail; then do not use `text`).
    error: why not, when `ok` is False (e.g. "timeout", "http 500", "invalid reply: ...").
    """

    text: str
    verdicts: list[bool] = field(default_factory=list)
    first_error: int | None = None
    ok: bool = True
    error: str | None = None


class Critic(ABC):
    """Interface: critique a student's steps given the question and the ground truth."""

    @abstractmethod
    def critique(
        self, question: str, ground_truth: str, steps: list[str], answer: str | None = None,
        reference: str | None = None,
    ) -> Critique:
        """Critique the student's `steps` (contents without tags, as `Parsed.steps` gives them).

        `ground_truth` is the final answer (or a full solution trace); `answer` is the student's
        own answer, if any, which a critic may copy when it is right; `reference` is a worked
        solution, which a model-based critic is shown.
        """

    def critique_batch(self, items: Iterable[Sequence]) -> list[Critique]:
        """Critique many attempts; each item is (question, ground_truth, steps[, answer[, reference]])."""
        return [self.critique(*item) for item in check_items(items)]


def check_items(items: Iterable[Sequence]) -> list[Sequence]:
    """`items` as a list, ValueError naming the first that is not (question, ground_truth, steps[, answer[, reference]])."""
    items = list(items)
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) not in (3, 4, 5):
            raise ValueError(f"items: expected (question, ground_truth, steps[, answer[, reference]]), got {item!r}")
        _check_steps(item[2])
    return items


def _check_steps(steps: list[str]) -> None:
    """ValueError unless `steps` is a list of str."""
    if not isinstance(steps, (list, tuple)) or not all(isinstance(s, str) for s in steps):
        raise ValueError(f"steps: expected a list of str, got {steps!r}")


def _ground_truth_answer(ground_truth: str) -> str:
    """The final answer named by `ground_truth` (a bare answer or a tagged solution trace)."""
    if not isinstance(ground_truth, (str, int)) or isinstance(ground_truth, bool):
        raise ValueError(f"ground_truth: expected an answer or a solution trace, got {ground_truth!r}")
    text = str(ground_truth)
    parsed = parse_response(text)
    return parsed.answer if parsed.answer is not None else text.strip()


def step_matches(text: str, target: arith.Step) -> bool:
    """The student's step `text` is the canonical `target` (see the module docstring)."""
    got = arith.parse_step(text)
    if got is None or got.op != target.op or got.result != target.result:
        return False
    if (got.left, got.right) == (target.left, target.right):
        return True
    return target.op in "+*" and (got.left, got.right) == (target.right, target.left)


def _spacing(text: str) -> tuple[str, str, str, str] | None:
    """The four inner gaps (around the operator and `=`) of a step, or None if it does not parse."""
    m = _STEP_PARTS.fullmatch(text)
    return None if m is None else (m.group(3), m.group(5), m.group(7), m.group(8))


def _render(step: arith.Step, gaps: tuple[str, str, str, str]) -> str:
    """Write `step` with the given inner gaps."""
    g1, g2, g3, g4 = gaps
    return f"{step.left}{g1}{step.op}{g2}{step.right}{g3}={g4}{step.result}"


def correct_step(text: str, target: arith.Step, gaps: tuple[str, str, str, str]) -> str:
    """Rewrite the student's step `text` as `target`, keeping the student's notation.

    When `text` parses, its spacing, its operand order (for `+`/`*`, when its operands show it)
    and the spelling of every number whose value is right are kept; otherwise `target` is
    written with `gaps`.
    """
    m = _STEP_PARTS.fullmatch(text)
    if m is None:
        return _render(target, gaps)
    lead, a, g1, _, g2, b, g3, g4, c, trail = m.groups()
    left, right = target.left, target.right
    # Keep swapped operands only when the student's numbers say so and swapping is allowed.
    says_swapped = int(a) == right or int(b) == left
    says_straight = int(a) == left or int(b) == right
    if target.op in "+*" and says_swapped and not says_straight:
        left, right = right, left

    def keep(spelled: str, value: int) -> str:
        return spelled if int(spelled) == value else str(value)

    a, b, c = keep(a, left), keep(b, right), keep(c, target.result)
    return f"{lead}{a}{g1}{target.op}{g2}{b}{g3}={g4}{c}{trail}"


class ArithCritic(Critic):
    """Exact, deterministic critic for `fastsd.tasks.arith` (see the module docstring)."""

    def critique(
        self, question: str, ground_truth: str, steps: list[str], answer: str | None = None,
        reference: str | None = None,
    ) -> Critique:
        """The faithful-scribe critique of `steps`; `answer` is copied only when all is right.
        `reference` is not needed: the task's own solver knows every step."""
        _check_steps(steps)
        canon = arith.solve(question)
        truth = str(canon[-1].result)
        if _ground_truth_answer(ground_truth) != truth:
            raise ValueError(f"ground_truth: {ground_truth!r} disagrees with question {question!r} = {truth}")
        verdicts = [k < len(canon) and step_matches(s, canon[k]) for k, s in enumerate(steps)]
        first_error = verdicts.index(False) if False in verdicts else None
        out = self._scribe(steps, canon, first_error)
        complete = first_error is None and len(steps) == len(canon)
        final = answer if complete and answer is not None and answer.strip() == truth else truth
        return Critique(format_steps(out, final), verdicts, first_error, ok=True)

    @staticmethod
    def _scribe(steps: list[str], canon: list[arith.Step], first_error: int | None) -> list[str]:
        """Correct prefix verbatim, the first wrong step corrected, then the canonical rest."""
        keep = len(steps) if first_error is None else first_error
        out = list(steps[:keep])
        gaps = _last_spacing(steps[: keep + 1])
        if first_error is not None and first_error < len(canon):
            out.append(correct_step(steps[first_error], canon[first_error], gaps))
        out.extend(_render(s, gaps) for s in canon[len(out) :])
        return out


def _last_spacing(steps: list[str]) -> tuple[str, str, str, str]:
    """The student's spacing style: that of the last step that parses, compact by default."""
    for s in reversed(steps):
        gaps = _spacing(s)
        if gaps is not None:
            return gaps
    return ("", "", "", "")
