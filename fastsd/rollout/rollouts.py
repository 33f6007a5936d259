"""The step's rollout stage: k samples per question, parsed and rewarded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..feedback.prompts import encode, student_text
from ..model.dist import Dist
from ..tasks.data import Example
from ..tasks.format import ANSWER_CLOSE, Parsed, parse_response, reward
from ..tasks.grading import make_grader
from .sample import BATCH, sample

if TYPE_CHECKING:
    from ..config import TrainConfig

__all__ = ["Rollout", "rollout"]


@dataclass
class Rollout:
    example: Example
    prompt: list[int]
    response: list[int]
    parsed: Parsed
    reward: float
    group: int
    context: str | None = None  # what the teacher was given (critique or reference)
    teacher_prompt: list[int] | None = None
    advantage: float = 0.0
    trained: bool = False
    critique_error: str | None = None  # why the critic gave no usable critique
    pg: bool = False  # trained on its group advantage (grpo; a teacher condition with loss.pg_weight > 0)
    notes: dict = field(default_factory=dict)  # the condition's own record of this rollout (logged)
    sampler_logprob: list[float] | None = None  # per response token, under the sampling distribution (loss.is_clip)



def rollout(cfg: TrainConfig, d: Dist, policy, tok, examples: list[Example], k: int, temperature: float,
            progress=None, logprobs: bool = False, batch_size: int = BATCH) -> list[Rollout]:
    """k samples per example at `temperature`, parsed and rewarded; `progress`: see `rollout.sample`;
    `logprobs`: each Rollout keeps its tokens' log-probs under the sampler (`sampler_logprob`);
    `batch_size`: samples per sampler call (0: `rollout.sample`'s choice)."""
    prompts = [encode(tok, student_text(cfg.templates, tok, ex.question)) for ex in examples]
    flat = [(g, ex, p) for g, (ex, p) in enumerate(zip(examples, prompts)) for _ in range(k)]
    engine = cfg.sampler(d.device.type)
    stop_text = ANSWER_CLOSE if cfg.rollout.stop_at_answer else None
    stop = encode(tok, stop_text) if stop_text else None
    want_lp = logprobs
    responses = sample(policy, [p for _, _, p in flat], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                       temperature=temperature, top_p=cfg.rollout.top_p,
                       max_new_tokens=cfg.rollout.max_new_tokens, d=d, engine=engine, stop=stop,
                       stop_text=stop_text, progress=progress, logprobs=want_lp, batch_size=batch_size)
    responses, lps = responses if want_lp else (responses, [None] * len(responses))
    out, grader = [], make_grader(cfg.grader)
    for (g, ex, p), resp, lp in zip(flat, responses, lps):
        parsed = parse_response(tok.decode(resp, skip_special_tokens=True), cfg.format)
        out.append(Rollout(ex, p, resp, parsed, reward(parsed, ex.answer, grader), g, sampler_logprob=lp))
    return out
