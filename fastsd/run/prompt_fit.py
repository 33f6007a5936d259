"""Questions whose prompt does not fit the model: found before the model loads, refused or left out.

A rollout's sequence is its prompt followed by up to `rollout.max_new_tokens` sampled tokens, and
the model reads at most `max_position_embeddings` positions (its config, read without the
weights). For every training and held-out question, the student's prompt is rendered as a step
renders it (the template filled in, through the chat template where one is used, `fastsd.feedback.prompts`)
and counted with the tokenizer; under condition=reference the teacher's prompt (with the record's
reference solution) is counted too, since the teacher reads it before the same response. A prompt
whose length plus `rollout.max_new_tokens` is past the model's positions:

- `data.too_long=error` (default): stops the run, naming the key (data.path or data.eval_path),
  the file and line (or row) of the first such question, its length, and how many more there are;
- `data.too_long=skip`: the question is left out; a warning says how many of how many, from which
  file, and where the first few are. Leaving out every question is still an error.

Under condition=critique the critique is written during the run, so its length cannot be known
here: only the student's prompt is counted.
"""

from __future__ import annotations

import logging

from ..feedback.prompts import student_text, teacher_text
from ..tasks.data import Example, record_places

__all__ = ["model_positions", "fit_positions"]

_SHOWN = 5  # places named in a skip warning


def model_positions(config) -> int | None:
    """The positions a transformers config allows (its text model's, for a multimodal one); None if it says none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def _count(tok, texts: list[str]) -> list[int]:
    """Token counts of rendered prompts, split as `prompts.encode` splits them (quietly: transformers
    warns of a text past the model's length, which is what is being measured)."""
    return [len(ids) for ids in tok(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def _lengths(cfg, tok, examples: list[Example], teacher: bool) -> list[tuple[int, str]]:
    """(longest prompt in tokens, whose: "student's" or "teacher's") per example."""
    out = []
    for start in range(0, len(examples), 512):
        part = examples[start:start + 512]
        student = _count(tok, [student_text(cfg.templates, tok, ex.question) for ex in part])
        if not teacher:
            out += [(n, "student's") for n in student]
            continue
        texts = [teacher_text(cfg.templates, tok, "reference", ex.question, ex.reference_solution) for ex in part]
        out += [(s, "student's") if s >= t else (t, "teacher's") for s, t in zip(student, _count(tok, texts))]
    return out


def _fit(cfg, tok, positions: int, examples: list[Example], key: str, teacher: bool) -> list[Example]:
    path = getattr(cfg.data, key.split(".", 1)[1])
    budget = positions - cfg.rollout.max_new_tokens
    lengths = _lengths(cfg, tok, examples, teacher)
    over = [i for i, (n, _) in enumerate(lengths) if n > budget]
    if not over:
        return examples
    m = cfg.rollout.max_new_tokens
    limit = f"past the model's {positions} positions (max_position_embeddings of model.path)"
    if cfg.data.too_long == "error":
        (place,), (n, whose) = record_places(path, over[:1]), lengths[over[0]]
        more = f"; {len(over) - 1} more questions do not fit either" if len(over) > 1 else ""
        raise ValueError(f"{key}: {place}: the {whose} prompt is {n} tokens; with rollout.max_new_tokens={m} that "
                         f"is {n + m}, {limit}{more}. Shorten the question, lower rollout.max_new_tokens, or set "
                         "data.too_long=skip to leave such questions out")
    dropped = set(over)
    kept = [ex for i, ex in enumerate(examples) if i not in dropped]
    places = ", ".join(record_places(path, over[:_SHOWN])) + (", ..." if len(over) > _SHOWN else "")
    if not kept:
        raise ValueError(f"{key}: data.too_long=skip, but every one of the {len(examples)} questions of {path} has a "
                         f"prompt that with rollout.max_new_tokens={m} is {limit}")
    logging.getLogger("fastsd").warning("data.too_long=skip: left out %d of %d questions of %s (%s), their prompt with "
                                        "rollout.max_new_tokens=%d %s: %s", len(over), len(examples), key, path, m,
                                        limit, places)
    return kept


def fit_positions(cfg, tok, positions: int | None, train: list[Example], held: list[Example]):
    """(train, held) with the questions that do not fit left out under data.too_long=skip;
    ValueError naming the key under data.too_long=error (module docstring). `positions`: the
    model's (`model_positions`); None checks nothing."""
    if positions is None:
        return train, held
    if cfg.rollout.max_new_tokens >= positions:
        raise ValueError(f"rollout.max_new_tokens: {cfg.rollout.max_new_tokens} leaves no room for a prompt in the "
                         f"model's {positions} positions (max_position_embeddings of model.path)")
    train = _fit(cfg, tok, positions, train, "data.path", teacher=cfg.condition == "reference")
    held = _fit(cfg, tok, positions, held, "data.eval_path", teacher=False)
    return train, held
