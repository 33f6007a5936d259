"""Make the built-in tiny model: build it from a seed and warm-start it on the arithmetic task.

    python tools/make_tiny_model.py --out fastsd/model/assets/tiny-arith --seed 0 [--task long] [--minutes 30]

Supervised training on the task's TRAIN split only (questions drawn with data seed `seed + 1`,
so mostly not `fastsd-train`'s default training questions), fp32, 2 CPU threads, loss on the
response tokens + EOS only, on fresh examples of three kinds:

  (a) student:   STUDENT prompt                                   -> canonical solution
  (b) critique:  CRITIQUE prompt with ArithCritic's critique of a
                 synthetic attempt (canonical steps with an error
                 carried forward, a cut, or none; see below)      -> the critique text itself
  (c) reference: REFERENCE prompt with reference_solution         -> canonical solution

Two phases, because what a tiny model learns first decides what it can learn at all:

  1. copy (weights --copy-mix, mostly b and c, on the questions of --copy-task): from scratch,
     the model cannot compute yet, so the cheapest way to lower the (b)/(c) loss is to copy from
     the context; an induction-like copy circuit forms after ~300 steps (seen as the critique loss
     falling far below the student loss). A model that learned the arithmetic first never forms
     it: it computes instead. On the long task's traces (batches of 16) it had not formed after
     500 steps (2026-12-01), so phase 1 runs on --copy-task (short), where it forms, then
     --long-copy steps more of the same mix on --task: copying learned on short traces did not
     carry to the long task's critiques, 300 characters away (their loss stayed above the
     student's for 300 steps of phase 2).
  2. arithmetic (weights --mix, mostly a): the student learns the sums; (b) and (c) keep the
     copying alive. Synthetic attempts often write their steps in other accepted notations
     (spaces, swapped operands, leading zeros), which the critic copies verbatim, so a critique
     can only be reproduced by copying it, however well the model computes.

Known property of this teacher: it is a copier. Teacher-forced on a response that has already
left the context, it snaps back to the context's values at the later steps too, so most of a
wrong rollout's divergence lies after its first wrong step (`adv_after_first_error_step`).
Tried and dropped (2026-11-27): a fourth kind of example teaching it to continue from its own
written values once they depart from the context; at this size it weakened copying (critique
accuracy 0.95 -> 0.6) without removing the snap-back. Forward KL turns the snap-back into the
lesson "do not carry your previous result", which collapses the student; reverse KL, whose
gradient vanishes where the student is confident and the teacher disagrees, does not (docs/training.md, "Why reverse KL").

The held-out split is only measured, never trained on, and on another draw of it (data seed
`seed + 2`; for the long task none of its 128 questions is among the 128 `fastsd-train`
evaluates on by default, for the short task 2). In phase 2, every --eval-every steps
(once the student loss is low), the script measures the model and stops as soon as the targets
hold: >= 90% of samples parse, student-only accuracy at --temperature (1.1, the trainer's
evaluation temperature) is in [--min-acc, --max-acc] (the paper's 15-30%: room for
self-distillation), and accuracy with a critique of the model's own attempt, and with the
reference, is at least --gain higher. It keeps the first snapshot that meets them,
else the best-scored one, and stops before the --minutes budget. The kept snapshot is measured
on more questions, printed, and saved as `warmstart_metrics.json` next to the checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastsd.feedback.critic import ArithCritic  # noqa: E402
from fastsd.feedback.prompts import student_prompt, teacher_prompt  # noqa: E402
from fastsd.model.load import build_tokenizer, tiny_config  # noqa: E402
from fastsd.tasks import DEFAULT_TASK, TASKS, arith, make_split  # noqa: E402
from fastsd.tasks.format import parse_response, reward  # noqa: E402

KINDS = ("student", "critique", "reference")
CRITIC = ArithCritic()


# ---------------------------------------------------------------- synthetic attempts

def _write(step: arith.Step, rng: random.Random, mixed: bool) -> str:
    """`step` compact, or (when `mixed`) in a random accepted notation: operands swapped for +/*,
    spaces around the operator or `=`, a leading zero."""
    if not mixed:
        return step.render()
    left, right = (step.right, step.left) if step.op in "+*" and rng.random() < 0.4 else (step.left, step.right)
    a, b, c = (("0" if rng.random() < 0.1 else "") + str(v) for v in (left, right, step.result))
    g1, g2, g3, g4 = (" " if rng.random() < 0.35 else "" for _ in range(4))
    return f"{a}{g1}{step.op}{g2}{b}{g3}={g4}{c}"


def synthetic_attempt(problem: arith.Problem, rng: random.Random) -> tuple[list[str], str | None]:
    """A plausible attempt: canonical steps with an error carried forward, a cut, or none.

    Half the attempts write each step in a random accepted notation; the critic copies correct
    steps verbatim, so their critiques can only be reproduced by copying, not by computing.
    """
    canon = arith.solve(problem.question)
    mixed = rng.random() < 0.6
    steps, value = [], canon[0].left
    k = rng.randrange(len(canon))
    mode = rng.choices(["correct", "result", "operand", "truncate"], [0.15, 0.5, 0.15, 0.2])[0]
    for i, s in enumerate(canon):
        right = s.right
        if i == k and mode == "operand":
            right = max(1, right + rng.choice([-2, -1, 1, 2]))
        result = value + right if s.op == "+" else value - right if s.op == "-" else value * right
        if i == k and mode == "result":
            result += rng.choice([-10, -2, -1, 1, 2, 10, rng.randint(-9, 9) or 3])
        result = max(0, result)  # the task never writes negative numbers
        steps.append(_write(arith.Step(value, s.op, right, result), rng, mixed))
        value = result
    if mode == "truncate":
        cut = rng.randrange(len(steps))
        partial = steps[cut][: rng.randrange(len(steps[cut]))]
        return steps[:cut] + ([partial] if partial.strip() else []), None
    return steps, str(value)


def make_example(kind: str, problem: arith.Problem, rng: random.Random) -> tuple[str, str]:
    """(prompt, target) of one training example of `kind`."""
    if kind == "student":
        return student_prompt(problem.question), problem.solution
    if kind == "reference":
        return teacher_prompt("reference", problem.question, reference=problem.reference_solution), problem.solution
    steps, answer = synthetic_attempt(problem, rng)
    text = CRITIC.critique(problem.question, problem.answer, steps, answer).text
    return teacher_prompt("critique", problem.question, critique=text), text


def encode(tok, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and labels (-100 except on target tokens and EOS)."""
    rows = [(tok(p)["input_ids"], tok(t)["input_ids"] + [tok.eos_token_id]) for p, t in pairs]
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (p, t) in enumerate(rows):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p) : len(p) + len(t)] = torch.tensor(t)
    return ids, labels


# ---------------------------------------------------------------- measuring

@torch.no_grad()
def sample(model, tok, prompts: list[str], temperature: float, max_new_tokens: int = 384) -> list[str]:
    """One response per prompt (left-padded batch); temperature 0 is greedy."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, **kw)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def first_error_advantage(model, tok, problems, attempts, critiques) -> tuple[float, float, float]:
    """Mean A_t = log p(y_t | q, critique) - log p(y_t | q) on the tokens before the first wrong
    token of each wrong attempt, at that token, and after the step holding it (what critique
    self-distillation will see)."""
    prefix, at_err, after = [], [], []
    for p, y, c in zip(problems, attempts, critiques):
        n = next((i for i, (a, b) in enumerate(zip(y, c)) if a != b), None)
        if n is None:
            continue
        lps = []
        for prompt in (student_prompt(p.question), teacher_prompt("critique", p.question, critique=c)):
            ids, labels = encode(tok, [(prompt, y)])
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            lab = labels[0, 1:]
            lps.append(logp[lab >= 0].gather(-1, lab[lab >= 0, None])[:-1, 0])  # drop EOS
        adv = lps[1] - lps[0]
        prefix.extend(adv[:n].tolist())
        at_err.append(adv[n].item())
        ends = [i for i in (y.find("<step_", n), y.find("<answer>", n)) if i >= 0]
        if ends:
            after.extend(adv[min(ends):].tolist())
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return mean(prefix), mean(at_err), mean(after)


def measure(model, tok, problems: list[arith.Problem], seed: int, temperature: float,
            full: bool = False) -> dict[str, float]:
    """Held-out accuracy at `temperature` without context, with a critique of the model's own
    attempt, with the reference; keys end in `_t{temperature}`."""
    torch.manual_seed(seed)
    model.eval()
    T, t = temperature, f"_t{temperature}"
    qs = [p.question for p in problems]
    acc = lambda outs: sum(reward(o, p.answer) for o, p in zip(outs, problems)) / len(problems)  # noqa: E731
    own = sample(model, tok, [student_prompt(q) for q in qs], T)
    parsed = [parse_response(o) for o in own]
    crit = [CRITIC.critique(p.question, p.answer, r.steps, r.answer).text for p, r in zip(problems, parsed)]
    with_crit = sample(model, tok, [teacher_prompt("critique", q, critique=c) for q, c in zip(qs, crit)], T)
    refs = [teacher_prompt("reference", p.question, reference=p.reference_solution) for p in problems]
    m = {"parse_rate" + t: sum(r.well_formed for r in parsed) / len(parsed), "student_acc" + t: acc(own),
         "critique_acc" + t: acc(with_crit), "reference_acc" + t: acc(sample(model, tok, refs, T))}
    wrong = [i for i, o in enumerate(own) if reward(o, problems[i].answer) == 0]
    m["critique_acc_on_wrong" + t] = sum(reward(with_crit[i], problems[i].answer) for i in wrong) / max(len(wrong), 1)
    if full:
        m["student_acc_greedy"] = acc(sample(model, tok, [student_prompt(q) for q in qs], 0.0))
        if T != 1.0:
            m["student_acc_t1.0"] = acc(sample(model, tok, [student_prompt(q) for q in qs], 1.0))
        m["reference_acc_greedy"] = acc(sample(model, tok, refs, 0.0))
        sub = wrong[:48]
        m["adv_before_first_error"], m["adv_at_first_error"], m["adv_after_first_error_step"] = first_error_advantage(
            model, tok, [problems[i] for i in sub], [own[i] for i in sub], [crit[i] for i in sub])
    model.train()
    return {k: round(v, 4) for k, v in m.items()}


def targets_met(m: dict[str, float], args) -> bool:
    t = f"_t{args.temperature}"
    s = m["student_acc" + t]
    return (m["parse_rate" + t] >= 0.9 and args.min_acc <= s <= args.max_acc
            and m["critique_acc" + t] >= s + args.gain and m["reference_acc" + t] >= s + args.gain)


def score(m: dict[str, float], args) -> float:
    """Rank snapshots when no snapshot meets the targets: context gains, student acc near the middle."""
    t = f"_t{args.temperature}"
    s = m["student_acc" + t]
    gain = min(m["critique_acc" + t], m["reference_acc" + t]) - s
    return m["parse_rate" + t] + min(gain, args.gain) - abs(s - (args.min_acc + args.max_acc) / 2)


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="fastsd/model/assets/tiny-arith")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", choices=sorted(TASKS), default=DEFAULT_TASK, help="the built-in task to learn")
    ap.add_argument("--copy-task", choices=sorted(TASKS), default="short", help="the task of phase 1")
    ap.add_argument("--long-copy", type=int, default=300,
                    help="phase 1 steps on --task after copying is learned on --copy-task (when they differ)")
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time budget of the whole script")
    ap.add_argument("--steps", type=int, default=3000, help="most optimizer steps")
    ap.add_argument("--copy-steps", type=int, default=500, help="longest phase 1 (learn to copy a context)")
    ap.add_argument("--copy-extra", type=int, default=25, help="phase 1 steps after copying is learned")
    ap.add_argument("--copy-mix", default="0.2,0.55,0.25", help="phase 1 weights of student,critique,reference")
    ap.add_argument("--copy-batch", type=int, default=48, help="phase 1 examples per step")
    ap.add_argument("--mix", default="0.5,0.25,0.25", help="phase 2 weights of student,critique,reference (with 0.68,0.1,0.22 the long-task critique loss rose back above the student loss)")
    ap.add_argument("--batch", type=int, default=14, help="phase 2 examples per step (long traces: 14 hold about as many tokens as 40 of the short task)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-below", type=float, default=0.045, help="measure once the student loss is below this")
    ap.add_argument("--eval-size", type=int, default=64, help="held-out questions measured during training")
    ap.add_argument("--final-eval-size", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.1, help="sampling temperature of the measurements")
    ap.add_argument("--min-acc", type=float, default=0.15, help="lowest student-only accuracy (the paper's regime is about 15-30%%)")
    ap.add_argument("--max-acc", type=float, default=0.3)
    ap.add_argument("--gain", type=float, default=0.2, help="needed accuracy gain with each context")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--config", default="{}", help="JSON overrides of tiny_config")
    return ap.parse_args(argv)


def train_step(model, opt, tok, rng, train, kinds_w: list[float], batch: int) -> dict[str, float]:
    """One optimizer step on `batch` fresh examples; token-mean loss over all their targets.

    Returns each kind's mean loss per target token (for logging and the phase switch).
    """
    kinds = rng.choices(KINDS, kinds_w, k=batch)
    micro = []
    for kind in KINDS:  # micro-batches of one kind and similar length: little padding
        ex = sorted((make_example(k, rng.choice(train), rng) for k in kinds if k == kind),
                    key=lambda e: len(e[0] + e[1]))
        half = (len(ex) + 1) // 2 if len(ex) >= 8 else len(ex)
        micro += [(kind, encode(tok, chunk)) for chunk in (ex[:half], ex[half:]) if chunk]
    n_tok = sum(int((lab >= 0).sum()) for _, (_, lab) in micro)
    sums, counts = dict.fromkeys(KINDS, 0.0), dict.fromkeys(KINDS, 0)
    for kind, (ids, labels) in micro:
        # Right padding and a causal mask: pads only follow real tokens, so no attention mask.
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        (loss / n_tok).backward()
        sums[kind] += loss.item()
        counts[kind] += int((labels >= 0).sum())
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {k: sums[k] / counts[k] for k in KINDS if counts[k]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start, budget = time.monotonic(), 60 * args.minutes
    elapsed = lambda: time.monotonic() - start  # noqa: E731
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config(len(tok), **json.loads(args.config)), dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}", flush=True)
    train = make_split("train", 20000, seed=args.seed + 1, task=args.task)
    copy_train = train if args.copy_task == args.task else make_split("train", 20000, seed=args.seed + 1,
                                                                       task=args.copy_task)
    # Snapshots are chosen on a draw of the held-out split other than fastsd-train's evaluation
    # questions (data seed 0), so that the trainer's before/after figures are not selected on.
    held_out = make_split("test", args.final_eval_size, seed=args.seed + 2, task=args.task)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    copy_mix, mix = ([float(w) for w in m.split(",")] for m in (args.copy_mix, args.mix))
    best, chosen, step, step_s, eval_s = None, None, 0, 0.0, 0.0
    copy_end, ema, learned = args.copy_steps, {}, None
    model.train()
    while step < args.steps:
        # Keep room for the final measurement (about three evals of twice the size) and saving.
        reserve = 6 * max(eval_s, 8.0)
        if elapsed() + step_s + reserve > budget:
            print(f"time budget reached at step {step}", flush=True)
            break
        t0 = time.monotonic()
        phase1 = step < copy_end
        on_copy_task = phase1 and (learned is None or step < learned + args.copy_extra)
        losses = train_step(model, opt, tok, rng, copy_train if on_copy_task else train, copy_mix if phase1 else mix,
                            args.copy_batch if on_copy_task else args.batch)
        sched.step()
        step += 1
        ema.update({k: 0.9 * ema.get(k, v) + 0.1 * v for k, v in losses.items()})
        # Copying the critique shows as a sudden drop of its loss below the student's; once it
        # has, consolidate a little, then move on (phase 2 mostly teaches the arithmetic).
        if phase1 and learned is None and step >= 100 and ema["critique"] < 0.4 * ema["student"]:
            learned = step
            copy_end = step + args.copy_extra + (args.long_copy if copy_train is not train else 0)
            print(f"critique copying learned at step {step}; phase 2 from step {copy_end}", flush=True)
        dt = time.monotonic() - t0
        step_s = dt if step in (1, copy_end + 1) else 0.8 * step_s + 0.2 * dt
        if step % 10 == 0:
            text = " ".join(f"{k} {v:.3f}" for k, v in ema.items())
            print(f"step {step} loss {text} {step_s:.2f}s/step t={elapsed():.0f}s", flush=True)
        # Measure only once the student's loss says it may be near the targets (evals cost time).
        if step > copy_end and step % args.eval_every == 0 and ema["student"] < args.eval_below:
            t1 = time.monotonic()
            m = measure(model, tok, held_out[: args.eval_size], args.seed, args.temperature)
            eval_s = time.monotonic() - t1
            print(f"eval step {step}: {m} ({eval_s:.0f}s)", flush=True)
            if best is None or score(m, args) > best[0]:
                best = (score(m, args), step, copy.deepcopy(model.state_dict()))
            if targets_met(m, args):
                chosen = (step, model.state_dict())
                break
            if m[f"student_acc_t{args.temperature}"] > args.max_acc:
                print("student accuracy above --max-acc: stopping", flush=True)
                break
    if chosen is None:
        chosen = best[1:] if best is not None else (step, model.state_dict())
    model.load_state_dict(chosen[1])
    metrics = measure(model, tok, held_out, args.seed + 7, args.temperature, full=True)
    metrics.update(step=chosen[0], targets_met=targets_met(metrics, args), params=n_params, seed=args.seed, task=args.task,
                   eval_size=len(held_out), wall_s=round(elapsed(), 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.padding_side = "right"
    tok.save_pretrained(out)
    (out / "warmstart_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
