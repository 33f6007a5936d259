"""TRL's trainers' loss step on the CPU: TRL's own path against fastsd's (use_fastsd_loss) and Liger's.

    python bench/trl_loss.py                      # docs/trl.md's table: V=32000, D=256, B=4, 256 tokens
    python bench/trl_loss.py --tiny               # a few seconds: the smoke test's run

One step = the trainer's compute_loss, forward (student and teacher) and backward, on one batch
of random token ids; no optimizer step. Runs, on a Llama of random weights built here (student
and teacher from two seeds, `--vocab`, `--hidden`, 2 layers), bf16 off (fp32):
  gkd   TRL's GKDTrainer (beta 0.5): trl, fastsd, liger (Liger-Kernel's LigerFusedLinearJSDLoss on the
        same hidden states with TRL's beta and -100 labels: TRL 1.16's GKD has no Liger path of its own;
        --liger-compiled adds it under torch.compile)
  sdpo  TRL's SDPOTrainer, distillation_mode full_logits (alpha 0.5) and topk_logits (k 64, with the
        tail): trl, fastsd (TRL 1.16's SDPO has no Liger path; Liger has no top-k loss)
Timing: all paths of a trainer in one process, interleaved, one untimed warm-up step each, the
median of `--rounds`. Memory: each path in a fresh process: the peak RSS (VmHWM reset through
/proc/self/clear_refs) during a second step above the RSS before it. Every path's loss is printed
with its relative difference to TRL's own. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from datetime import datetime, timezone

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests", "integrations")]
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from cpu_peers import _cpu, _status, _versions, finish  # noqa: E402
from trl_setup import gkd_batch, gkd_trainer, save_tiny, sd_batch, sd_trainer  # noqa: E402

from fastsd.integrations.trl import _hidden_forward, use_fastsd_loss  # noqa: E402

RUNS = {
    "gkd": (["trl", "fastsd", "liger"], dict(beta=0.5)),
    "sdpo_full": (["trl", "fastsd"], dict(distillation_mode="full_logits", distillation_alpha=0.5)),
    "sdpo_topk": (["trl", "fastsd"], dict(distillation_mode="topk_logits", distillation_topk=64,
                                           distillation_add_tail=True, distillation_alpha=0.5)),
}
SHAPES = {"full": dict(vocab=32000, hidden=256, batch=4, tokens=256),
          "tiny": dict(vocab=300, hidden=32, batch=2, tokens=8)}


def _liger_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    student = _hidden_forward(self, model, inputs["input_ids"], inputs["attention_mask"], None)
    with torch.no_grad():
        teacher = _hidden_forward(self, self.teacher_model, inputs["input_ids"], inputs["attention_mask"], None)
    d = student.hidden.shape[-1]
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=self.beta,
                                   compiled=self._liger_compiled)
    return loss(student.hidden.reshape(-1, d), student.weight, teacher.hidden.reshape(-1, d), teacher.weight,
                inputs["labels"][:, 1:].reshape(-1))


def build(run, path, shape, root):
    """The trainer of `run` on the saved models, switched to `path`, and its batch."""
    paths, config = RUNS[run]
    overrides = dict(hidden_size=shape["hidden"], intermediate_size=3 * shape["hidden"], num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=shape["hidden"] // 4)
    student = os.path.join(root, "student")
    if not os.path.exists(student):
        save_tiny(student, 0, vocab_size=shape["vocab"], **overrides)
        save_tiny(os.path.join(root, "teacher"), 1, vocab_size=shape["vocab"], **overrides)
    g = torch.Generator().manual_seed(0)
    b, t = shape["batch"], shape["tokens"]
    if run == "gkd":
        trainer = gkd_trainer(student, os.path.join(root, "teacher"), os.path.join(root, "out"), **config)
        batch = gkd_batch(shape["vocab"], g, b=b, length=t + 16, prompt=16, ragged=False)
    else:
        trainer = sd_trainer("sdpo", student, os.path.join(root, "out"), **config)
        batch = sd_batch(shape["vocab"], g, b=b, prompt=16, teacher_prompt=32, completion=t, ragged=False)
    if path == "fastsd":
        use_fastsd_loss(trainer)
    elif path.startswith("liger"):
        trainer.compute_loss = types.MethodType(_liger_compute_loss, trainer)
        trainer._liger_compiled = path == "liger_compiled"
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer, batch


def step(trainer, batch) -> float:
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.item()


def child_memory(run, path, shape, root) -> int:
    trainer, batch = build(run, path, shape, root)
    step(trainer, batch)  # thread pools, the autograd engine, the optimizer-free grads: allocated once
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(trainer, batch)
    return _status("VmHWM") - before


def time_paths(run, shape, rounds, root):
    built = {p: build(run, p, shape, root) for p in RUNS[run][0]}
    losses = {p: step(*built[p]) for p in built}  # warm-up, untimed
    times = {p: [] for p in built}
    for r in range(rounds):
        order = list(built)[r % len(built):] + list(built)[:r % len(built)]
        for p in order:
            t0 = time.perf_counter()
            step(*built[p])
            times[p].append(time.perf_counter() - t0)
    return losses, times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny shape and 2 rounds (the smoke test)")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--liger-compiled", action="store_true",
                   help="add liger_compiled to gkd's paths (torch.compile: its warm-up takes minutes on a CPU)")
    p.add_argument("--json", default="runs/trl_loss.json")  # runs/ is not tracked
    p.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)  # run path root
    a = p.parse_args(argv)
    shape = SHAPES["tiny" if a.tiny else "full"]
    if a.liger_compiled:
        RUNS["gkd"][0].append("liger_compiled")
    if a._child:
        print(child_memory(a._child[0], a._child[1], shape, a._child[2]))
        return
    rounds = 2 if a.tiny else a.rounds
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=_cpu(),
                threads=torch.get_num_threads(), versions=_versions(), shape=shape, rounds=rounds,
                loadavg_start=os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for run in a.runs:
            losses, times = time_paths(run, shape, rounds, root)
            for path in RUNS[run][0]:
                cmd = [sys.executable, __file__, "--_child", run, path, root] + (["--tiny"] if a.tiny else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
                rss = int(out.stdout.strip().splitlines()[-1])
                rows.append(dict(run=run, path=path, loss=losses[path], median_s=statistics.median(times[path]),
                                 times_s=times[path], peak_rss_mib=rss / 2**20,
                                 loss_rel_diff_to_trl=abs(losses[path] - losses["trl"]) / abs(losses["trl"])))
    print("| trainer | path | step (median s) | x TRL | peak RSS (MiB) | x TRL | loss | rel. diff to TRL |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(x for x in rows if x["run"] == r["run"] and x["path"] == "trl")
        mem_ratio = f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}" if ref["peak_rss_mib"] > 0 else "-"
        print(f"| {r['run']} | {r['path']} | {r['median_s']:.3f} | {r['median_s'] / ref['median_s']:.2f} | "
              f"{r['peak_rss_mib']:.0f} | {mem_ratio} | {r['loss']:.6g} | {r['loss_rel_diff_to_trl']:.1e} |")
    finish(meta, dict(meta=meta, rows=rows), a.json, f", shape {shape}, {rounds} rounds")
    return rows


if __name__ == "__main__":
    main()
