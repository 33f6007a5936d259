"""Solver response formats (config key `format`), tolerant parsing and the final-answer reward.

`format=steps` (the built-in task's) is a compact run of numbered step tags followed by one answer
tag, with no separators:

    <step_1>12+7=19</step_1><step_2>19*3=57</step_2><step_3>57-5=52</step_3><answer>52</answer>

`format=free` is free-form reasoning whose final answer is the last `\\boxed{...}` (nested braces
allowed, `\\{` and `\\}` do not count), e.g. a chat model's "... so the answer is
$\\boxed{\\frac{3}{4}}$." Its steps, which a critic aligns its critique to, are the paragraphs (text
between blank lines), each stripped of surrounding whitespace; a response with no blank line but
several lines has its lines as steps. A response that ends inside an unclosed `\\boxed{` was cut off
in its answer: `answer=None`, `truncated=True`. It is `well_formed` when it has steps and an answer
and was not cut off.

Grammar of a *well-formed* `steps` response (whitespace is allowed between tags and at both ends,
but the rendered form `format_steps` produces has none):

    response := step{1..n} answer        with n >= 1 and the tags numbered 1, 2, ..., n in order
    step     := "<step_" k ">" content "</step_" k ">"
    answer   := "<answer>" content "</answer>"
    content  := any text without a step or answer tag ("<" and ">" are fine: "since x > 0")

Parsing never raises. It reads the text left to right and stops at the first complete
`</answer>` (a rollout is meant to stop there; anything after it only makes the response
ill-formed and is ignored). Its rules on malformed text:

- text outside tags, wrongly numbered or mismatched tags, a second answer tag: ignored, and
  `well_formed` is False;
- a step left open by the next opening tag is kept with the content it has;
- a step left open at the end of the text (a truncated rollout) is kept if it has any content,
  after cutting a dangling partial tag such as `</st`; `truncated` is then True;
- an answer left open at the end of the text gives `answer=None` (a cut-off answer earns nothing).

Step contents are kept verbatim (not stripped) so that a critic can copy them exactly; the
answer is stripped of surrounding whitespace.

The reward is 1.0 when the answer is right under a grader (`fastsd.tasks.grading`, config key
`grader`; exact match when none is given), else 0.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["FORMATS", "Parsed", "parse_response", "format_steps", "reward", "ANSWER_OPEN", "ANSWER_CLOSE"]

FORMATS = ("steps", "free")

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
# One tag: group 1 is "/" for a closing tag, group 2 the step number (None for the answer tag).
_TAG = re.compile(r"<(/?)(?:step_(\d+)|answer)>")
_TAG_LIKE = re.compile(r"</?(?:step_\d+|answer)>")
# The start of a tag cut off at the end of the text: "<", "</st", "<step_1", "<answ", ...
_PARTIAL_TAG = re.compile(r"</?(?:s(?:t(?:e(?:p(?:_\d*)?)?)?)?|a(?:n(?:s(?:w(?:e(?:r)?)?)?)?)?)?\Z")
_BOXED = re.compile(r"\\boxed\s*\{")
_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")


@dataclass
class Parsed:
    """What a response says.

    steps: step contents in order of appearance, verbatim (including a truncated last step).
    answer: the first complete answer, stripped; None when there is none.
    well_formed: the text follows the grammar in the module docstring exactly.
    truncated: the text ended inside an open tag (or a partial tag), i.e. it was cut off.
    """

    steps: list[str] = field(default_factory=list)
    answer: str | None = None
    well_formed: bool = False
    truncated: bool = False


def format_steps(steps: list[str], answer: str | int | None = None) -> str:
    """Render `steps` (contents without tags) and `answer` as a compact tagged trace.

    With `answer=None` the answer tag is left out (a prefix of a trace).
    """
    if not isinstance(steps, (list, tuple)) or not all(isinstance(s, str) for s in steps):
        raise ValueError(f"steps: expected a list of str, got {steps!r}")
    for s in steps:
        if _TAG_LIKE.search(s):
            raise ValueError(f"steps: a step may not contain a step or answer tag, got {s!r}")
    body = "".join(f"<step_{i}>{s}</step_{i}>" for i, s in enumerate(steps, start=1))
    if answer is None:
        return body
    answer = str(answer)
    if _TAG_LIKE.search(answer):
        raise ValueError(f"answer: may not contain a step or answer tag, got {answer!r}")
    return f"{body}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def _cut_partial_tag(text: str) -> tuple[str, bool]:
    """Cut a dangling start of a tag ('</st') off the end of `text`; say whether one was cut."""
    m = _PARTIAL_TAG.search(text)
    if m is not None:
        return text[: m.start()], True
    return text, False


class _Reader:
    """State of one left-to-right pass over a response (see `parse_response`)."""

    def __init__(self) -> None:
        self.out = Parsed(well_formed=True)
        self.open_kind: str | None = None  # "step" or "answer"
        self.open_num: int | None = None
        self.open_end = 0  # where the open tag's content starts

    def gap(self, text: str) -> None:
        """Text between tags: only whitespace is allowed outside an open tag."""
        if self.open_kind is None and text.strip():
            self.out.well_formed = False

    def opening(self, kind: str, num: int | None, end: int) -> None:
        """An opening tag at a position whose content starts at `end`."""
        if self.open_kind is not None:  # the previous tag was never closed
            self.out.well_formed = False
        expected = len(self.out.steps) + 1
        if kind == "step" and num != expected:
            self.out.well_formed = False
        self.open_kind, self.open_num, self.open_end = kind, num, end

    def closing(self, kind: str, num: int | None, content: str) -> bool:
        """A closing tag; returns True when it completes the answer (the end of the response).

        Any closing tag ends an open step (a mismatched one makes the text ill-formed); an open
        answer ends only at `</answer>`.
        """
        if self.open_kind == "answer":
            if kind != "answer":  # an answer must be closed by its own tag
                self.out.well_formed = False
                return False
            self.out.answer = content.strip()
            self.open_kind = None
            return True
        if kind != "step" or num != self.open_num:
            self.out.well_formed = False
        self.out.steps.append(content)
        self.open_kind = None
        return False


def parse_response(text: str, fmt: str = "steps") -> Parsed:
    """Parse a (possibly malformed or truncated) response in format `fmt` ("steps" or "free");
    never raises on any text. See the module docstring."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    if not isinstance(text, str):
        return Parsed()
    if fmt == "free":
        return _parse_free(text)
    reader = _Reader()
    pos = 0
    for m in _TAG.finditer(text):
        closing, num = m.group(1) == "/", m.group(2)
        kind = "answer" if num is None else "step"
        num_i = None if num is None else int(num)
        if not closing:
            if reader.open_kind == "step":  # keep a step interrupted by the next tag
                reader.out.steps.append(text[reader.open_end : m.start()])
            reader.gap(text[pos : m.start()])
            reader.opening(kind, num_i, m.end())
        elif reader.open_kind is None:
            reader.gap(text[pos : m.start()])
            reader.out.well_formed = False
        elif reader.closing(kind, num_i, text[reader.open_end : m.start()]):
            if text[m.end() :].strip():
                reader.out.well_formed = False
            return _finish(reader.out)
        pos = m.end()
    return _finish_unterminated(reader, text, pos)


def _finish_unterminated(reader: _Reader, text: str, pos: int) -> Parsed:
    """End of text reached without a complete answer tag."""
    out = reader.out
    out.well_formed = False
    if reader.open_kind is None:
        _, out.truncated = _cut_partial_tag(text[pos:])
        return _finish(out)
    out.truncated = True
    if reader.open_kind == "step":
        content, _ = _cut_partial_tag(text[reader.open_end :])
        if content.strip():
            out.steps.append(content)
    return _finish(out)


def _finish(out: Parsed) -> Parsed:
    """Final consistency rule: a well-formed response has at least one step and an answer."""
    if not out.steps or out.answer is None:
        out.well_formed = False
    return out


def _brace_pairs(text: str) -> dict[int, int]:
    """The index of the `}` closing each `{` that closes, in one pass (linear even for thousands
    of nested groups); `\\{`, `\\}` and `\\\\` are not group braces, an unmatched `}` is ignored."""
    pairs, stack, i = {}, [], 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # an escaped character
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _parse_free(text: str) -> Parsed:
    """format=free: steps are paragraphs (or lines), the answer the last complete \\boxed{...}."""
    answer, truncated, pairs = None, False, None
    for m in _BOXED.finditer(text):
        pairs = _brace_pairs(text) if pairs is None else pairs
        end = pairs.get(m.end() - 1)
        if end is None:  # runs to the end of the text: cut off inside the answer
            answer, truncated = None, True
            break
        answer = text[m.end() : end].strip()
    parts = [p.strip() for p in _BLANK_LINE.split(text)]
    steps = [p for p in parts if p]
    if len(steps) == 1 and "\n" in steps[0]:
        steps = [line.strip() for line in steps[0].split("\n") if line.strip()]
    return Parsed(steps, answer, well_formed=bool(steps) and answer is not None and not truncated,
                  truncated=truncated)


def reward(parsed_or_text: Parsed | str, ground_truth_answer: str | int, grader=None) -> float:
    """1.0 iff the response's final answer is right, else 0.0: equal to `ground_truth_answer` under
    `grader` (a `fastsd.tasks.grading.Grader`), or after stripping when `grader` is None. A str is
    parsed in the steps format."""
    if isinstance(parsed_or_text, str):
        parsed = parse_response(parsed_or_text)
    elif isinstance(parsed_or_text, Parsed):
        parsed = parsed_or_text
    else:
        raise ValueError(f"parsed_or_text: expected Parsed or str, got {type(parsed_or_text).__name__}")
    if not isinstance(ground_truth_answer, (str, int)) or isinstance(ground_truth_answer, bool):
        raise ValueError(f"ground_truth_answer: expected str or int, got {ground_truth_answer!r}")
    if parsed.answer is None:
        return 0.0
    if grader is not None:
        return 1.0 if grader.equal(parsed.answer, str(ground_truth_answer)) else 0.0
    return 1.0 if parsed.answer.strip() == str(ground_truth_answer).strip() else 0.0
