"""LoRA under FSDP2 (gloo, CPU): one step, save, load into freshly built models, one more step on both.

    torchrun --nproc_per_node 2 --standalone tests/fsdp_lora_worker.py RUN_DIR OUT.pt [key=value ...]

The fresh models are built from another seed (other adapter A matrices), so equal results mean the
checkpoint restored them. Rank 0 writes to OUT.pt every adapter's full weights as saved, as
loaded, and after the next step of both (which a bitwise resume makes equal), and the checkpoint path.
"""

import sys

import torch
from fsdp_train_worker import fixed_rollouts

from fastsd.config import load_config
from fastsd.feedback import feedback
from fastsd.feedback.critic import ArithCritic
from fastsd.model import dist
from fastsd.run.adapter_checkpoint import gather_adapters
from fastsd.run.build import build_models, build_optim
from fastsd.run.checkpoint import load_checkpoint, save_checkpoint
from fastsd.update import update


def main():
    run_dir, out_path, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(overrides=["optim.micro_batch=3", "optim.warmup_steps=0", "optim.lr=1e-2",
                                 "model.lora.r=8", "teacher=ema", "teacher.ema_rate=0.5", *overrides])
    d = dist.setup()

    def build(seed):
        torch.manual_seed(seed)
        policy, teacher, tok = build_models(cfg, d)
        return policy, teacher, tok, *build_optim(cfg, policy)

    policy, teacher, tok, opt, sched = build(0)
    rolls = fixed_rollouts(cfg, tok)
    feedback(cfg, tok, rolls, ArithCritic())
    mine = rolls[d.rank::d.world]
    update(cfg, d, policy, teacher, opt, sched, tok, mine, 0)
    path = save_checkpoint(run_dir, 1, model=policy.lm, tokenizer=tok, optimizer=opt, scheduler=sched,
                           state={"step": 1}, teacher=teacher.lm, keep=2)
    saved = gather_adapters(policy.lm)
    policy2, teacher2, _, opt2, sched2 = build(1)
    load_checkpoint(path, model=policy2.lm, optimizer=opt2, scheduler=sched2, teacher=teacher2.lm)
    loaded = gather_adapters(policy2.lm)
    stats = [update(cfg, d, p, t, o, s, tok, mine, 1) for p, t, o, s in
             ((policy, teacher, opt, sched), (policy2, teacher2, opt2, sched2))]
    after = [gather_adapters(policy.lm), gather_adapters(policy2.lm)]
    if d.main:
        torch.save({"saved": saved, "loaded": loaded, "after": after, "stats": stats, "path": str(path),
                    "world": d.world}, out_path)
    dist.teardown(d)
    dist.exit_rank(0)


if __name__ == "__main__":
    main()
