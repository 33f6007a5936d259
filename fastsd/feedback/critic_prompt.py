r"""What the HTTP critic is asked (`critic.prompt_file`), and the critique the teacher reads under
`format=free`.

The instructions. The default is the faithful-scribe text for the response format
(`SCRIBE_INSTRUCTIONS` for format=steps, `FREE_INSTRUCTIONS` for format=free).
`critic.prompt_file` replaces it with a file's text, in one of two ways:

- a text with no fields is the system message, and fastsd's user message follows it (the
  question, the worked solution, the correct answer and the attempt, in tagged sections);
- a text that uses any of the fields {question} {reference} {answer} {attempt} is the whole
  request: one user message, filled in (reasoning critics such as QwQ are meant to be asked
  without a system message). It must use {attempt}. Only these fields are replaced; other
  braces are kept as written.

{attempt} is the student's steps numbered `<step_1>...</step_1>` (then `<answer>...</answer>`
when it has one). Either way the reply must be in the wire format of `fastsd.feedback.http_critic`.

The alignment rule of format=free. The student's steps are its paragraphs (or its lines, when it
wrote one paragraph: `format.parse_response`). The critic sees them numbered and replies in the
same numbered tags, validated as under format=steps (paragraphs before the first error copied
verbatim, the first wrong one changed, the answer right under the grader). The teacher then reads
the critique in the student's own form (`free_text`): the student's paragraphs before the first
error, then the critic's from there on, separated by blank lines, ending with the answer in
`\boxed{}` (added when the last paragraph has none; a critique whose last paragraph boxes a wrong
answer, or leaves a `\boxed{` open, is refused like one whose answer is wrong).
"""

from __future__ import annotations

from pathlib import Path

from ..tasks.format import parse_response
from .prompts import check_template, fill

__all__ = ["SCRIBE_INSTRUCTIONS", "FREE_INSTRUCTIONS", "user_message", "PROMPT_FIELDS", "attempt_text", "load_prompt", "prompt_messages", "free_text"]

PROMPT_FIELDS = ("question", "reference", "answer", "attempt")

SCRIBE_INSTRUCTIONS = """\
You check a student's step-by-step solution against a known correct solution, and write it out \
again as a faithful scribe would: keeping everything the student got right, fixing only what is wrong.

The student's attempt is given as numbered tags <step_1>...</step_1>, <step_2>...</step_2>, ... \
possibly followed by <answer>...</answer>. Find the earliest step that is wrong (a wrong \
calculation, a wrong claim, or a result carried over from an earlier mistake), then reply with \
exactly this and nothing else:

<first_error>K</first_error>
<step_1>...</step_1>
<step_2>...</step_2>
...
<answer>FINAL</answer>

where K is the number of the earliest wrong step, or none if every step is right. The steps you write:
- steps 1 to K-1: copied character for character from the student, even where you would word them differently;
- step K: the student's step K corrected, in the student's own notation and style;
- after that: the solution continued, in the same style, until the final answer.
If every step is right, copy all of them and, if the attempt stops early, continue it to the end.
FINAL is the correct final answer."""


def user_message(question: str, reference: str, answer: str, steps: list[str], student_answer: str | None) -> str:
    """The user turn: question, ground truth, and the student's numbered steps."""
    attempt = attempt_text(steps, student_answer)
    return (f"<question>\n{question}\n</question>\n\n<correct_solution>\n{reference}\n</correct_solution>\n\n"
            f"<correct_answer>{answer}</correct_answer>\n\n<student_attempt>\n{attempt}\n</student_attempt>")


FREE_INSTRUCTIONS = """\
You check a student's solution against a known correct solution, and write it out again as a \
faithful scribe would: keeping everything the student got right, fixing only what is wrong.

The student's attempt is given split into its paragraphs, numbered as tags <step_1>...</step_1>, \
<step_2>...</step_2>, ... Find the earliest paragraph that is wrong (a wrong calculation, a wrong \
claim, or a result carried over from an earlier mistake), then reply with exactly this and nothing else:

<first_error>K</first_error>
<step_1>...</step_1>
<step_2>...</step_2>
...
<answer>FINAL</answer>

where K is the number of the earliest wrong paragraph, or none if every paragraph is right. The \
paragraphs you write, one per tag:
- paragraphs 1 to K-1: copied character for character from the student, even where you would word them differently;
- paragraph K: the student's paragraph K corrected, in the student's own notation and style;
- after that: the solution continued, in the same style, the last paragraph ending with the final answer in \\boxed{}.
If every paragraph is right, copy all of them and, if the attempt stops early, continue it to the end.
FINAL is the correct final answer."""


def attempt_text(steps: list[str], student_answer: str | None) -> str:
    """The student's steps as numbered tags (then its answer), as the critic reads them."""
    attempt = "\n".join(f"<step_{i}>{s}</step_{i}>" for i, s in enumerate(steps, start=1)) or "(no steps)"
    if student_answer is not None:
        attempt += f"\n<answer>{student_answer}</answer>"
    return attempt


def load_prompt(path: str) -> str:
    """The text of critic.prompt_file, checked (ValueError naming the key)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"critic.prompt_file: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"critic.prompt_file: {path} is not UTF-8 ({e.reason})") from None
    if not text.strip():
        raise ValueError(f"critic.prompt_file: {path} is empty")
    check_template(f"critic.prompt_file: {path}", text, PROMPT_FIELDS, required=())
    if _uses_fields(text) and "{attempt}" not in text:
        raise ValueError(f"critic.prompt_file: {path} uses fields but not {{attempt}}, so the critic would never "
                         "see the student's steps (a text without fields is a system message instead)")
    return text


def _uses_fields(text: str) -> bool:
    return any("{" + f + "}" in text for f in PROMPT_FIELDS)


def prompt_messages(instructions: str, user: str, values: dict[str, str]) -> list[dict]:
    """The request's messages: `instructions` as the system message before `user` (fastsd's user
    message), or, when the instructions use fields, one user message with `values` filled in."""
    if _uses_fields(instructions):
        return [{"role": "user", "content": fill(instructions, values)}]
    return [{"role": "system", "content": instructions}, {"role": "user", "content": user}]


def free_text(steps: list[str], answer: str) -> str:
    """A format=free critique: paragraphs separated by blank lines, ending in \\boxed{answer}
    (added when the last paragraph has no \\boxed{}: an earlier one, such as a boxed guess in
    the student's copied prefix, is not the critique's answer)."""
    text = "\n\n".join(s.strip() for s in steps)
    if not steps or parse_response(steps[-1], "free").answer is None:
        text += f"\n\nThe answer is $\\boxed{{{answer}}}$."
    return text
