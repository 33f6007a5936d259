"""The training loop: rollout -> feedback -> update, then log, evaluate, checkpoint.

One code path for one process and for torchrun (FSDP2). The stages of a step are in
`fastsd.step`, what a run is built from in `fastsd.build`, the run directory's bookkeeping in
`fastsd.run_dir`.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .build import build_critic, build_models, build_optim, load_data
from .config import TrainConfig
from .data import step_questions
from .dist import Dist
from .evaluation import evaluate, fmt_eval
from .run_dir import RunLog, prepare_run_dir, rollout_rows
from .step import feedback, rollout, update

__all__ = ["train"]


def _rng_seed(cfg: TrainConfig, d: Dist) -> None:
    random.seed(cfg.seed + d.rank)
    torch.manual_seed(cfg.seed + d.rank)  # ranks sample different rollouts


def train(cfg: TrainConfig, d: Dist) -> dict:
    """Run the job in `cfg`; returns the final evaluation (and the first, if this run made it)."""
    resume = ckpt.resolve_resume(cfg.resume, cfg.run_dir)
    earlier = ckpt.latest_checkpoint(cfg.run_dir) if cfg.resume == "never" else None
    if earlier is not None:
        raise ValueError(f"resume: never, but run_dir {cfg.run_dir} holds an earlier run's checkpoints "
                         f"(latest {earlier}); continue it with resume=auto, or choose another run_dir")
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    _rng_seed(cfg, d)
    policy, teacher, tok = build_models(cfg, d)
    opt, sched = build_optim(cfg, policy)
    train_set, held = load_data(cfg)
    critic = build_critic(cfg, d)
    state = {"step": 0, "first_eval": None}
    # The teacher is checkpointed only when it drifts (ema); initial is model.path itself.
    saved_teacher = teacher.lm if teacher is not None and cfg.teacher.kind == "ema" else None
    if resume is not None:
        state = ckpt.load_checkpoint(resume, model=policy.lm, optimizer=opt, scheduler=sched, teacher=saved_teacher)
    said = prepare_run_dir(cfg, resume, state["step"]) if d.main else []
    runlog = RunLog(cfg, d, state["step"])
    if resume is not None:
        runlog.say(f"[fastsd] resumed from {resume} at step {state['step']}"
                   + (" (the run is complete: evaluating it again)" if state["step"] >= cfg.steps else ""))
    for line in said:
        runlog.say(f"[fastsd] {line}")
    if state["first_eval"] is None:
        state["first_eval"] = evaluate(cfg, d, policy, tok, held)
        runlog.metrics({"step": 0, "eval": state["first_eval"]})
        runlog.say("[fastsd] step 0: " + fmt_eval(state["first_eval"]))

    def save(step: int) -> None:
        ckpt.save_checkpoint(cfg.run_dir, step, model=policy.lm, tokenizer=tok, optimizer=opt, scheduler=sched,
                             state=dict(state), keep=cfg.checkpoint.keep, teacher=saved_teacher)

    last_eval = state["first_eval"]
    for step in range(state["step"], cfg.steps):
        t0 = time.perf_counter()
        questions = step_questions(train_set, cfg, step)[d.rank::d.world]
        rolls = rollout(cfg, d, policy, tok, questions, cfg.group_size, cfg.rollout.temperature)
        t1 = time.perf_counter()
        feedback(cfg, tok, rolls, critic)
        t2 = time.perf_counter()
        upd = update(cfg, d, policy, teacher, opt, sched, tok, rolls, step)
        t3 = time.perf_counter()
        failed = Counter(r.critique_error for r in rolls if r.critique_error)
        n_roll, reward_sum, usable, zero_var, no_answer, resp_tokens, n_failed = d.all_sum(
            len(rolls), sum(r.reward for r in rolls), sum(r.trained for r in rolls),
            sum(not r.trained for r in rolls) if cfg.condition == "grpo" else 0,
            sum(r.parsed.answer is None for r in rolls), sum(len(r.response) for r in rolls), sum(failed.values()))
        state["step"] = step + 1
        row = {"step": step + 1, "loss": upd["divergence"], "reward": reward_sum / max(n_roll, 1),
               "usable": usable / max(n_roll, 1), "no_answer": no_answer / max(n_roll, 1), "gap": upd["gap"],
               "grad_norm": upd["grad_norm"], "lr": sched.get_last_lr()[0], "tok_s": resp_tokens / (t3 - t0),
               "time_rollout": t1 - t0, "time_feedback": t2 - t1, "time_update": t3 - t2}
        if cfg.condition == "grpo":
            row["zero_variance_rollouts"] = zero_var
        if cfg.condition == "critique":
            row["critique_failed"] = n_failed
            if n_failed:
                why = ", ".join(f"{n} {reason}" for reason, n in failed.most_common(3))
                runlog.say(f"[fastsd] step {step + 1}: {n_failed:.0f} of {n_roll:.0f} critiques failed, "
                           f"those rollouts get no loss (rank {d.rank}: {why or 'none'})")
        if cfg.eval.every and state["step"] % cfg.eval.every == 0 and state["step"] < cfg.steps:
            row["eval"] = last_eval = evaluate(cfg, d, policy, tok, held)
        runlog.metrics(row)
        runlog.rollouts(state["step"], [r for part in d.gather_objects(rollout_rows(rolls, tok)) for r in part])
        runlog.progress(state["step"], row)
        # Saved before the final evaluation, so the RNG state is the one the next step would see.
        if state["step"] == cfg.steps or (cfg.checkpoint.every and state["step"] % cfg.checkpoint.every == 0):
            save(state["step"])
    if state["step"] >= cfg.steps:
        last_eval = evaluate(cfg, d, policy, tok, held)
        runlog.metrics({"step": state["step"], "eval": last_eval, "final": True})
    runlog.close()
    runlog.say(f"[fastsd] before: {fmt_eval(state['first_eval'])}\n[fastsd] after:  {fmt_eval(last_eval)}\n"
               f"[fastsd] logs, config and checkpoints: {cfg.run_dir} (latest checkpoint: "
               f"{ckpt.latest_checkpoint(cfg.run_dir)})")
    return {"first": state["first_eval"], "final": last_eval}
