"""Peak RSS and seconds per step: full fine-tuning with teacher=initial (a second, frozen copy of
the model) against LoRA with the adapter-disabled teacher (no copy), on the CPU, one process.

    python bench/lora_memory.py                     # both variants, 4 steps each, a ~25M Qwen3
    python bench/lora_memory.py --steps 6 --r 64 --hidden 512 --layers 8

The model is a random Qwen3 (tied embeddings, the built-in character tokenizer) built at run time
into a temporary folder. Each variant runs in its own process (peak RSS is per process). A step is
one update (`fastsd.update.update`: teacher forward, student forward + fused loss + backward, AdamW)
on 4 fixed rollouts of 128 random response tokens with condition=reference teacher prompts, the
same in both variants; sampling is left out (its length would differ as the models drift apart).
Seconds per step are the median after the first step, wall clock and process CPU time (the CPU
time is the steadier one on a shared machine); the load average is read before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def build_model(path: str, hidden: int, layers: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from fastsd.model.load import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), head_dim=64,
                      tie_word_embeddings=True, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
                      bos_token_id=None)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def fixed_rollouts(cfg, tok, train_set, n: int, length: int):
    """`n` rollouts with `length` random response tokens each (+ EOS), the same in every variant, so
    both do the same work (sampled responses would differ in length as the two models drift apart)."""
    import torch

    from fastsd.feedback import feedback
    from fastsd.feedback.prompts import encode, student_prompt
    from fastsd.rollout import Rollout
    from fastsd.tasks.format import parse_response

    g = torch.Generator().manual_seed(0)
    rolls = [Rollout(ex, encode(tok, student_prompt(ex.question, cfg.templates.student)),
                     torch.randint(3, len(tok), (length,), generator=g).tolist() + [tok.eos_token_id],
                     parse_response(""), 0.0, i) for i, ex in enumerate(train_set[:n])]
    feedback(cfg, tok, rolls, None)  # condition=reference: the teacher reads the reference solution
    return rolls


def run_variant(model_dir: str, variant: str, steps: int, r: int) -> dict:
    """One variant in this process: build, `steps` updates on fixed rollouts; returns the figures."""
    import torch

    from fastsd.config import load_config
    from fastsd.model.dist import Dist
    from fastsd.run.build import build_models, build_optim
    from fastsd.tasks.data import load_data
    from fastsd.update import update

    lora = [f"model.lora.r={r}"] if variant == "lora" else []
    cfg = load_config(overrides=[f"model={model_dir}", "condition=reference", "teacher=initial", f"steps={steps}",
                                 "optim.micro_batch=4", "data.train_size=64", *lora])
    d = Dist()
    torch.manual_seed(0)
    policy, teacher, tok = build_models(cfg, d)
    opt, sched = build_optim(cfg, policy)
    rolls = fixed_rollouts(cfg, tok, load_data(cfg)[0], n=4, length=128)
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        update(cfg, d, policy, teacher, opt, sched, tok, rolls, step)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters()) if hasattr(teacher, "parameters") else 0
    opt_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    return {"variant": variant, "trained": trained, "total": total, "teacher_params": teacher_params,
            "optimizer_numel": opt_numel, "rss_built_mib": rss_built / 1024,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "s_per_step": statistics.median(times[1:] or times), "step_times": times,
            "cpu_s_per_step": statistics.median(cpu[1:] or cpu), "step_cpu": cpu, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_variant(*args.child, args.steps, args.r)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        n = build_model(tmp, args.hidden, args.layers)
        print(f"random Qwen3: {n / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers); "
              f"load average before: {os.getloadavg()}", flush=True)
        rows = []
        for variant in ("full", "lora"):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--r", str(args.r),
                                  "--child", tmp, variant], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"load average after: {os.getloadavg()}")
    print("| variant | parameters trained | teacher's own parameters | AdamW state (elements) | RSS after build (MiB) "
          "| peak RSS (MiB) | s/step (median) | CPU s/step (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "full fine-tuning, teacher=initial (copy)" if r["variant"] == "full" else \
            f"LoRA r={args.r}, teacher=initial (adapter off)"
        print(f"| {name} | {r['trained'] / 1e6:.2f}M of {r['total'] / 1e6:.2f}M ({100 * r['trained'] / r['total']:.1f}%) "
              f"| {r['teacher_params'] / 1e6:.2f}M | {r['optimizer_numel'] / 1e6:.2f}M | {r['rss_built_mib']:.0f} "
              f"| {r['peak_rss_mib']:.0f} | {r['s_per_step']:.1f} | {r['cpu_s_per_step']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
