"""Prompt templates for the student and the self-teacher, and the helpers that render them.

The student sees only the question; the self-teacher sees the question plus a context: a
reference solution (condition `reference`) or a critique of this very rollout (`critique`).
The response (a step-tagged trace, `fastsd.format`) follows the prompt directly, with no
separator, and ends with the tokenizer's EOS token:

    Q:12+7*3-5\n<step_1>12+7=19</step_1>...<answer>52</answer><eos>
    Q:12+7*3-5\nC:<step_1>12+7=19</step_1>...<answer>52</answer>\n<step_1>12+7=19</step_1>...

Templates are plain `str.format` strings: {question}, and {reference} or {critique}.
"""

from __future__ import annotations

__all__ = [
    "STUDENT_TEMPLATE",
    "REFERENCE_TEMPLATE",
    "CRITIQUE_TEMPLATE",
    "CONDITIONS",
    "student_prompt",
    "teacher_prompt",
]

STUDENT_TEMPLATE = "Q:{question}\n"
REFERENCE_TEMPLATE = "Q:{question}\nR:{reference}\n"
CRITIQUE_TEMPLATE = "Q:{question}\nC:{critique}\n"
# Teacher conditions, each with its default template and the context field that template needs.
CONDITIONS = {"reference": (REFERENCE_TEMPLATE, "reference"), "critique": (CRITIQUE_TEMPLATE, "critique")}


def _need_str(name: str, value: object) -> str:
    """`value` if it is a str, else ValueError naming `name`."""
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a str, got {value!r}")
    return value


def student_prompt(question: str, template: str = STUDENT_TEMPLATE) -> str:
    """The student's prompt: `template` with {question} filled in."""
    return _need_str("template", template).format(question=_need_str("question", question))


def teacher_prompt(
    condition: str,
    question: str,
    *,
    reference: str | None = None,
    critique: str | None = None,
    templates: dict[str, str] | None = None,
) -> str:
    """The self-teacher's prompt for `condition` ("reference" or "critique").

    `reference` is required for condition="reference", `critique` (the critic's text) for
    condition="critique". `templates` maps a condition to a template overriding its default.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"condition: expected one of {tuple(CONDITIONS)}, got {condition!r}")
    template, field_name = CONDITIONS[condition]
    if templates is not None:
        if not isinstance(templates, dict):
            raise ValueError(f"templates: expected a dict of condition -> template, got {templates!r}")
        template = _need_str("templates", templates.get(condition, template))
    context = {"reference": reference, "critique": critique}[field_name]
    if context is None:
        raise ValueError(f"{field_name}: required for condition={condition!r}")
    return template.format(question=_need_str("question", question), **{field_name: _need_str(field_name, context)})
