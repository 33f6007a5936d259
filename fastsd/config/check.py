"""Validation of a loaded `fastsd.config.tree.TrainConfig`: every user error a ValueError that starts
with the dotted key; options the condition ignores logged as warnings; auto values resolved
(loss.divergence), so that the saved config says what ran."""

from __future__ import annotations

import logging
import re

from ..feedback.critic_prompt import load_prompt
from ..feedback.critic_transport import bounds
from ..feedback.prompts import TEMPLATE_FIELDS, check_template
from ..feedback.registry import get_condition
from .tree import TrainConfig

__all__ = ["LORA_FROM_PATH", "check"]

# What an adapter loaded from model.lora.path brings with it (its adapter_config.json).
LORA_FROM_PATH = ("r", "alpha", "dropout", "target_modules")


def _check_answers(cfg: TrainConfig) -> None:
    """format, grader and data.fields."""
    f = cfg.data.fields
    for key in ("question", "answer"):
        if not getattr(f, key).strip():
            raise ValueError(f"data.fields.{key}: must name a column, got {getattr(f, key)!r}")
    if f.question == f.answer:
        raise ValueError(f"data.fields.answer: the same column as data.fields.question ({f.answer!r})")
    get_condition(cfg).check()  # a user condition is imported here: before the model loads
    if cfg.format != "steps" and cfg.rollout.stop_at_answer:
        raise ValueError(f"rollout.stop_at_answer: only with format=steps (it stops at </answer>), got format={cfg.format}")


def check(cfg: TrainConfig) -> None:
    _check_answers(cfg)
    positive = {"steps": cfg.steps, "questions_per_step": cfg.questions_per_step,
                "rollout.max_new_tokens": cfg.rollout.max_new_tokens, "optim.micro_batch": cfg.optim.micro_batch,
                "eval.k": cfg.eval.k, "checkpoint.keep": cfg.checkpoint.keep, "log_every": cfg.log_every}
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"{key}: must be >= 1, got {value}")
    nonneg = {"rollout.group_size": cfg.rollout.group_size, "optim.warmup_steps": cfg.optim.warmup_steps,
              "eval.every": cfg.eval.every, "checkpoint.every": cfg.checkpoint.every, "optim.grad_clip": cfg.optim.grad_clip,
              "checkpoint.stop_timeout": cfg.checkpoint.stop_timeout, "log.samples": cfg.log.samples,
              "eval.batch_size": cfg.eval.batch_size}
    for key, value in nonneg.items():
        if value < 0:
            raise ValueError(f"{key}: must be >= 0, got {value}")
    if len(set(cfg.log.report_to)) < len(cfg.log.report_to):
        raise ValueError(f"log.report_to: a tracker named twice in {cfg.log.report_to}")
    for key, value in {"seed": cfg.seed, "data.seed": cfg.data.seed}.items():
        if not 0 <= value < 2**31:  # torch, numpy and vLLM seed from it, with an offset per rank added
            raise ValueError(f"{key}: must be in [0, 2**31), got {value}")
    if cfg.data.path == "builtin" and cfg.data.train_size < 1:
        raise ValueError(f"data.train_size: must be >= 1, got {cfg.data.train_size}")
    if cfg.data.eval_path == "builtin" and cfg.data.eval_size < 1:
        raise ValueError(f"data.eval_size: must be >= 1, got {cfg.data.eval_size}")
    if cfg.optim.weight_decay < 0:
        raise ValueError(f"optim.weight_decay: must be >= 0, got {cfg.optim.weight_decay}")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ValueError(f"optim.betas: each must be in [0, 1), got {list(cfg.optim.betas)}")
    for key, value in {"rollout.temperature": cfg.rollout.temperature, "loss.temperature": cfg.loss.temperature,
                       "eval.temperature": cfg.eval.temperature, "optim.lr": cfg.optim.lr}.items():
        if not value > 0:
            raise ValueError(f"{key}: must be > 0, got {value}")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ValueError(f"rollout.top_p: must be in (0, 1], got {cfg.rollout.top_p}")
    if cfg.loss.divergence == "auto":  # resolved here, so the saved config says what ran
        cfg.loss.divergence = "reverse_kl" if cfg.model.path == "builtin" else "forward_kl"
    if cfg.loss.topk < 0:
        raise ValueError(f"loss.topk: must be >= 0 (0: the full vocabulary), got {cfg.loss.topk}")
    if cfg.loss.clip is not None and not cfg.loss.clip > 0:
        raise ValueError(f"loss.clip: must be > 0 (or none), got {cfg.loss.clip}")
    if not cfg.loss.pg_clip > 0:
        raise ValueError(f"loss.pg_clip: must be > 0, got {cfg.loss.pg_clip}")
    if not 0 <= cfg.loss.beta <= 1:
        raise ValueError(f"loss.beta: must be in [0, 1], got {cfg.loss.beta}")
    _check_is_clip(cfg)
    if not 0 <= cfg.teacher.ema_rate < 1:
        raise ValueError(f"teacher.ema_rate: must be in [0, 1), got {cfg.teacher.ema_rate}")
    _check_lora(cfg)
    r = cfg.rollout
    if not 0 < r.vllm_gpu_memory <= 1:
        raise ValueError(f"rollout.vllm_gpu_memory: must be in (0, 1], got {r.vllm_gpu_memory}")
    if r.vllm_kv_cache_gib is not None and not r.vllm_kv_cache_gib > 0:
        raise ValueError(f"rollout.vllm_kv_cache_gib: must be > 0 (or null), got {r.vllm_kv_cache_gib}")
    c = cfg.critic
    for name in ("timeout", "step_timeout", "concurrency", "max_tokens", "max_reply_bytes"):
        if getattr(c, name) is not None and not getattr(c, name) > 0:
            raise ValueError(f"critic.{name}: must be > 0{'' if name in ('concurrency', 'max_tokens') else ' (or null)'}, "
                             f"got {getattr(c, name)}")
    c.timeout, c.step_timeout, c.max_reply_bytes = bounds(c)  # resolved here, so the saved config says what ran
    _check_api_key_env(c.api_key_env)
    for name in ("retries", "backoff", "max_failed_steps"):
        if getattr(c, name) < 0:
            raise ValueError(f"critic.{name}: must be >= 0, got {getattr(c, name)}")
    if c.kind == "http" and not c.base_url.startswith(("http://", "https://")):
        raise ValueError(f"critic.base_url: expected http://HOST:PORT/v1 or https://..., got {c.base_url!r}")
    cond = get_condition(cfg)
    if cfg.group_size < cond.min_group_size:
        raise ValueError(f"rollout.group_size: {cfg.condition} needs at least {cond.min_group_size} rollouts per "
                         f"question, got {cfg.group_size}")
    if not 0 <= cfg.loss.pg_weight <= 1:
        raise ValueError(f"loss.pg_weight: must be in [0, 1], got {cfg.loss.pg_weight}")
    if cond.teacher and cfg.loss.pg_weight > 0 and cfg.group_size < 2:
        raise ValueError(f"rollout.group_size: loss.pg_weight > 0 needs group advantages, so at least 2 rollouts "
                         f"per question, got {cfg.group_size}")
    # Options the condition ignores: said, not refused (tools pass one set of options to every condition).
    unused = []
    if not cond.teacher and cfg.teacher.kind != "initial":
        unused.append(f"teacher.kind={cfg.teacher.kind} ({cfg.condition} has no teacher)")
    if not cond.teacher and cfg.loss.kind != "divergence":
        unused.append(f"loss.kind={cfg.loss.kind} ({cfg.condition} trains on rewards)")
    if not cond.teacher and cfg.loss.topk:
        unused.append(f"loss.topk={cfg.loss.topk} ({cfg.condition} trains on rewards)")
    if not cond.teacher and cfg.loss.is_clip is not None:
        unused.append(f"loss.is_clip={cfg.loss.is_clip} ({cfg.condition}'s ratio is to the policy itself)")
    if not cond.uses_critic() and cfg.critic.kind != "builtin":
        unused.append(f"critic.kind={cfg.critic.kind} (condition={cfg.condition} uses no critic)")
    for text in unused:
        logging.getLogger("fastsd").warning("condition=%s ignores %s", cfg.condition, text)
    if cond.teacher and cfg.loss.kind == "sampled_token" and cfg.loss.topk:
        logging.getLogger("fastsd").warning("loss.kind=sampled_token ignores loss.topk=%d (it uses no divergence)",
                                            cfg.loss.topk)
    _check_templates(cfg)
    _check_critic_prompt(cfg)


# An environment variable's name, as a shell writes one; and the openings of common API keys.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_PREFIXES = ("sk-", "sk_", "hf_", "gsk_", "xai-", "pk-", "rk-", "ghp_", "glpat-", "AKIA", "AIza")


def _check_api_key_env(name: str) -> None:
    """critic.api_key_env names a variable; a value that looks like a key itself is refused without
    being shown (it is in no message, and no config.yaml is written for a config that fails here)."""
    if not name:
        return
    long_token = len(name) >= 32 and "_" not in name and any(ch.isdigit() for ch in name)
    if not _ENV_NAME.fullmatch(name) or name.startswith(_KEY_PREFIXES) or long_token:
        raise ValueError(f"critic.api_key_env: the value ({len(name)} characters, not shown) looks like an API key, "
                         "not the name of an environment variable; put the key in a variable (export "
                         "FASTSD_CRITIC_API_KEY=...) and name the variable here, or leave the default")


def _check_is_clip(cfg: TrainConfig) -> None:
    """loss.is_clip: a positive clip, over log-probs the trainer can compute again (the sampler's
    are of softmax(logits / rollout.temperature), renormalised to the top-p nucleus)."""
    if cfg.loss.is_clip is None:
        return
    if not cfg.loss.is_clip > 0:
        raise ValueError(f"loss.is_clip: must be > 0 (or none), got {cfg.loss.is_clip}")
    if cfg.rollout.top_p < 1:
        raise ValueError(f"loss.is_clip: needs rollout.top_p=1 (the sampler's log-probs are renormalised to the "
                         f"nucleus, the trainer's are not), got rollout.top_p={cfg.rollout.top_p}")


def _check_templates(cfg: TrainConfig) -> None:
    for name, fields in TEMPLATE_FIELDS.items():
        check_template(f"templates.{name}", getattr(cfg.templates, name), fields)


def _check_critic_prompt(cfg: TrainConfig) -> None:
    reserved = sorted(set(cfg.critic.extra_body) & {"model", "messages", "stream"})
    if reserved:
        raise ValueError(f"critic.extra_body: {reserved} are set by fastsd (critic.model, the prompt); "
                         "remove them from extra_body")
    if cfg.critic.prompt_file:
        load_prompt(cfg.critic.prompt_file)


def _check_lora(cfg: TrainConfig) -> None:
    lo = cfg.model.lora
    if lo.r < 0:
        raise ValueError(f"model.lora.r: must be >= 0 (0: full fine-tuning), got {lo.r}")
    if lo.alpha is not None and not lo.alpha > 0:
        raise ValueError(f"model.lora.alpha: must be > 0 (or none: 2 * r), got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        raise ValueError(f"model.lora.dropout: must be in [0, 1), got {lo.dropout}")
    if not lo.target_modules or not all(t.strip() for t in lo.target_modules):
        raise ValueError(f"model.lora.target_modules: expected module names, got {lo.target_modules}")
    if lo.path:  # the adapter's own config sets these: said, as other unused options are
        default = type(lo)()
        set_here = [f"model.lora.{k}={getattr(lo, k)}" for k in LORA_FROM_PATH if getattr(lo, k) != getattr(default, k)]
        if set_here:
            logging.getLogger("fastsd").warning("model.lora.path sets the adapter's r, alpha, dropout and target "
                                                "modules: %s ignored", ", ".join(set_here))
    heads = sorted({"lm_head", "embed_tokens"} & {t.rsplit(".", 1)[-1] for t in lo.target_modules})
    if heads and (lo.r or lo.path):
        raise ValueError(f"model.lora.target_modules: {heads} cannot be adapted: the fused loss reads the "
                         "base head weight, and the head is tied to the embeddings in most small models")
