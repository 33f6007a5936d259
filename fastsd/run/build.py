"""What a run is made of, built from its config: models, optimizer, critic (data: `fastsd.tasks.data.load_data`)."""

from __future__ import annotations

import copy
import logging
import math

import torch

from ..config import TrainConfig
from ..feedback.critic import ArithCritic
from ..feedback.registry import get_condition
from ..model.dist import Dist
from ..model.load import DEFAULT_MODEL_DIR, load_model_and_tokenizer
from ..model.lora import add_adapter_copy, apply_lora, trainable_summary
from ..model.policy import AdapterTeacher, Policy, apply_liger, shard
from ..rollout.engine import RolloutEngine
from ..tasks.data import key_error

__all__ = ["build_models", "build_optim", "build_critic", "resume_optim"]

log = logging.getLogger("fastsd")


def _dtype(cfg: TrainConfig) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.float32  # bf16 on CUDA comes from FSDP mixed precision / autocast
    return getattr(torch, cfg.model.dtype)


def build_models(cfg: TrainConfig, d: Dist):
    """The policy, its teacher (None: the policy itself, without gradient) and the tokenizer.

    Full fine-tuning: teacher=initial and ema are a second, frozen copy of the model. LoRA
    (model.lora.r > 0 or model.lora.path): the teacher is the policy's own module under another
    adapter (`AdapterTeacher`): initial = the adapter off (a fresh adapter starts as the base, so
    that is step 0; one loaded from model.lora.path is kept as a frozen copy instead), current =
    the live adapter, ema = an averaged copy of the adapter. No second model either way."""
    path = DEFAULT_MODEL_DIR if cfg.model.path == "builtin" else cfg.model.path
    try:
        lm, tok = load_model_and_tokenizer(path, dtype=_dtype(cfg))
    except ValueError as e:
        raise key_error("model.path", e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    lm.to(d.device)
    if d.device.type == "cuda" and cfg.model.liger:
        apply_liger(lm)  # before LoRA: liger patches the base modules' forwards
    lo = cfg.model.lora
    lora = bool(lo.r or lo.path)
    if lora:
        lm = apply_lora(lm, lo)  # the adapter is made on the base weights' device
    if cfg.model.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = True
    wants_teacher = get_condition(cfg).teacher
    teacher_lm = None
    if wants_teacher and not lora and cfg.teacher.kind in ("initial", "ema"):
        teacher_lm = copy.deepcopy(lm).eval().requires_grad_(False)
    adapter = None
    if wants_teacher and lora:
        adapter = {"initial": "initial" if lo.path else None, "current": "default", "ema": "ema"}[cfg.teacher.kind]
        if adapter in ("initial", "ema"):
            add_adapter_copy(lm, adapter)
    # dtype=auto on CUDA: bf16 compute over fp32 parameters, by FSDP2's mixed precision under
    # torchrun and by autocast in a single process.
    mixed = d.device.type == "cuda" and cfg.model.dtype == "auto"
    autocast = torch.bfloat16 if mixed and not d.enabled else None
    policy = Policy(lm, autocast)
    teacher = None if teacher_lm is None else Policy(teacher_lm, autocast)
    if lora and wants_teacher:
        teacher = AdapterTeacher(policy, adapter)
    if d.main:
        what = f"LoRA r={lm.peft_config['default'].r}" if lora else "full fine-tuning"
        log.info("model: %s, %s", what, trainable_summary(lm))
    if d.enabled:
        shard(policy, mixed_precision=mixed)
        if teacher_lm is not None:
            shard(teacher, mixed_precision=mixed)
    _rollout_engine(cfg, d, policy, path, torch.bfloat16 if mixed else _dtype(cfg))
    return policy, teacher, tok


def _rollout_engine(cfg: TrainConfig, d: Dist, policy: Policy, path, dtype: torch.dtype) -> None:
    """Say which sampler runs (and why not vLLM, when auto passed it over); start vLLM's engine
    as `policy.vllm` when it is the one."""
    engine = cfg.sampler(d.device.type)
    if d.main:
        passed_over = cfg.rollout.engine == "auto" and engine == "fastsd" and d.device.type == "cuda"
        why = f" (not vllm: {cfg.vllm_unusable()})" if passed_over else ""
        if engine == "fastsd" and d.device.type != "cuda":  # which eager step decodes
            written = RolloutEngine.written_by_default(policy.lm)
            why += ", eager, " + ("the written decode step" if written else "transformers' forward")
        log.info("rollouts: %s%s", engine, why)
    if engine == "vllm":
        from ..rollout.vllm_engine import VllmEngine, lora_unsupported

        why = lora_unsupported(policy.lm) if hasattr(policy.lm, "peft_config") else None
        if why:
            raise ValueError(f"model.lora.path: {why}; set rollout.engine=fastsd or generate")
        r = cfg.rollout
        eager = d.device.type != "cuda" if r.vllm_eager is None else r.vllm_eager
        policy.vllm = VllmEngine(path, d, dtype=dtype, seed=cfg.seed, kv_cache_gib=r.vllm_kv_cache_gib,
                                 gpu_memory=r.vllm_gpu_memory, eager=eager)


def build_optim(cfg: TrainConfig, policy: Policy):
    o = cfg.optim
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=o.lr,
                            betas=o.betas, weight_decay=o.weight_decay)

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        frac = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[o.schedule]

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def resume_optim(cfg: TrainConfig, opt, sched) -> None:
    """After a checkpoint loaded: the config's optimizer settings take effect over the saved ones
    (lr, betas, weight decay, and the schedule's shape, warm-up and length, whose factor is the
    config's); the moments and the step count stay. Unchanged settings give the rate the run
    would have had (the same product LambdaLR forms), so a plain resume stays bitwise."""
    o = cfg.optim
    for group in opt.param_groups:
        group.update(betas=tuple(o.betas), weight_decay=o.weight_decay, initial_lr=o.lr)
    state = sched.state_dict()
    state["base_lrs"] = [o.lr for _ in opt.param_groups]
    state["_last_lr"] = [o.lr * fn(sched.last_epoch) for fn in sched.lr_lambdas]
    sched.load_state_dict(state)
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):
        group["lr"] = lr


def build_critic(cfg: TrainConfig, d: Dist):
    """The critic of a condition that uses one (critique; peer with peer.feedback or peer.fallback
    critique), None otherwise; an http critic caches in the run directory."""
    if not get_condition(cfg).uses_critic():
        return None
    if cfg.critic.kind == "builtin":
        return ArithCritic()
    from ..feedback.http_critic import HttpCritic
    from ..tasks.grading import make_grader

    return HttpCritic(cfg.critic, cache_dir=f"{cfg.run_dir}/critic_cache", rank=d.rank, grader=make_grader(cfg.grader),
                      fmt=cfg.format)
