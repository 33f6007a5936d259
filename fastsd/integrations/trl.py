"""fastsd's fused divergence inside TRL's self-distillation (SDPO, SDFT) and GKD trainers.

    from fastsd.integrations.trl import use_fastsd_loss
    use_fastsd_loss(trainer)        # before trainer.train(); returns the trainer

The trainer's models then return their last hidden state (their forward is asked for the logits
of one position only), and `fastsd.fused_linear_divergence` / `fused_linear_logprob` compute the
divergence from it and the lm_head weight, chunked, so no [B, T, V] logits exist. Every TRL
option that changes the loss is either mapped (alpha / beta, temperature, top-k and its tail, the
importance-sampling clip, the normalisation) or refused here, before any work, with a ValueError
naming it. Only the loss hooks are replaced, on this instance: for SDPO / SDFT the teacher and
student forwards (`_compute_teacher_student_logits`, whose masks stay TRL's) and the divergence
(`_compute_self_distillation_loss`); for GKD `compute_loss`. Rollouts, rewards, the teacher's
updates and the optimizer stay TRL's. See docs/trl.md.
"""

from __future__ import annotations

import inspect
import types
import warnings
from dataclasses import dataclass

import torch

from ..loss import fused_linear_divergence, fused_linear_logprob
from ..loss.topk import check_topk
from ..model.lora import base_model

TESTED_TRL = (">=1.16", "<1.17")  # the range of the fastsd[trl] extra; the hooks below are TRL's private methods
SD_HOOKS = ("_compute_teacher_student_logits", "_compute_self_distillation_loss", "_forward_logits")


@dataclass
class _Head:
    """What TRL's logits become here: the hidden states feeding lm_head, and its weight."""

    hidden: torch.Tensor  # [B, T, D], aligned to the tokens as TRL's logits would be
    weight: torch.Tensor  # [V, D]


def use_fastsd_loss(trainer, *, backend: str | None = None, chunk_size: int | None = None):
    """Make `trainer` (TRL's SDPOTrainer, SDFTTrainer or GKDTrainer) compute its divergence with
    fastsd's fused op. `backend` / `chunk_size` go to the fused op (default: triton on CUDA, torch
    elsewhere; chunk from the workspace). Raises ValueError naming the TRL option fastsd has no
    equivalent for, TypeError for another trainer."""
    kind = _kind(trainer)
    _check_version()
    _check_placement(trainer)
    for name in ("model", "teacher_model"):
        _check_model(trainer, getattr(trainer, name), name)
    trainer._fastsd_options = dict(backend=backend, chunk_size=chunk_size)
    if kind == "gkd":
        _check_gkd(trainer)
        trainer.compute_loss = types.MethodType(_gkd_compute_loss, trainer)
    else:
        _check_self_distillation(trainer)
        trainer._compute_teacher_student_logits = types.MethodType(_teacher_student_hidden, trainer)
        trainer._compute_self_distillation_loss = types.MethodType(_self_distillation_loss, trainer)
    return trainer


def _kind(trainer) -> str:
    names = {cls.__name__ for cls in type(trainer).__mro__}
    if "GKDTrainer" in names:
        return "gkd"
    if names & {"SDPOTrainer", "SDFTTrainer"}:
        missing = [h for h in SD_HOOKS if not hasattr(trainer, h)]
        if missing:
            raise TypeError(f"trainer: {type(trainer).__name__} lacks {missing}; this TRL version is not supported "
                            f"(tested: trl{','.join(TESTED_TRL)})")
        return "self_distillation"
    raise TypeError(f"trainer: expected TRL's SDPOTrainer, SDFTTrainer or GKDTrainer, got {type(trainer).__name__}")


def _check_version() -> None:
    import trl
    from packaging.version import Version

    v = Version(trl.__version__)
    if not (Version(TESTED_TRL[0][2:]) <= v < Version(TESTED_TRL[1][1:])):
        warnings.warn(f"fastsd.integrations.trl is tested with trl{','.join(TESTED_TRL)}, found {trl.__version__}",
                      stacklevel=3)


def _check_placement(trainer) -> None:
    """The lm_head weight is read outside the model's forward, so it must be whole on this rank."""
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError("fsdp: the lm_head weight is sharded outside the forward under FSDP; fastsd's TRL "
                         "integration needs it whole (one process, as tested; DDP or ZeRO-1/2 keep it whole)")
    plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and getattr(plugin, "zero_stage", 0) == 3:
        raise ValueError("deepspeed: ZeRO-3 shards the lm_head weight outside the forward; fastsd's TRL "
                         "integration needs it whole (one process, as tested; DDP or ZeRO-1/2 keep it whole)")


def _bare(trainer, model):
    return base_model(trainer.accelerator.unwrap_model(model))


def _check_model(trainer, model, name: str) -> None:
    """What makes logits != hidden @ W.T, and forwards that cannot skip the logits, refused by name."""
    bare = _bare(trainer, model)
    head = bare.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{name}: its output embedding is a {type(head).__name__}, not a plain Linear "
                         "(a LoRA adapter on lm_head?); fastsd needs the logits to be hidden @ weight.T")
    if head.bias is not None:
        raise ValueError(f"{name}: lm_head has a bias; fastsd's fused op has none")
    config = getattr(bare, "config", None)
    for key, neutral in (("final_logit_softcapping", None), ("logit_scale", None), ("logits_scaling", 1.0)):
        value = getattr(config, key, neutral)
        if value not in (neutral, None, 1, 1.0):
            raise ValueError(f"{name}: config.{key}={value!r} changes the logits after lm_head; fastsd has no "
                             "equivalent")
    if "logits_to_keep" not in inspect.signature(bare.forward).parameters:
        raise ValueError(f"{name}: {type(bare).__name__}.forward takes no logits_to_keep, so it would compute the "
                         "[B, T, V] logits anyway")


def _check_self_distillation(trainer) -> None:
    args = trainer.args
    if getattr(args, "use_teacher_server", False):
        raise ValueError("use_teacher_server=True: the teacher's log-probs come from a server, without hidden "
                         "states; fastsd's integration needs the teacher's forward in this process")
    weight = getattr(args, "distillation_weight", 1.0)
    if 0.0 < weight < 1.0:
        raise ValueError(f"distillation_weight={weight}: the policy-gradient term reads the student's logits; "
                         "fastsd's integration takes distillation_weight=1.0 (or 0.0, TRL's own path unchanged)")
    mode = args.distillation_mode
    if mode not in ("full_logits", "topk_logits", "sampled_token"):
        raise ValueError(f"distillation_mode={mode!r}: expected full_logits, topk_logits or sampled_token")
    if mode == "topk_logits":
        if args.distillation_topk is None:
            raise ValueError("distillation_topk: distillation_mode='topk_logits' needs it set")
        vocab = _bare(trainer, trainer.model).get_output_embeddings().weight.shape[0]
        try:
            check_topk(args.distillation_topk, "student", bool(args.distillation_add_tail), vocab)
        except ValueError as err:
            raise ValueError(f"distillation_{err}") from None


def _check_gkd(trainer) -> None:
    if not 0.0 <= trainer.beta <= 1.0:
        raise ValueError(f"beta={trainer.beta}: expected a value in [0, 1]")


def _hidden_forward(trainer, model, input_ids, attention_mask, logits_to_keep: int | None) -> _Head:
    """The model's last hidden state at the positions whose logits TRL would take (the logits of
    one position only are computed), and the lm_head weight."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1, :]
    if logits_to_keep is not None:
        hidden = hidden[:, -logits_to_keep:, :]
    return _Head(hidden, _bare(trainer, model).get_output_embeddings().weight)


def _teacher_student_hidden(self, model, teacher_model, inputs):
    """TRL's own `_compute_teacher_student_logits` (its masks, its teacher context), with its
    logits forward swapped for the hidden-state one for the length of the call."""
    self._forward_logits = lambda model, input_ids, attention_mask, logits_to_keep: _hidden_forward(
        self, model, input_ids, attention_mask, logits_to_keep)
    try:
        return type(self)._compute_teacher_student_logits(self, model, teacher_model, inputs)
    finally:
        del self._forward_logits  # the rollout log-probs keep TRL's logits forward


def _self_distillation_loss(self, model, inputs, logits):
    """TRL's SDPO / SDFT distillation loss, per token from the fused op, then TRL's own IS clip
    and normalisation (per-sequence mean over `loss_mask`, then the batch mean)."""
    args, student, teacher = self.args, logits.student_logits, logits.teacher_logits
    ids, loss_mask = logits.completion_ids, logits.loss_mask
    rows = loss_mask.bool()
    common = dict(temperature=float(self.temperature), **self._fastsd_options)
    old = inputs.get("old_per_token_logps")
    is_clip = args.distillation_is_clip is not None and old is not None
    if args.distillation_mode == "sampled_token":  # TRL: reverse KL's sampled-token estimate (alpha = 1)
        s_lp = fused_linear_logprob(student.hidden, student.weight, ids, mask=rows, **common).view(ids.shape)
        with torch.no_grad():
            t_lp = fused_linear_logprob(teacher.hidden, teacher.weight, ids, mask=rows, **common).view(ids.shape)
        per_token, s_lp_now = (s_lp - t_lp).detach() * s_lp, s_lp.detach()
    else:
        topk = args.distillation_topk if args.distillation_mode == "topk_logits" else None
        out = fused_linear_divergence(
            student.hidden, student.weight, teacher.hidden, teacher.weight, mask=rows,
            target_ids=ids if is_clip else None, divergence="jsd", beta=float(args.distillation_alpha),
            reduction="none", topk=topk, topk_from="student", tail=bool(args.distillation_add_tail), **common)
        per_token, s_lp_now = out.loss.view(ids.shape), out.student_logprob
    if is_clip:  # the student now against at rollout time, the ratio clipped above and detached
        log_ratio = (s_lp_now.view(ids.shape) - old).clamp(min=-20.0, max=20.0)
        per_token = per_token * torch.exp(log_ratio).clamp(max=args.distillation_is_clip)
    masked = per_token * loss_mask
    loss = (masked.sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean()
    mean_token = masked.detach().sum() / loss_mask.sum().clamp(min=1.0)
    self._log_self_distillation_metric("train" if model.training else "eval",
                                       self.accelerator.gather(mean_token).mean().item())
    return loss


def _gkd_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """TRL's GKD loss: generalized JSD with `beta` over the tokens whose label is not -100, at
    temperature 1 (TRL's GKD samples at `args.temperature` but does not scale the divergence),
    summed and divided by `num_items_in_batch` when given, else by the number of those tokens.
    With `return_outputs` (evaluation asks for the student's outputs) TRL's own path runs."""
    if return_outputs:
        return type(self).compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
    student = _hidden_forward(self, model, inputs["input_ids"], inputs["attention_mask"], None)
    self.teacher_model.eval()
    with torch.no_grad():
        teacher = _hidden_forward(self, self.teacher_model, inputs["input_ids"], inputs["attention_mask"], None)
    rows = inputs["labels"][:, 1:] != -100
    out = fused_linear_divergence(student.hidden, student.weight, teacher.hidden, teacher.weight, mask=rows,
                                  divergence="jsd", beta=float(self.beta), reduction="sum", **self._fastsd_options)
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=out.loss.device)
    else:
        denominator = rows.sum().clamp_min(1)
    return out.loss / denominator
