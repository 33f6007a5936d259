"""The training loop: rollout -> feedback -> update, then log, evaluate, checkpoint.

One code path for one process and for torchrun (FSDP2). What can be checked without the model is
checked first (`fastsd.run.preflight`); each stage of a step has its room: `fastsd.rollout`,
`fastsd.feedback`, `fastsd.update`; what a run is built from is in `fastsd.run.build`, the run
directory's bookkeeping in `fastsd.run.run_dir`. A Ctrl-C abandons the step in progress; a
step's logs and checkpoint are written whole (`run_dir.uninterrupted`). SIGTERM and SIGHUP
take the same path and then save the last completed step (`fastsd.run.stop`).
"""

from __future__ import annotations

import random
import time

import torch

from .config import TrainConfig
from .evaluation import evaluate, fmt_eval
from .feedback import feedback
from .feedback.conditions import FailedSteps
from .model import Dist
from .rollout import rollout
from .run import checkpoint as ckpt
from .run.build import build_models, build_optim, resume_optim
from .run.lock import RunDirLock, WriteFailed
from .run.preflight import preflight
from .run.run_dir import RunLog, prepare_run_dir, rollout_rows, step_row, uninterrupted
from .run.stop import Stopped, StopSignals, keep_last_step
from .run.trackers import start_trackers
from .tasks.data import step_questions
from .update import update

__all__ = ["train"]


def _rng_seed(cfg: TrainConfig, d: Dist) -> None:
    random.seed(cfg.seed + d.rank)
    torch.manual_seed(cfg.seed + d.rank)  # ranks sample different rollouts


def train(cfg: TrainConfig, d: Dist) -> dict:
    """Run the job in `cfg`; returns the final evaluation (and the first, if this run made it;
    None for both with eval=off). A SIGTERM or SIGHUP raises `fastsd.run.stop.Stopped`."""
    with StopSignals(d, cfg.checkpoint.stop_timeout) as stop, RunDirLock(cfg, d) as lock:
        return _train(cfg, d, stop, lock)


def _train(cfg: TrainConfig, d: Dist, stop: StopSignals, lock: RunDirLock) -> dict:
    ready = preflight(cfg, d)  # data, templates, critic: before the model loads or a file is written
    lock.take()  # one writer per run directory, from here on
    trackers = start_trackers(cfg, d, ready.resume)  # log.report_to: a failure to start is before the model loads
    _rng_seed(cfg, d)
    policy, teacher, tok = build_models(cfg, d)
    opt, sched = build_optim(cfg, policy)
    state = {"step": 0, "first_eval": None}
    # The teacher is checkpointed only when it drifts (ema); initial is model.path itself.
    saved_teacher = teacher.lm if teacher is not None and cfg.teacher.kind == "ema" else None
    if ready.resume is not None:
        state = ckpt.load_checkpoint(ready.resume, model=policy.lm, optimizer=opt, scheduler=sched, teacher=saved_teacher)
        resume_optim(cfg, opt, sched)  # a changed lr, betas, decay or schedule is the one trained with
    said = prepare_run_dir(cfg, ready.resume, state["step"], ready.damaged) if d.main else []  # the run's first write
    runlog = RunLog(cfg, d, state["step"], trackers)
    if ready.resume is not None:
        done = ("" if state["step"] < cfg.steps else " (the run is complete: evaluating it again)"
                if cfg.eval.enabled else " (the run is complete; eval=off: nothing to do)")
        runlog.say(f"[fastsd] resumed from {ready.resume} at step {state['step']}{done}")
    for line in said:
        runlog.say(f"[fastsd] {line}")

    def evaluation(step: int) -> tuple[dict, list[dict]]:
        """Evaluate now: the metrics with the time it took, and the samples they came from."""
        t0, samples = time.perf_counter(), []
        result = evaluate(cfg, d, policy, tok, ready.held, progress=runlog.eval_progress(step, len(ready.held)),
                          samples=samples)
        took = time.perf_counter() - t0
        drawn = result["questions"] * result["k"]
        runlog.say(f"[fastsd] eval at step {step}: {fmt_eval(result)}, {took:.0f} s ({drawn / took:.3g} samples/s)")
        runlog.evaluated(took)
        return {"eval": result, "time_eval": took}, samples

    def save(step: int, rng: dict | None = None):
        try:
            return ckpt.save_checkpoint(cfg.run_dir, step, model=policy.lm, tokenizer=tok, optimizer=opt,
                                        scheduler=sched, state=dict(state), keep=cfg.checkpoint.keep,
                                        teacher=saved_teacher, rng=rng)
        except (OSError, RuntimeError) as e:  # a full disk: torch.save says RuntimeError, naming no path
            raise WriteFailed(cfg.run_dir, f"checkpoint {ckpt.CHECKPOINTS}/step_{step:08d} in {cfg.run_dir}", e) from e

    rng = None  # the random state the step in progress started from: a stop signal's checkpoint holds it

    try:
        if state["first_eval"] is None and cfg.eval.enabled:
            first, samples = evaluation(state["step"])
            state["first_eval"] = first["eval"]
            runlog.metrics({"step": state["step"], **first}, samples)
        last_eval = state["first_eval"]
        failed_steps = FailedSteps(cfg)
        for step in range(state["step"], cfg.steps):
            rng = ckpt.rng_state()
            stop.poll()  # torchrun: the ranks agree on a stop signal at these points
            times = [time.perf_counter()]
            questions = step_questions(ready.train, cfg, step)[d.rank::d.world]
            rolls = rollout(cfg, d, policy, tok, questions, cfg.group_size, cfg.rollout.temperature,
                            logprobs=cfg.loss.is_clip is not None and cfg.condition != "grpo")
            times.append(time.perf_counter())
            stop.poll()
            feedback(cfg, tok, rolls, ready.critic)
            times.append(time.perf_counter())
            stop.poll()
            stop.hold()  # from the update on, the step is finished and written before a stop signal acts
            lr = sched.get_last_lr()[0]  # this step's rate: update() steps the schedule
            upd = update(cfg, d, policy, teacher, opt, sched, tok, rolls, step)
            times.append(time.perf_counter())
            row, failures = step_row(cfg, d, step + 1, rolls, upd, lr, times)
            if failures:
                runlog.say(failures)
            samples = None
            if cfg.eval.enabled and cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < cfg.steps:
                fields, samples = evaluation(step + 1)
                row.update(fields)
                last_eval = row["eval"]
            rows = [r for part in d.gather_objects(rollout_rows(rolls, tok)) for r in part]
            with uninterrupted():  # from here on the step counts: its logs and checkpoint are written whole
                state["step"] = step + 1
                runlog.metrics(row, samples)
                runlog.rollouts(step + 1, rows)
                runlog.progress(step + 1, row)
                failed = failed_steps.after(step + 1, row, rolls)  # critic.max_failed_steps reached: an error
                # Saved before the final evaluation, so the RNG state is the one the next step would see.
                if (failed is not None or step + 1 == cfg.steps
                        or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0)):
                    save(step + 1)
            if failed is not None:
                raise failed
            rng = None  # still held: the random state is now the next step's start, which a save takes as is
            stop.poll(after_step=True)
        if state["step"] >= cfg.steps and cfg.eval.enabled:
            final, samples = evaluation(state["step"])
            last_eval = final["eval"]
            runlog.metrics({"step": state["step"], **final, "final": True}, samples)
    except Stopped as e:  # the step in progress abandoned before its update, or written whole
        keep_last_step(e, stop, cfg, state["step"], lambda s: save(s, rng))
        raise
    finally:
        runlog.close()
        if getattr(policy, "vllm", None) is not None:
            policy.vllm.close()  # its KV cache is freed now, not whenever the policy is collected
    if state["first_eval"] is not None and last_eval is not None:
        runlog.say(f"[fastsd] before: {fmt_eval(state['first_eval'])}\n[fastsd] after:  {fmt_eval(last_eval)}")
    elif not cfg.eval.enabled:
        runlog.say("[fastsd] no evaluation (eval=off)")
    runlog.say(f"[fastsd] logs, config and checkpoints: {cfg.run_dir} (latest checkpoint: "
               f"{ckpt.latest_checkpoint(cfg.run_dir)})")
    return {"first": state["first_eval"], "final": last_eval}
