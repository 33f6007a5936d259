"""One self-distillation update end to end, per loss path: step time, response tokens/s, peak memory.

    python bench/e2e_step.py                                  # GPU: Qwen2.5-1.5B shape, bf16, random weights
    python bench/e2e_step.py --batch 4 8 --paths fastsd plain --ckpt off
    torchrun --nproc_per_node 1 bench/e2e_step.py --fsdp --paths fastsd --batch 4   # the FSDP2 overhead
    python bench/e2e_step.py --cpu-smoke                      # tiny model on the CPU (checks the script)

The update (the trainer's, `teacher=initial`, forward KL): the frozen teacher (a copy of the
initial weights) reads a 768-token prompt + the response without gradient, the student reads a
512-token prompt + the response with gradient, the loss covers the 2048 response positions of
each sequence, then one AdamW step. Loss paths, everything else equal:

    fastsd         the decoder bodies' hidden states at the response positions, then
                   fastsd.fused_linear_divergence (the trainer's Policy, mode "divergence")
    plain          model(...).logits for both, then the divergence in PyTorch (fp32 softmax)
    liger_fljsd    hidden states, then liger-kernel's LigerFusedLinearJSD (jsd_beta=0: forward KL)
    liger_chunked  hidden states, then liger-kernel's compiled LigerFusedLinearJSDLoss (beta=0)

For each path, activation checkpointing off and on (`--ckpt`), and each batch: the mean of
`--steps` timed updates after one warm-up, response tokens/s, and the peak memory. Out of memory
is recorded, not fatal, and the largest batch that fits is reported. For the fastsd path the
time of one update is also split into teacher forward, student forward + loss, backward and
optimizer step. Writes JSON to --out and prints markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastsd.model.policy import Policy, shard  # noqa: E402

QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6)
PATHS = ("fastsd", "plain", "liger_fljsd", "liger_chunked")


def build(args, device="cpu"):
    """The model with random weights, made on `device`; the same weights on every call (seed 0)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if args.cpu_smoke:
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=300, tie_word_embeddings=True)
        dtype = torch.float32
    else:
        cfg = Qwen2Config(**QWEN_1_5B)
        dtype = torch.bfloat16
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # initialised there: no host copy
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)


def make_batch(lm, B, args, device):
    V = lm.config.vocab_size
    g = torch.Generator().manual_seed(B)
    R = args.response
    s_ids = torch.randint(0, V, (B, args.student_prompt + R), generator=g)
    t_ids = torch.cat([torch.randint(0, V, (B, args.teacher_prompt), generator=g), s_ids[:, args.student_prompt:]], 1)
    # position p predicts token p + 1: the response tokens are predicted from the R positions before them
    s_index = torch.cat([torch.arange(args.student_prompt - 1, args.student_prompt - 1 + R) + b * s_ids.shape[1] for b in range(B)])
    t_index = torch.cat([torch.arange(args.teacher_prompt - 1, args.teacher_prompt - 1 + R) + b * t_ids.shape[1] for b in range(B)])
    targets = s_ids[:, args.student_prompt:].reshape(-1)
    ones = lambda t: torch.ones_like(t)  # noqa: E731
    return [x.to(device) for x in (s_ids, ones(s_ids), s_index, t_ids, ones(t_ids), t_index, targets)]


def loss_fn(path, student, teacher, batch, args):
    s_ids, s_attn, s_index, t_ids, t_attn, t_index, targets = batch
    R = args.response
    if path == "plain":
        with torch.no_grad():
            lt = teacher.lm(input_ids=t_ids, attention_mask=t_attn).logits[:, -R - 1:-1].float().log_softmax(-1)
        ls = student.lm(input_ids=s_ids, attention_mask=s_attn).logits[:, -R - 1:-1].float().log_softmax(-1)
        return torch.nn.functional.kl_div(ls.flatten(0, 1), lt.flatten(0, 1), log_target=True, reduction="batchmean")
    with torch.no_grad():
        h_t = teacher(t_ids, t_attn, t_index, mode="hidden")
    if path == "fastsd":
        return student(s_ids, s_attn, s_index, mode="divergence", teacher_hidden=h_t, teacher_weight=teacher.head_weight,
                       targets=targets, loss_kw={"divergence": "forward_kl"}).loss / targets.numel()
    h_s = student(s_ids, s_attn, s_index, mode="hidden")
    if path == "liger_fljsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        return LigerFusedLinearJSD(jsd_beta=0.0)(h_s, student.head_weight, h_t, teacher.head_weight, None)  # no labels
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=True)
    return fn(h_s, student.head_weight, h_t, teacher.head_weight, targets)


def run_case(path, B, ckpt, args, device, fsdp):
    """One (path, batch, checkpointing) case: a dict with timings and memory, or the failure.
    Student and teacher are made per case (the same initial weights), so each case's peak memory
    holds only its own."""
    lm = teacher = student = opt = batch = None
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    phases = {"teacher forward": 0.0, "student forward + loss": 0.0, "backward": 0.0, "optimizer": 0.0}

    def setup():
        nonlocal lm, teacher, student, opt, batch
        lm = build(args, device)
        teacher = Policy(build(args, device).eval().requires_grad_(False))
        if ckpt:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student = Policy(lm.train())
        if fsdp:
            shard(student, mixed_precision=False)
            shard(teacher, mixed_precision=False)
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-6, fused=device.type == "cuda")
        batch = make_batch(lm, B, args, device)

    def step(split: bool):
        def mark(name, t0):
            if split:
                sync()
                phases[name] += time.perf_counter() - t0
            return time.perf_counter()

        t = time.perf_counter()
        if split and path == "fastsd":  # the teacher's share, measured apart
            with torch.no_grad():
                teacher(batch[3], batch[4], batch[5], mode="hidden")
            t = mark("teacher forward", t)
        loss = loss_fn(path, student, teacher, batch, args)
        t = mark("student forward + loss", t)
        loss.backward()
        t = mark("backward", t)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer", t)

    try:
        setup()
        step(False)  # warm-up (compiles liger's chunked loss)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(False)
        sync()
        secs = (time.perf_counter() - t0) / args.steps
        row = dict(status="ok", step_s=secs, resp_tok_per_s=B * args.response / secs,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
        if path == "fastsd":
            try:
                step(True)
                # the split run computes the teacher twice: report the student's side net of it
                phases["student forward + loss"] -= phases["teacher forward"]
                row["phases_s"] = dict(phases)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory in the synchronised run: keep the row
                row["phases_s"] = f"failed: {type(e).__name__}"
    except ImportError as e:
        row = dict(status=f"missing: {e.name}")
    except Exception as e:  # noqa: BLE001 - one failing case must not cost the others' results
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        row = dict(status="OOM" if oom else f"error: {type(e).__name__}: {str(e)[:300]}")
    finally:
        del lm, teacher, student, opt, batch
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--ckpt", choices=["off", "on", "both"], default="both", help="activation checkpointing")
    ap.add_argument("--steps", type=int, default=3, help="timed updates per case (after one warm-up)")
    ap.add_argument("--student-prompt", type=int, default=512)
    ap.add_argument("--teacher-prompt", type=int, default=768)
    ap.add_argument("--response", type=int, default=2048)
    ap.add_argument("--fsdp", action="store_true", help="fully_shard student and teacher (run under torchrun)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (checks the script, not speed)")
    ap.add_argument("--out", default=os.path.join("bench", "out", "e2e_step.json"))
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.batch, args.steps, args.student_prompt, args.teacher_prompt, args.response = [1, 2], 1, 8, 12, 16
        args.paths = [p for p in args.paths if not p.startswith("liger")]  # liger's kernels need a GPU
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: use --cpu-smoke")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    if args.fsdp:
        from fastsd.model import dist

        dist.setup()
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.ckpt]
    meta = {"date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "shape": "tiny" if args.cpu_smoke else "Qwen2.5-1.5B",
            "student_prompt": args.student_prompt, "teacher_prompt": args.teacher_prompt, "response": args.response,
            "workspace_mb": os.environ.get("FASTSD_WORKSPACE_MB", "default")}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows = []
    for ckpt in ckpts:
        for path in args.paths:
            for B in args.batch:
                row = {"path": path, "batch": B, "ckpt": ckpt, "fsdp": args.fsdp,
                       **run_case(path, B, ckpt, args, device, args.fsdp)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "w") as f:  # after every case: a time limit keeps what was done
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
                if row["status"] == "OOM":
                    break  # larger batches will not fit either
    print(f"\n{meta['date']}, {meta['device']}, {meta['shape']}, prompts {args.student_prompt}/{args.teacher_prompt}, "
          f"{args.response} response tokens per sequence{', FSDP2' if args.fsdp else ''}\n")
    print("| path | ckpt | batch | step s | resp tok/s | peak GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        ok = r["status"] == "ok"
        peak = f"{r['peak_gib']:.1f}" if ok and r["peak_gib"] is not None else "n/a" if ok else ""
        print(f"| {r['path']} | {'on' if r['ckpt'] else 'off'} | {r['batch']} | "
              + (f"{r['step_s']:.3f} | {r['resp_tok_per_s']:,.0f} | {peak} |" if ok else f"{r['status']} | | |"))
    print("\nLargest batch that fits:")
    for ckpt in ckpts:
        for path in args.paths:
            fits = [r["batch"] for r in rows if r["path"] == path and r["ckpt"] == ckpt and r["status"] == "ok"]
            print(f"- {path}, checkpointing {'on' if ckpt else 'off'}: {max(fits) if fits else 'none'}")
    split = [r for r in rows if isinstance(r.get("phases_s"), dict)]
    if split:
        r = split[0]
        total = sum(r["phases_s"].values())
        print(f"\nWhere an update goes (fastsd, batch {r['batch']}, checkpointing {'on' if r['ckpt'] else 'off'}): "
              + ", ".join(f"{k} {v / total:.0%}" for k, v in r["phases_s"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
