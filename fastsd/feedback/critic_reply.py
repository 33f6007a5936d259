"""The HTTP critic's reply: its reasoning dropped, then checked against the student's steps and
the ground truth and turned into the `Critique` the teacher reads (the wire format is in
`fastsd.feedback.http_critic`'s docstring)."""

from __future__ import annotations

import re

from ..tasks.format import format_steps, parse_response
from .critic import Critique
from .critic_prompt import free_text

__all__ = ["parse_reply", "strip_think"]

_FIRST_ERROR = re.compile(r"<first_error>\s*(\w+)\s*</first_error>")


def strip_think(text: str) -> str:
    """Drop the critic's reasoning: everything up to the last `</think>` before its (last)
    `<first_error>` tag, opened by `<think>` or by the chat template. The trace after the tag copies
    the student's steps, which may hold think tags of their own: those are kept. A reply that opens
    `<think>` and never closes it before the tag is an error."""
    ends = [m.end() for m in re.finditer("</think>", text)]
    tags = [m.start() for m in _FIRST_ERROR.finditer(text)]
    before = [e for e in ends if tags and e <= tags[-1]]
    if before:
        return text[before[-1]:]
    if ends and not tags:  # no tag at all: the parse fails on that, after the reasoning
        return text[ends[-1]:]
    if text.lstrip().startswith("<think>"):
        raise ValueError("the reply ended inside <think> (out of tokens?)")
    return text


def parse_reply(reply: str, steps: list[str], answer: str, grader=None, fmt: str = "steps") -> Critique:
    """The critique in `reply` (see the module docstring), ValueError saying why it is unusable.

    `steps` are the student's steps, `answer` the ground-truth final answer, which the trace's
    answer must equal under `grader` (config key `grader`; exact match when None). Verdicts: steps
    before the first error are right; the critic judges nothing after it, so those count as wrong.
    The critique's text is in the student's format `fmt` (config key `format`).
    """
    body = strip_think(reply)
    marks = _FIRST_ERROR.findall(body)
    if len(marks) != 1:
        raise ValueError(f"expected one <first_error> tag, found {len(marks)}")
    mark = marks[0].lower()
    if mark == "none":
        k = None
    elif mark.isdigit() and 1 <= int(mark) <= len(steps):
        k = int(mark) - 1
    else:
        raise ValueError(f"<first_error>{marks[0]}</first_error>: the attempt has {len(steps)} steps")
    parsed = parse_response(_FIRST_ERROR.sub("", body))
    ours = parsed.steps
    if parsed.truncated or parsed.answer is None:
        raise ValueError("the trace has no complete <answer>")
    if not parsed.well_formed:
        raise ValueError("the trace is not only <step_1>..</step_1> ... <answer>..</answer> (text outside "
                         "the tags, steps out of order, or something after the answer)")
    right = (lambda a: grader.equal(a, answer)) if grader is not None else (lambda a: a == answer.strip())
    if not right(parsed.answer):
        raise ValueError(f"the trace ends in {parsed.answer!r}, not the correct answer {answer.strip()!r}")
    if not ours or any(not s.strip() for s in ours):
        raise ValueError("the trace has no steps, or an empty one")
    keep = len(steps) if k is None else k
    if len(ours) < keep + (k is not None):
        raise ValueError(f"the trace has {len(ours)} steps, fewer than the {keep} it must copy (plus the correction)")
    for i in range(keep):
        if ours[i].strip() != steps[i].strip():
            raise ValueError(f"step {i + 1} is not the student's step {i + 1} copied verbatim")
    if k is not None and "".join(ours[k].split()) == "".join(steps[k].split()):
        raise ValueError(f"step {k + 1} is marked wrong but copied unchanged (up to spacing)")
    verdicts = [i < keep for i in range(len(steps))]
    trace = list(steps[:keep]) + ours[keep:]
    if fmt != "free":
        return Critique(format_steps(trace, parsed.answer), verdicts, k)
    text = free_text(trace, answer.strip())
    boxed = parse_response(text, "free").answer  # what the teacher reads as the critique's answer
    if boxed is None or not right(boxed):
        raise ValueError(f"the last step's \\boxed{{}} holds {boxed!r}, not the correct answer {answer.strip()!r}"
                         if boxed is not None else "the last step has a \\boxed{ that is never closed")
    return Critique(text, verdicts, k)
