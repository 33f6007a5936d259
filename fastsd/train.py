"""The training loop: rollout -> feedback -> loss -> update, then log, evaluate, checkpoint.

One code path for one process and for torchrun (FSDP2). Every rank handles its share of the
step's questions; collective calls (generation, forwards, reductions) happen the same number of
times on every rank, padded with zero-weight micro-batches where a rank has less work.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import checkpoint as ckpt
from .batch import build_batch
from .conditions import student_prompt, teacher_prompt
from .config import TrainConfig, to_dict, to_yaml
from .critic import ArithCritic
from .data import Example, builtin_split, load_jsonl
from .dist import Dist
from .evaluation import score_samples
from .format import ANSWER_CLOSE, Parsed, parse_response, reward
from .loss import fused_linear_logprob
from .model import DEFAULT_MODEL_DIR, load_model_and_tokenizer
from .policy import Policy, apply_liger, shard
from .rollout import sample

log = logging.getLogger("fastsd")


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient norm was NaN/inf: the step stopped before the optimizer touched anything."""


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


# ---------------------------------------------------------------- set-up

def _dtype(cfg: TrainConfig) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.float32  # bf16 on CUDA comes from FSDP mixed precision / autocast
    return getattr(torch, cfg.model.dtype)


def _named(key: str, e: ValueError) -> ValueError:
    """A loader's error about its `path` argument, told as the config key it came from."""
    text = str(e)
    return ValueError(f"{key}:{text[len('path:'):]}" if text.startswith("path:") else f"{key}: {text}")


def build_models(cfg: TrainConfig, d: Dist):
    path = DEFAULT_MODEL_DIR if cfg.model.path == "builtin" else cfg.model.path
    try:
        lm, tok = load_model_and_tokenizer(path, dtype=_dtype(cfg))
    except ValueError as e:
        raise _named("model.path", e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    lm.to(d.device)
    if d.device.type == "cuda" and cfg.model.liger:
        apply_liger(lm)
    if cfg.model.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = True
    teacher_lm = None
    if cfg.condition != "grpo" and cfg.teacher.kind in ("initial", "ema"):
        teacher_lm = copy.deepcopy(lm).eval().requires_grad_(False)
    # dtype=auto on CUDA: bf16 compute over fp32 parameters, by FSDP2's mixed precision under
    # torchrun and by autocast in a single process.
    mixed = d.device.type == "cuda" and cfg.model.dtype == "auto"
    autocast = torch.bfloat16 if mixed and not d.enabled else None
    policy = Policy(lm, autocast)
    teacher = None if teacher_lm is None else Policy(teacher_lm, autocast)
    if d.enabled:
        shard(policy, mixed_precision=mixed)
        if teacher is not None:
            shard(teacher, mixed_precision=mixed)
    return policy, teacher, tok


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


def load_data(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    c = cfg.data
    try:
        train = builtin_split("train", c.train_size, c.seed) if c.path == "builtin" else load_jsonl(c.path)
    except ValueError as e:
        raise _named("data.path", e) from None
    try:
        held = builtin_split("test", c.eval_size, c.seed) if c.eval_path == "builtin" else load_jsonl(c.eval_path)
    except ValueError as e:
        raise _named("data.eval_path", e) from None
    if not train:
        raise ValueError(f"data.path: no training questions in {c.path}")
    if not held:
        raise ValueError(f"data.eval_path: no held-out questions in {c.eval_path}")
    return train, held


def step_questions(train: list[Example], cfg: TrainConfig, step: int) -> list[Example]:
    """The questions of optimizer step `step`: a fresh seeded permutation per epoch."""
    n, per = len(train), cfg.questions_per_step
    orders: dict[int, list[int]] = {}
    out = []
    for pos in range(step * per, (step + 1) * per):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(cfg.seed * 100_003 + epoch).shuffle(orders[epoch])
        out.append(train[orders[epoch][i]])
    return out


# ---------------------------------------------------------------- rollout and feedback

def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def rollout(cfg: TrainConfig, d: Dist, policy, tok, examples: list[Example], k: int, temperature: float) -> list[Rollout]:
    prompts = [encode(tok, student_prompt(ex.question, cfg.templates.student)) for ex in examples]
    flat = [(g, ex, p) for g, (ex, p) in enumerate(zip(examples, prompts)) for _ in range(k)]
    engine = cfg.rollout.engine
    if engine == "auto":
        engine = "fastsd" if d.device.type == "cuda" else "generate"
    stop = encode(tok, ANSWER_CLOSE) if cfg.rollout.stop_at_answer else None
    responses = sample(policy, [p for _, _, p in flat], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                       temperature=temperature, top_p=cfg.rollout.top_p,
                       max_new_tokens=cfg.rollout.max_new_tokens, d=d, engine=engine, stop=stop)
    out = []
    for (g, ex, p), resp in zip(flat, responses):
        parsed = parse_response(tok.decode(resp, skip_special_tokens=True))
        out.append(Rollout(ex, p, resp, parsed, reward(parsed, ex.answer), g))
    return out


def build_critic(cfg: TrainConfig, d: Dist):
    """The critic of condition=critique (None otherwise); an http critic caches in the run directory."""
    if cfg.condition != "critique":
        return None
    if cfg.critic.kind == "builtin":
        return ArithCritic()
    from .http_critic import HttpCritic

    return HttpCritic(cfg.critic, cache_dir=f"{cfg.run_dir}/critic_cache", rank=d.rank)


def feedback(cfg: TrainConfig, tok, rollouts: list[Rollout], critic) -> None:
    """Fill in what each rollout is trained on: group advantages (grpo) or the teacher prompt.

    A rollout whose critique failed keeps `trained=False` and records `critique_error`."""
    if cfg.condition == "grpo":
        groups: dict[int, list[Rollout]] = {}
        for r in rollouts:
            groups.setdefault(r.group, []).append(r)
        for members in groups.values():
            rewards = torch.tensor([r.reward for r in members])
            std = rewards.std(unbiased=False)
            for r, a in zip(members, ((rewards - rewards.mean()) / (std + 1e-6)).tolist()):
                r.advantage, r.trained = a, bool(std > 0) and len(r.response) > 0
        return
    templates = {"reference": cfg.templates.reference, "critique": cfg.templates.critique}
    if cfg.condition == "critique":  # all at once: a remote critic answers them concurrently
        crits = critic.critique_batch([(r.example.question, r.example.answer, r.parsed.steps, r.parsed.answer,
                                        r.example.reference_solution) for r in rollouts])
    for i, r in enumerate(rollouts):
        q = r.example.question
        if cfg.condition == "reference":
            r.context = r.example.reference_solution
        else:
            if not crits[i].ok:
                r.critique_error = crits[i].error or "unknown"
                continue  # no usable context: no loss for this rollout (counted in the logs)
            r.context = crits[i].text
        text = teacher_prompt(cfg.condition, q, templates=templates, **{cfg.condition: r.context})
        r.teacher_prompt = encode(tok, text)
        r.trained = len(r.response) > 0


# ---------------------------------------------------------------- update

def _micro_loss(cfg, policy, teacher, batch, world, total_tokens, stats):
    """Loss of one micro-batch, scaled so that gradients sum to the step's token mean."""
    scale = world / max(total_tokens, 1.0)  # FSDP averages gradients over ranks
    loss_kw = dict(divergence=cfg.loss.divergence, temperature=cfg.loss.temperature,
                   clip=cfg.loss.clip, beta=cfg.loss.beta)
    if cfg.condition == "grpo":
        logp = policy(batch.s_ids, batch.s_attn, batch.s_index, mode="logprob", targets=batch.targets, loss_kw=loss_kw)
        adv = batch.advantage
        ratio = torch.exp(logp - logp.detach())  # one update per rollout: the sampling policy is this one
        eps = cfg.loss.pg_clip
        per_tok = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        return per_tok.sum() * scale
    t_model = teacher if teacher is not None else policy
    with torch.no_grad():
        h_t = t_model(batch.t_ids, batch.t_attn, batch.t_index, mode="hidden")
    w_t = None if teacher is None else teacher.head_weight
    if cfg.loss.kind == "sampled_token":
        s_lp = policy(batch.s_ids, batch.s_attn, batch.s_index, mode="logprob", targets=batch.targets, loss_kw=loss_kw)
        with torch.no_grad():
            t_lp = fused_linear_logprob(h_t, (w_t if w_t is not None else policy.head_weight).detach(),
                                        batch.targets, temperature=cfg.loss.temperature)
        gap = t_lp - s_lp.detach()
        stats["gap"] += float(gap.sum()) * batch.weight
        return -(gap * s_lp).sum() * scale
    out = policy(batch.s_ids, batch.s_attn, batch.s_index, mode="divergence", targets=batch.targets,
                 teacher_hidden=h_t, teacher_weight=w_t, loss_kw=loss_kw)
    # A filler micro-batch (weight 0, FSDP lock-step only) adds nothing to the logs either.
    stats["gap"] += float((out.teacher_logprob - out.student_logprob).sum()) * batch.weight
    stats["divergence"] += float(out.loss.detach()) * batch.weight
    return out.loss * scale


def _batches(cfg: TrainConfig, tok, rollouts: list[Rollout], d: Dist):
    """Micro-batches of trained rollouts; every rank yields the same number (zero-weight fillers)."""
    live = [r for r in rollouts if r.trained]
    mb = cfg.optim.micro_batch
    n = d.all_max((len(live) + mb - 1) // mb)
    for i in range(n):
        chunk, weight = live[i * mb:(i + 1) * mb], 1.0
        if not chunk:  # filler: keeps FSDP collectives in step; contributes nothing
            chunk, weight = [rollouts[0] if rollouts else None], 0.0
        yield _to_batch(cfg, tok, chunk, weight, d.device)


def _to_batch(cfg, tok, chunk, weight, device):
    if chunk[0] is None:
        prompts, responses, t_prompts, adv = [[tok.pad_token_id]], [[tok.pad_token_id]], [[tok.pad_token_id]], [0.0]
    else:
        prompts = [r.prompt for r in chunk]
        responses = [r.response or [tok.eos_token_id] for r in chunk]
        t_prompts = [r.teacher_prompt or r.prompt for r in chunk]
        adv = [r.advantage for r in chunk]
    batch = build_batch(prompts, responses, tok.pad_token_id, None if cfg.condition == "grpo" else t_prompts)
    batch = batch.to(device)
    batch.advantage = torch.tensor(adv, device=device)[batch.row] * weight
    batch.weight = weight
    return batch


def update(cfg, d: Dist, policy, teacher, opt, sched, tok, rollouts, step: int) -> dict:
    local_tokens = sum(len(r.response) for r in rollouts if r.trained)
    (total_tokens,) = d.all_sum(float(local_tokens))
    if total_tokens == 0:  # nothing to learn from (every grpo group had one reward): no AdamW step,
        with warnings.catch_warnings():  # which would still move the weights by momentum and decay
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
            sched.step()  # the schedule counts training steps
        return {"loss_tokens": 0.0, "grad_norm": 0.0, "gap": 0.0, "divergence": None}
    stats = {"gap": 0.0, "divergence": 0.0}
    if teacher is not None and d.enabled:
        teacher.unshard()  # the teacher head must be a plain tensor inside the student's forward
    try:
        for i, batch in enumerate(_batches(cfg, tok, rollouts, d)):
            loss = _micro_loss(cfg, policy, teacher, batch, d.world, total_tokens, stats) * batch.weight
            (finite,) = d.all_sum(float(torch.isfinite(loss.detach()).all()))
            if finite < d.world:
                opt.zero_grad(set_to_none=True)
                raise NonFiniteLossError(f"step {step}: non-finite loss in micro-batch {i}; "
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
        raise NonFiniteLossError(f"step {step}: non-finite gradient norm; parameters unchanged")
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if teacher is not None and cfg.teacher.kind == "ema":
        with torch.no_grad():
            for p_t, p_s in zip(teacher.parameters(), policy.parameters()):
                p_t.lerp_(p_s.detach(), 1.0 - cfg.teacher.ema_rate)
    gap, div = d.all_sum(stats["gap"], stats["divergence"])
    denom = max(total_tokens, 1.0)
    return {"loss_tokens": total_tokens, "grad_norm": norm, "gap": gap / denom,
            "divergence": div / denom if cfg.condition != "grpo" and cfg.loss.kind == "divergence" else None}


# ---------------------------------------------------------------- evaluation, logging

def evaluate(cfg: TrainConfig, d: Dist, policy, tok, held: list[Example]) -> dict:
    """avg@k, pass@k, maj@k on the held-out questions. Every evaluation draws the same random
    numbers (its own seeded stream, so the training stream is untouched): evaluations of
    different checkpoints are a paired comparison, not two independent draws."""
    mine = held[d.rank::d.world]
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 7919 * (d.rank + 1))
        rolls = rollout(cfg, d, policy, tok, mine, cfg.eval.k, cfg.eval.temperature)
    answers = [[r.parsed.answer for r in rolls[i * cfg.eval.k:(i + 1) * cfg.eval.k]] for i in range(len(mine))]
    pairs = [p for part in d.gather_objects(list(zip(answers, [ex.answer for ex in mine]))) for p in part]
    return score_samples([a for a, _ in pairs], [t for _, t in pairs])


class RunLog:
    """metrics.jsonl, rollouts.jsonl, and a progress bar (terminal) or heartbeat lines."""

    def __init__(self, cfg: TrainConfig, d: Dist, first_step: int):
        self.cfg, self.on = cfg, d.main
        self.dir = cfg.run_dir
        self.bar = None
        if self.on and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=first_step, desc=f"fastsd {cfg.condition}", unit="step")

    def metrics(self, row: dict) -> None:
        if not self.on:
            return
        with open(f"{self.dir}/metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def rollouts(self, step: int, rows: list[dict]) -> None:
        if not self.on:
            return
        with open(f"{self.dir}/rollouts.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")

    def progress(self, step: int, row: dict) -> None:
        if not self.on:
            return
        short = {k: row[k] for k in ("loss", "reward", "usable", "tok_s") if row.get(k) is not None}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()})
        elif step % self.cfg.log_every == 0 or step == self.cfg.steps:
            print(f"[fastsd] step {step}/{self.cfg.steps} " + " ".join(f"{k}={v:.4g}" for k, v in short.items()), flush=True)

    def say(self, text: str) -> None:
        if self.on:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- the loop

def _rng_seed(cfg: TrainConfig, d: Dist) -> None:
    random.seed(cfg.seed + d.rank)
    torch.manual_seed(cfg.seed + d.rank)  # ranks sample different rollouts


def _rollout_rows(rolls: list[Rollout], tok) -> list[dict]:
    return [{"question": r.example.question, "response": tok.decode(r.response, skip_special_tokens=True),
             "reward": r.reward, "context": r.context, "trained": r.trained,
             **({"critique_error": r.critique_error} if r.critique_error else {})} for r in rolls]


LOGS = ("metrics.jsonl", "rollouts.jsonl")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _aside(path: Path, name: str) -> Path:
    """run_dir/name, or name.1, name.2, ...: the first that does not exist (nothing is overwritten)."""
    free = path.parent / name
    i = 0
    while free.exists():
        i += 1
        free = path.parent / f"{name}.{i}"
    os.replace(path, free)
    return free


def prepare_run_dir(cfg: TrainConfig, resume: Path | None, step: int) -> list[str]:
    """Make run_dir agree with the run about to start (rank 0 only); returns what it did, to log.

    Resuming at `step`: rows the logs hold for later steps (and the final evaluation), which the
    run will write again, are cut. Starting afresh: earlier logs and config are moved to *.old. A
    config that differs from the saved one is saved; the old one is kept as
    config.before_step_N.yaml."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    said = []
    saved = run_dir / "config.yaml"
    if resume is None:
        for path in (*(run_dir / name for name in LOGS), saved):
            if path.exists():
                said.append(f"no checkpoint to resume: the earlier {path.name} moved to "
                            f"{_aside(path, path.name + '.old').name}")
        saved.write_text(to_yaml(cfg))
        return said
    for name in LOGS:
        path = run_dir / name
        if not path.exists():
            continue
        keep, cut = [], 0
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # torn by a kill mid-write
                    row = None
                if isinstance(row, dict) and row.get("step", 0) <= step and not row.get("final"):
                    keep.append(line)
                else:
                    cut += 1
        if cut:
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)
            said.append(f"{name}: cut back to step {step} ({cut} rows, written again as the run goes on)")
    if saved.exists():
        try:
            data = yaml.safe_load(saved.read_text())
        except yaml.YAMLError:
            data = None
        old = _flat(data) if isinstance(data, dict) else {"config.yaml": "unreadable"}
        new = _flat(to_dict(cfg))
        changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k) and k not in ("resume", "run_dir")]  # how, not what
        if changed:
            kept = _aside(saved, f"config.before_step_{step}.yaml")
            said.append(f"config changed since the checkpoint ({'; '.join(changed)}); the earlier one is {kept.name}")
    saved.write_text(to_yaml(cfg))
    return said


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
        runlog.say(f"[fastsd] step 0: " + _fmt_eval(state["first_eval"]))

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
        runlog.rollouts(state["step"], [r for part in d.gather_objects(_rollout_rows(rolls, tok)) for r in part])
        runlog.progress(state["step"], row)
        # Saved before the final evaluation, so the RNG state is the one the next step would see.
        if state["step"] == cfg.steps or (cfg.checkpoint.every and state["step"] % cfg.checkpoint.every == 0):
            save(state["step"])
    if state["step"] >= cfg.steps:
        last_eval = evaluate(cfg, d, policy, tok, held)
        runlog.metrics({"step": state["step"], "eval": last_eval, "final": True})
    runlog.close()
    runlog.say(f"[fastsd] before: {_fmt_eval(state['first_eval'])}\n[fastsd] after:  {_fmt_eval(last_eval)}\n"
               f"[fastsd] logs, config and checkpoints: {cfg.run_dir} (latest checkpoint: "
               f"{ckpt.latest_checkpoint(cfg.run_dir)})")
    return {"first": state["first_eval"], "final": last_eval}


def _fmt_eval(m: dict) -> str:
    return " ".join(f"{k}={m[k]:.3f}" for k in ("avg@k", "pass@k", "maj@k") if k in m) + f" (k={m.get('k')}, {m.get('questions')} questions)"
