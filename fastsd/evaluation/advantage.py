"""Per-token advantage A_t = log p_teacher(y_t | x, c, y<t) - log p_student(y_t | x, y<t), and
where in a rollout it falls.

`token_advantages` reads both log-probs from the fused loss (`fused_linear_divergence` with
`target_ids`), the way training sees them. `segments` labels each response token by the step it
belongs to, relative to the rollout's first wrong step (known exactly on the built-in task):

    before       a step before the first wrong one, in a rollout with a wrong step
    first_wrong  the first wrong step (its tag, content and closing tag)
    after        everything after it: later steps, the answer, the end-of-sequence token
    correct      any token of a fully correct rollout (every step right, right answer)
    other        rollouts with no wrong step but no right answer (cut off, answer miscopied)

Steps are counted in order of appearance, as `fastsd.tasks.format.parse_response` counts them (so a
misnumbered or unclosed step tag still starts a step); a cut-off last step is a step like any
other (the built-in critic judges it wrong unless it is complete and right).

A token belongs to the step whose opening tag is the last one at or before the token's first
character; text before the first step counts as `before` (or `correct`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..loss.api import fused_linear_divergence
from ..model.batch import build_batch
from ..tasks.format import parse_response

__all__ = ["SEGMENTS", "token_spans", "token_steps", "segments", "token_advantages", "aggregate"]

SEGMENTS = ("before", "first_wrong", "after", "correct", "other")
_OPEN = re.compile(r"<step_\d+>|<answer>")


def token_spans(tok, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span of each token in `tok.decode(ids)` (from the decoded prefixes)."""
    spans, prev = [], 0
    for i in range(len(ids)):
        end = len(tok.decode(list(ids[: i + 1]), skip_special_tokens=True))
        spans.append((prev, max(end, prev)))
        prev = max(end, prev)
    return spans


def token_steps(text: str, spans: list[tuple[int, int]]) -> list[int]:
    """Which part of `text` each token starts in: 0 before the first step tag, k in step k
    (1-based, in order of appearance), n + 1 from the answer tag on (n steps)."""
    tags = [(m.start(), m.group() == "<answer>") for m in _OPEN.finditer(text)]
    out = []
    for a, _ in spans:
        k, answer = 0, False
        for pos, is_answer in tags:
            if pos > a:
                break
            k, answer = (k, True) if is_answer else (k + 1, False)
        out.append(k + 1 if answer else k)
    return out


def segments(text: str, spans: list[tuple[int, int]], first_error: int | None, correct: bool) -> list[str]:
    """One label from SEGMENTS per token (see the module docstring).

    `first_error`: index of the first wrong step among the parsed steps (None: no wrong step);
    `correct`: the rollout earned its reward."""
    parsed = parse_response(text)
    if correct and first_error is None:
        return ["correct"] * len(spans)
    if first_error is None or first_error >= len(parsed.steps):
        return ["other"] * len(spans)
    wrong = first_error + 1
    return ["before" if k < wrong else "first_wrong" if k == wrong else "after" for k in token_steps(text, spans)]


@torch.no_grad()
def token_advantages(student, teacher, pad_id: int, prompts: list[list[int]], teacher_prompts: list[list[int]],
                     responses: list[list[int]], batch_size: int = 32) -> list[torch.Tensor]:
    """A_t per response token (float32 CPU tensors, one per rollout) for `Policy` objects
    `student` and `teacher` (they may be the same model)."""
    out: list[torch.Tensor] = []
    for i in range(0, len(responses), batch_size):
        sl = slice(i, i + batch_size)
        resp = responses[sl]
        if not any(resp):
            out += [torch.zeros(0) for _ in resp]
            continue
        b = build_batch(prompts[sl], resp, pad_id, teacher_prompts[sl])
        device = student.head_weight.device
        b = b.to(device)
        h_s = student(b.s_ids, b.s_attn, b.s_index, mode="hidden")
        h_t = teacher(b.t_ids, b.t_attn, b.t_index, mode="hidden")
        w_t = None if teacher is student else teacher.head_weight
        o = fused_linear_divergence(h_s, student.head_weight, h_t.to(h_s.dtype), w_t, target_ids=b.targets,
                                    reduction="none")
        adv = (o.teacher_logprob - o.student_logprob).float().cpu()
        out += list(adv.split([len(r) for r in resp]))
    return out


def aggregate(advantages: list[torch.Tensor], labels: list[list[str]]) -> dict:
    """Summary figures over many rollouts.

    mean_<segment>: mean A_t over the tokens of that segment (None if there are none);
    first_wrong_abs_share: share of the total |A_t| of rollouts with a wrong step that falls on
        their first wrong step;
    correct_negative_share: share of all negative A_t (the sum of min(A_t, 0) over every token)
        that falls on fully correct rollouts;
    tokens_<segment> and rollouts_<kind> counts.
    """
    by = {s: [] for s in SEGMENTS}
    rollouts = {"correct": 0, "wrong_step": 0, "other": 0}
    for adv, lab in zip(advantages, labels):
        if len(adv) != len(lab):
            raise ValueError(f"labels: expected one per token ({len(adv)}), got {len(lab)}")
        for a, s in zip(adv.tolist(), lab):
            by[s].append(a)
        kind = "correct" if "correct" in lab else "wrong_step" if "first_wrong" in lab or "before" in lab else "other"
        rollouts[kind] += 1
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    out = {f"mean_{s}": mean(by[s]) for s in SEGMENTS}
    wrong_abs = sum(abs(a) for s in ("before", "first_wrong", "after") for a in by[s])
    out["first_wrong_abs_share"] = sum(abs(a) for a in by["first_wrong"]) / wrong_abs if wrong_abs else None
    negative = sum(min(a, 0.0) for xs in by.values() for a in xs)
    out["correct_negative_share"] = sum(min(a, 0.0) for a in by["correct"]) / negative if negative else None
    out.update({f"tokens_{s}": len(by[s]) for s in SEGMENTS})
    out.update({f"rollouts_{k}": v for k, v in rollouts.items()})
    return out
