"""The step's update stage: micro-batches of the trained rollouts, the loss (fused divergence,
sampled-token surrogate or GRPO's clipped policy gradient), backward, clip, optimizer step, EMA.

Every rank handles its share of the step's rollouts; collective calls (forwards, reductions)
happen the same number of times on every rank, padded with zero-weight micro-batches where a
rank has less work.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch

from ..loss import fused_linear_logprob
from ..model.batch import build_batch
from ..model.dist import Dist
from ..model.policy import ema_pairs

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..rollout import Rollout

__all__ = ["NonFiniteLossError", "update"]


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient norm was NaN/inf: the step stopped before the optimizer touched anything."""


def _pg_loss(cfg, policy, batch, scale, loss_kw, stats):
    """GRPO's clipped policy gradient on the group advantages, token-summed and scaled."""
    logp, ent = policy(batch.s_ids, batch.s_attn, batch.s_index, mode="logprob", targets=batch.targets,
                       loss_kw=loss_kw)
    stats["entropy"] += float(ent.sum()) * batch.weight
    adv = batch.advantage
    ratio = torch.exp(logp - logp.detach())  # one update per rollout: the sampling policy is this one
    eps = cfg.loss.pg_clip
    per_tok = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    return per_tok.sum() * scale


def _micro_loss(cfg, policy, teacher, batch, world, total_tokens, stats, part="distill", weight=1.0):
    """Loss of one micro-batch of `part` ("distill": the divergence or sampled-token surrogate; "pg":
    the policy gradient), scaled so that gradients sum to `weight` times the part's token mean."""
    scale = world / max(total_tokens, 1.0) * weight  # FSDP averages gradients over ranks
    loss_kw = dict(divergence=cfg.loss.divergence, temperature=cfg.loss.temperature,
                   clip=cfg.loss.clip, beta=cfg.loss.beta, return_entropy=True,
                   topk=cfg.loss.topk or None, topk_from=cfg.loss.topk_from, tail=cfg.loss.tail)
    if part == "pg":
        return _pg_loss(cfg, policy, batch, scale, loss_kw, stats)
    t_model = teacher if teacher is not None else policy
    with torch.no_grad():
        h_t = t_model(batch.t_ids, batch.t_attn, batch.t_index, mode="hidden")
    w_t = None if teacher is None else teacher.head_weight
    is_kw = None if batch.sampler_logprob is None else dict(
        sampler_logprob=batch.sampler_logprob, clip=cfg.loss.is_clip, temperature=cfg.rollout.temperature)
    if cfg.loss.kind == "sampled_token":
        out = policy(batch.s_ids, batch.s_attn, batch.s_index, mode="logprob", targets=batch.targets,
                     loss_kw=loss_kw, is_kw=is_kw)
        (s_lp, ent), weights = out if is_kw is not None else (out, None)
        _log_entropy_and_clip(stats, ent, weights, cfg.loss.is_clip, batch.weight)
        with torch.no_grad():
            t_lp = fused_linear_logprob(h_t, (w_t if w_t is not None else policy.head_weight).detach(),
                                        batch.targets, temperature=cfg.loss.temperature)
        gap = t_lp - s_lp.detach()
        stats["gap"] += float(gap.sum()) * batch.weight
        return -((gap if weights is None else gap * weights) * s_lp).sum() * scale
    out = policy(batch.s_ids, batch.s_attn, batch.s_index, mode="divergence", targets=batch.targets,
                 teacher_hidden=h_t, teacher_weight=w_t, loss_kw=loss_kw, is_kw=is_kw)
    out, weights = out if is_kw is not None else (out, None)
    _log_entropy_and_clip(stats, out.entropy, weights, cfg.loss.is_clip, batch.weight)
    # A filler micro-batch (weight 0, FSDP lock-step only) adds nothing to the logs either.
    stats["gap"] += float((out.teacher_logprob - out.student_logprob).sum()) * batch.weight
    stats["divergence"] += float(out.loss.detach()) * batch.weight
    return out.loss * scale


def _log_entropy_and_clip(stats, entropy, weights, is_clip, batch_weight):
    """The micro-batch's summed student entropy, and how many of its tokens' importance weights
    the clip cut (weights None: loss.is_clip off)."""
    stats["entropy"] += float(entropy.sum()) * batch_weight
    if weights is not None:
        stats["is_clipped"] += float((weights >= is_clip).sum()) * batch_weight


def _parts(cfg: TrainConfig, rollouts: list[Rollout]) -> list[tuple[str, float, list[Rollout]]]:
    """The step's loss terms: (part, weight, its rollouts). A teacher condition distils the rollouts
    given a teacher with weight 1 - loss.pg_weight and, when that weight is > 0, adds loss.pg_weight
    times the policy gradient on the rollouts with a group advantage (`Rollout.pg`); grpo is the
    policy gradient alone. Decided by the config, so every rank has the same parts."""
    w = cfg.loss.pg_weight if cfg.feedback_condition().teacher else 1.0
    parts = [("distill", 1.0 - w, [r for r in rollouts if r.trained])] if w < 1 else []
    return parts + ([("pg", w, [r for r in rollouts if r.pg])] if w > 0 else [])


def _batches(cfg: TrainConfig, tok, rollouts: list[Rollout], live: list[Rollout], d: Dist, part: str):
    """Micro-batches of `live` (of `rollouts`); every rank yields the same number (zero-weight fillers)."""
    mb = cfg.optim.micro_batch
    n = d.all_max((len(live) + mb - 1) // mb)
    for i in range(n):
        chunk, weight = live[i * mb:(i + 1) * mb], 1.0
        if not chunk:  # filler: keeps FSDP collectives in step; contributes nothing
            chunk, weight = [rollouts[0] if rollouts else None], 0.0
        yield _to_batch(cfg, tok, chunk, weight, d.device, part)


def _to_batch(cfg, tok, chunk, weight, device, part):
    if chunk[0] is None:
        prompts, responses, t_prompts, adv = [[tok.pad_token_id]], [[tok.pad_token_id]], [[tok.pad_token_id]], [0.0]
    else:
        prompts = [r.prompt for r in chunk]
        responses = [r.response or [tok.eos_token_id] for r in chunk]
        t_prompts = [r.teacher_prompt or r.prompt for r in chunk]
        adv = [r.advantage for r in chunk]
    batch = build_batch(prompts, responses, tok.pad_token_id, None if part == "pg" else t_prompts)
    batch = batch.to(device)
    batch.sampler_logprob = None
    if cfg.loss.is_clip is not None and part == "distill":
        lps = []  # in the order of batch.targets
        for r in chunk:
            if r is not None and r.response and r.sampler_logprob is not None:
                lps += r.sampler_logprob
            else:  # a filler, or an empty response trained on EOS: no sampler record, NaN (weight 1)
                lps += [float("nan")] * (len(r.response) if r is not None and r.response else 1)
        batch.sampler_logprob = torch.tensor(lps, dtype=torch.float32, device=device)
    batch.advantage = torch.tensor(adv, device=device)[batch.row] * weight
    batch.weight = weight
    return batch


def update(cfg, d: Dist, policy, teacher, opt, sched, tok, rollouts, step: int) -> dict:
    parts = _parts(cfg, rollouts)
    used = {id(r) for _, _, live in parts for r in live}
    *totals, total_tokens = d.all_sum(*(float(sum(len(r.response) for r in live)) for _, _, live in parts),
                                      float(sum(len(r.response) for r in rollouts if id(r) in used)))
    if total_tokens == 0:  # nothing to learn from (every grpo group had one reward): no AdamW step,
        with warnings.catch_warnings():  # which would still move the weights by momentum and decay
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
            sched.step()  # the schedule counts training steps
        return {"loss_tokens": 0.0, "grad_norm": 0.0, "gap": 0.0, "divergence": None, "entropy": None,
                "is_clipped": None}
    stats = {"gap": 0.0, "divergence": 0.0, "entropy": 0.0, "is_clipped": 0.0}
    if teacher is not None and d.enabled:
        teacher.unshard()  # the teacher head must be a plain tensor inside the student's forward
    # The logs' means are over the first term with tokens (the distilled ones, or grpo's): a blend counts each once.
    first, denom = next((part, total) for (part, _, _), total in zip(parts, totals) if total > 0)
    try:
        i = 0
        for (part, weight, live), total in zip(parts, totals):
            if total == 0:  # a term with no tokens on any rank adds nothing
                continue
            for batch in _batches(cfg, tok, rollouts, live, d, part):
                logged = stats if part == first else {k: 0.0 for k in stats}
                loss = _micro_loss(cfg, policy, teacher, batch, d.world, total, logged, part, weight) * batch.weight
                i += 1
                (finite,) = d.all_sum(float(torch.isfinite(loss.detach()).all()))
                if finite < d.world:
                    opt.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(f"step {step + 1}: non-finite loss in micro-batch {i}; "
                                             "the step was stopped before the optimizer step, parameters unchanged")
                loss.backward()
    finally:
        if teacher is not None and d.enabled:
            teacher.reshard()
    params = [p for p in policy.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not math.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"step {step + 1}: non-finite gradient norm; parameters unchanged")
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if teacher is not None and cfg.teacher.kind == "ema":  # LoRA: the ema adapter only
        with torch.no_grad():
            for p_t, p_s in ema_pairs(teacher, policy):
                p_t.lerp_(p_s.detach(), 1.0 - cfg.teacher.ema_rate)
    gap, div, ent, cut = d.all_sum(stats["gap"], stats["divergence"], stats["entropy"], stats["is_clipped"])
    distilled = first == "distill"
    return {"loss_tokens": total_tokens, "grad_norm": norm, "gap": gap / denom,
            "divergence": div / denom if distilled and cfg.loss.kind == "divergence" else None,
            "entropy": ent / denom,
            "is_clipped": cut / denom if cfg.loss.is_clip is not None and distilled else None}
