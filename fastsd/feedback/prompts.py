r"""Prompts for the student and the self-teacher: templates, and the tokenizer's chat template.

The student sees only the question; the self-teacher sees the question plus a context: a
reference solution (condition `reference`) or a critique of this very rollout (`critique`).
A template is text with fields: {question}, and {reference} or {critique}. Only those fields
are replaced; every other character, braces included, is kept as written, so
`Put the answer in \boxed{}.` needs no escaping.

Without a chat template (the built-in model) the filled template is the whole prompt, and the
response follows it directly, ending with the tokenizer's EOS token:

    Q:12+7*3-5\n<step_1>12+7=19</step_1>...<answer>52</answer><eos>
    Q:12+7*3-5\nC:<step_1>12+7=19</step_1>...<answer>52</answer>\n<step_1>12+7=19</step_1>...

With one (`templates.chat`: auto uses it when the tokenizer has one) the filled template is the
user turn, after an optional system message (`templates.student_system`, `teacher_system`),
rendered by `tokenizer.apply_chat_template(..., add_generation_prompt=True, **kwargs)` with
each side's keyword arguments (`templates.student_chat_kwargs`, `teacher_chat_kwargs`, e.g.
`{enable_thinking: false}`). Either way the response is never re-tokenised: the teacher reads
its own prompt's ids followed by exactly the ids the student sampled (`fastsd.model.batch`), so what
the generation prompt ends with (e.g. Qwen3's empty `<think>\n\n</think>\n\n` block when
thinking is off) belongs to each side's prompt, not to the response.
"""

from __future__ import annotations

import difflib
import re

__all__ = [
    "STUDENT_TEMPLATE",
    "REFERENCE_TEMPLATE",
    "CRITIQUE_TEMPLATE",
    "PEER_TEMPLATE",
    "CONTEXT_TEMPLATE",
    "PEER_FEEDBACK_TEMPLATE",
    "CONDITIONS",
    "TEMPLATE_FIELDS",
    "fill",
    "check_template",
    "student_prompt",
    "teacher_prompt",
    "uses_chat",
    "student_text",
    "teacher_text",
    "render_teacher",
    "example_prompts",
    "encode",
]

STUDENT_TEMPLATE = "Q:{question}\n"
REFERENCE_TEMPLATE = "Q:{question}\nR:{reference}\n"
CRITIQUE_TEMPLATE = "Q:{question}\nC:{critique}\n"
CONTEXT_TEMPLATE = "Q:{question}\nH:{context}\n"
PEER_TEMPLATE = "Q:{question}\nR:{demonstration}\n{feedback}"
PEER_FEEDBACK_TEMPLATE = "F:{feedback}\n"
# Teacher conditions, each with its default template and the context field that template needs.
CONDITIONS = {"reference": (REFERENCE_TEMPLATE, "reference"), "critique": (CRITIQUE_TEMPLATE, "critique")}
# The fields each template must use (all of them: a teacher without its context teaches nothing).
TEMPLATE_FIELDS = {"student": ("question",), "reference": ("question", "reference"), "critique": ("question", "critique")}
# apply_chat_template's own arguments, which a *_chat_kwargs mapping may not set.
_RESERVED_CHAT_KWARGS = ("conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                         "return_dict", "chat_template")
_FIELD_LIKE = re.compile(r"\{([A-Za-z_]\w*)\}")


def _need_str(name: str, value: object) -> str:
    """`value` if it is a str, else ValueError naming `name`."""
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a str, got {value!r}")
    return value


def fill(template: str, values: dict[str, str]) -> str:
    """`template` with each `{name}` of `values` replaced, in one pass (a value that contains
    `{question}` is not filled again); all other text is kept as written."""
    if not values:
        return template
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


def check_template(key: str, template: object, fields: tuple[str, ...], required: tuple[str, ...] | None = None) -> str:
    """ValueError naming `key` unless `template` is a str that uses every required field (default:
    all of `fields`); a `{name}` that looks like a misspelt field is an error too."""
    text = _need_str(key, template)
    for name in _FIELD_LIKE.findall(text):
        close = difflib.get_close_matches(name, fields, n=1, cutoff=0.75)
        if name not in fields and close:
            raise ValueError(f"{key}: unknown field {{{name}}} (did you mean {{{close[0]}}}?); "
                             f"the fields are {', '.join('{' + f + '}' for f in fields)}")
    missing = [f for f in (fields if required is None else required) if "{" + f + "}" not in text]
    if missing:
        raise ValueError(f"{key}: does not use {', '.join('{' + f + '}' for f in missing)} (write it where the "
                         f"text goes; other braces, as in \\boxed{{}}, are kept as written): {text!r}")
    return text


def student_prompt(question: str, template: str = STUDENT_TEMPLATE) -> str:
    """The student's prompt text: `template` with {question} filled in."""
    return fill(_need_str("template", template), {"question": _need_str("question", question)})


def teacher_prompt(
    condition: str,
    question: str,
    *,
    reference: str | None = None,
    critique: str | None = None,
    templates: dict[str, str] | None = None,
) -> str:
    """The self-teacher's prompt text for `condition` ("reference" or "critique").

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
    return fill(template, {"question": _need_str("question", question), field_name: _need_str(field_name, context)})


# ---------------------------------------------------------------- through the chat template

def uses_chat(templates, tok) -> bool:
    """Do prompts go through `tok`'s chat template? ValueError for templates.chat=on without one."""
    has = bool(getattr(tok, "chat_template", None))
    if templates.chat == "on" and not has:
        raise ValueError("templates.chat: on, but the tokenizer of model.path has no chat template "
                         "(use templates.chat=auto or off)")
    return has and templates.chat != "off"


def _render(templates, tok, text: str, side: str) -> str:
    if not uses_chat(templates, tok):
        return text
    system = getattr(templates, f"{side}_system")
    kwargs = getattr(templates, f"{side}_chat_kwargs")
    bad = sorted(set(kwargs) & set(_RESERVED_CHAT_KWARGS))
    if bad:
        raise ValueError(f"templates.{side}_chat_kwargs: {bad} are fastsd's own arguments to apply_chat_template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    try:
        out = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as e:  # a Jinja error, or a template that refuses these messages or kwargs
        raise ValueError(f"templates.{side}_chat_kwargs: the tokenizer's chat template failed with "
                         f"{kwargs} ({type(e).__name__}: {e})") from None
    if not isinstance(out, str):  # some tokenizers return a list for one conversation
        out = out[0]
    return out


def student_text(templates, tok, question: str) -> str:
    """The student's whole prompt: templates.student filled in, through the chat template if used.
    `templates` is a `config.TemplateConfig`."""
    return _render(templates, tok, student_prompt(question, templates.student), "student")


def teacher_text(templates, tok, condition: str, question: str, context: str) -> str:
    """The teacher's whole prompt for `condition` with its `context` (reference or critique)."""
    field_name = CONDITIONS[condition][1] if condition in CONDITIONS else condition
    text = teacher_prompt(condition, question, templates={"reference": templates.reference,
                                                          "critique": templates.critique}, **{field_name: context})
    return _render(templates, tok, text, "teacher")


def render_teacher(templates, tok, template: str, values: dict[str, str]) -> str:
    """The teacher's whole prompt: `template` with the fields of `values` ({question} and the
    context's) filled in, through the chat template if used (`templates`: a `config.TemplateConfig`)."""
    text = fill(_need_str("template", template), {k: _need_str(k, v) for k, v in values.items()})
    return _render(templates, tok, text, "teacher")


CRITIQUE_PLACEHOLDER = "[the critic's step-aligned critique of this rollout]"


def _check_no_chat_markup(cfg, tok) -> None:
    """Under a chat template a template is the user turn's text: one that already holds the chat
    template's own markup (a special token it renders, such as `<|im_start|>`) would be wrapped
    a second time. ValueError naming the key."""
    if not uses_chat(cfg.templates, tok):
        return
    content = "FASTSD_PROBE"
    try:
        probe = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - rendering the real prompts says what is wrong with the template
        return
    wrapper = str(probe).replace(content, "")
    tokens = set(tok.all_special_tokens) | set(getattr(tok, "get_added_vocab", dict)())
    markup = [t for t in tokens if t.strip() and t in wrapper]
    own = [k.split(".", 1)[1] for k in cfg.feedback_condition().keys() if k.startswith("templates.")]
    sides = ["student", *own, "student_system", "teacher_system"]
    for key in sides:
        text = getattr(cfg.templates, key)
        found = sorted((m for m in markup if m in text), key=text.index)  # the first in the text
        if found:
            raise ValueError(f"templates.{key}: holds {found[0]!r}, markup of the tokenizer's chat template, which "
                             f"wraps the template a second time (templates.chat={cfg.templates.chat}): write the "
                             "turn's text only, or set templates.chat=off to send the template as it is")


def example_prompts(cfg, tok, example) -> dict[str, str | None]:
    """{"student": ..., "teacher": ...}: what each side reads for `example` (a `data.Example`) under
    `cfg`, before the response; the teacher's is None for grpo, and a context that needs a rollout
    (a critique, a sibling's demonstration) is a placeholder (the condition's `example_context`).
    Checks first that no template holds the chat template's own markup."""
    _check_no_chat_markup(cfg, tok)
    out = {"student": student_text(cfg.templates, tok, example.question), "teacher": None}
    cond = cfg.feedback_condition()
    if cond.teacher:
        out["teacher"] = cond.example_text(tok, example)
    return out


def encode(tok, text: str) -> list[int]:
    """A rendered prompt's token ids, exactly as the tokenizer splits the text (no special tokens added)."""
    return tok(text, add_special_tokens=False)["input_ids"]
