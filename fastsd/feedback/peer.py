"""condition=peer: SDPO's teacher context, a correct sibling rollout as a demonstration.

G rollouts per question (default 8). The teacher of each rollout reads the question, then the
response of a correct sibling (reward >= peer.success, by the grader) as a demonstration: the
FIRST correct sibling in sampling order that is not the rollout itself. A rollout never reads
itself, so a correct rollout is taught only when another sibling is correct too. With
peer.feedback the teacher also reads feedback on the rollout's own attempt: the grader's verdict
or the critic's critique (peer.feedback_template). A rollout with no correct sibling gets
peer.fallback: no teacher (no loss; counted), the reference solution (templates.reference) or
the critic's critique (templates.critique).

The demonstration is the sibling's decoded response, with <think>...</think> removed on request
(peer.strip_thinking); then it, and the feedback, are each cut to their first
peer.max_demo_tokens tokens. The question and the template's own text are never cut, and the
student's sampled ids follow the rendered prompt unchanged (fastsd.model.batch).

Logged per step: peer_groups_solved (share of groups with a correct rollout), peer_demo,
peer_fallback and peer_no_teacher (shares of rollouts; they add up to 1), peer_feedback (share of
rollouts whose teacher read feedback).
"""

from __future__ import annotations

import re

from .condition import Condition, by_group, register
from .prompts import CRITIQUE_PLACEHOLDER, check_template, encode, fill, render_teacher

__all__ = ["Peer", "strip_thinking"]

_THINK = re.compile(r"<think>.*?</think>\s*", re.S)
_OPEN_THINK = re.compile(r"<think>.*\Z", re.S)
DEMO_PLACEHOLDER = "[a correct sibling rollout's response]"


def strip_thinking(text: str) -> str:
    """`text` without its <think>...</think> blocks (and an unclosed <think> to the end)."""
    return _OPEN_THINK.sub("", _THINK.sub("", text))


def _first_tokens(tok, text: str, n: int) -> str:
    """`text` cut to its first `n` tokens (n = 0: whole)."""
    ids = encode(tok, text)
    return text if not n or len(ids) <= n else tok.decode(ids[:n])


@register
class Peer(Condition):
    name = "peer"
    group_size = 8
    min_group_size = 2
    field = "demonstration"

    def template(self):
        return self.cfg.peer.template

    def uses_critic(self):
        return "critique" in (self.cfg.peer.feedback, self.cfg.peer.fallback)

    def keys(self):
        fb = self.cfg.peer.fallback
        return ("peer",) + (f"templates.{fb}",) * (fb != "none") + ("critic",) * self.uses_critic()

    def required_fields(self):
        return ("reference_solution",) if self.cfg.peer.fallback == "reference" else ()

    def check(self):
        p = self.cfg.peer
        check_template("peer.template", p.template, ("question", "demonstration", "feedback"),
                       required=("question", "demonstration"))
        if p.feedback != "none":
            check_template("peer.feedback_template", p.feedback_template, ("feedback",))
            if "{feedback}" not in p.template:
                raise ValueError(f"peer.template: peer.feedback={p.feedback} needs {{feedback}} in the template: "
                                 f"{p.template!r}")
        if p.max_demo_tokens < 0:
            raise ValueError(f"peer.max_demo_tokens: must be >= 0 (0: no bound), got {p.max_demo_tokens}")
        if p.fallback == "reference" and not self.cfg.data.fields.reference_solution.strip():
            raise ValueError("peer.fallback: reference needs a column of reference solutions "
                             "(data.fields.reference_solution is empty)")

    def feedback(self, tok, rollouts, critic) -> None:
        p, groups = self.cfg.peer, by_group(rollouts)
        for r, crit in zip(rollouts, self.critiques(rollouts, critic)):
            # By position, never by value: two siblings may have sampled the same response.
            index = next((i for i, s in enumerate(groups[r.group]) if s is not r and s.reward >= p.success), None)
            if index is None:
                self._fallback(tok, r, crit)
                continue
            text = tok.decode(groups[r.group][index].response, skip_special_tokens=True)
            text = _first_tokens(tok, strip_thinking(text) if p.strip_thinking else text, p.max_demo_tokens)
            said = self._said(r, crit)
            feedback = "" if said is None else fill(p.feedback_template,
                                                    {"feedback": _first_tokens(tok, said, p.max_demo_tokens)})
            r.notes = {"peer": "demonstration", "demo_index": index, "feedback": said is not None}
            r.context = text
            r.teacher_prompt = encode(tok, render_teacher(self.cfg.templates, tok, p.template, {
                "question": r.example.question, "demonstration": text, "feedback": feedback}))
            r.trained = len(r.response) > 0

    def _said(self, r, crit) -> str | None:
        """The feedback on `r`'s own attempt (None: none, or the critique failed)."""
        kind = self.cfg.peer.feedback
        if kind == "verdict":
            right = "right" if r.reward >= self.cfg.peer.success else "wrong"
            return "no final answer" if r.parsed.answer is None else f"the answer {r.parsed.answer} is {right}"
        if kind == "critique" and crit.ok:
            return crit.text
        return None

    def _fallback(self, tok, r, crit) -> None:
        kind = self.cfg.peer.fallback
        if kind == "reference" and r.example.reference_solution is not None:
            self.teach(tok, r, r.example.reference_solution, self.cfg.templates.reference, "reference")
        elif kind == "critique" and crit.ok:
            self.teach(tok, r, crit.text, self.cfg.templates.critique, "critique")
        r.notes = {"peer": "fallback" if r.teacher_prompt is not None else "none"}

    def example_text(self, tok, example) -> str:
        kind = self.cfg.peer.feedback
        said = {"none": None, "verdict": "the answer 0 is wrong", "critique": CRITIQUE_PLACEHOLDER}[kind]
        feedback = "" if said is None else fill(self.cfg.peer.feedback_template, {"feedback": said})
        return render_teacher(self.cfg.templates, tok, self.cfg.peer.template, {
            "question": example.question, "demonstration": DEMO_PLACEHOLDER, "feedback": feedback})

    def counters(self, rollouts):
        n, got = len(rollouts), [r.notes.get("peer") for r in rollouts]
        groups = by_group(rollouts).values()
        out = {"peer_groups_solved": (sum(any(s.reward >= self.cfg.peer.success for s in g) for g in groups),
                                      len(groups)),
               "peer_demo": (got.count("demonstration"), n), "peer_fallback": (got.count("fallback"), n),
               "peer_no_teacher": (got.count("none"), n),
               "peer_feedback": (sum(bool(r.notes.get("feedback")) for r in rollouts), n)}
        if self.uses_critic():
            out["critique_failed"] = (sum(bool(r.critique_error) for r in rollouts), None)
        return out
