"""Two ranks (FSDP2, gloo, CPU) save a checkpoint, load it into fresh sharded objects and compare.

    torchrun --nproc_per_node 2 --standalone tests/fsdp_checkpoint_worker.py RUN_DIR OUT.json

Each rank shards every decoder layer and a root wrapper (the training layout: the checkpoint
functions get `root.lm`, a non-root submodule), takes one AdamW step, saves, then loads into a
freshly built and sharded model, teacher, optimizer and scheduler. Rank 0 writes the checks to
OUT.json and the full expected state to RUN_DIR/expected.pt (for a single-process load in the test).
"""

import copy
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from fastsd.model.dist import exit_rank
from fastsd.model.load import build_tokenizer, tiny_config
from fastsd.run.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Root(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits


def build(seed, vocab):
    torch.manual_seed(seed)
    cfg = tiny_config(vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64)
    root, teacher = Root(AutoModelForCausalLM.from_config(cfg)), Root(AutoModelForCausalLM.from_config(cfg))
    teacher.requires_grad_(False)
    for r in (root, teacher):
        for layer in r.lm.model.layers:
            fully_shard(layer)
        fully_shard(r)
    opt = torch.optim.AdamW(root.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return root, teacher, opt, sched


def train_step(root, opt, sched, ids):
    root(ids).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def snap(sd: dict) -> dict:
    """A copy: with cpu_offload on CPU the gathered dicts alias live tensors that are not
    sharded (every AdamW `step` tensor), which the next optimizer step changes in place."""
    return copy.deepcopy(sd)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_optim(a: dict, b: dict) -> bool:
    return (a["state"].keys() == b["state"].keys()
            and all(same(a["state"][k], b["state"][k]) for k in a["state"])
            and [g["lr"] for g in a["param_groups"]] == [g["lr"] for g in b["param_groups"]])


def main():
    run_dir, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = build_tokenizer()
    root, teacher, opt, sched = build(0, len(tok))
    ids = torch.randint(0, len(tok), (2, 7), generator=torch.Generator().manual_seed(1))
    train_step(root, opt, sched, ids)
    torch.manual_seed(100 + rank)
    path = save_checkpoint(run_dir, 1, model=root.lm, tokenizer=tok, optimizer=opt, scheduler=sched,
                           state={"step": 1, "pos": 5}, teacher=teacher.lm, keep=2)
    draws = torch.rand(4)
    expect_model = snap(get_model_state_dict(root.lm, options=FULL))
    expect_teacher = snap(get_model_state_dict(teacher.lm, options=FULL))
    expect_optim = snap(get_optimizer_state_dict(root.lm, opt, options=FULL))
    expect_sched = snap(sched.state_dict())
    train_step(root, opt, sched, ids)  # the continuation the restored run must reproduce
    expect_next = get_model_state_dict(root.lm, options=FULL)

    root2, teacher2, opt2, sched2 = build(7, len(tok))
    torch.manual_seed(999)
    state = load_checkpoint(path, model=root2.lm, optimizer=opt2, scheduler=sched2, teacher=teacher2.lm)
    draws2 = torch.rand(4)
    got_model = snap(get_model_state_dict(root2.lm, options=FULL))
    got_teacher = snap(get_model_state_dict(teacher2.lm, options=FULL))
    got_optim = snap(get_optimizer_state_dict(root2.lm, opt2, options=FULL))
    got_sched = snap(sched2.state_dict())
    train_step(root2, opt2, sched2, ids)
    got_next = get_model_state_dict(root2.lm, options=FULL)

    rng_ok = [None] * world
    dist.all_gather_object(rng_ok, torch.equal(draws, draws2))

    # an error on rank 0 (here: weights missing) is raised on every rank instead of hanging them
    broken = Path(run_dir) / "broken"
    if rank == 0:
        shutil.copytree(path, broken)
        (broken / "hf" / "model.safetensors").unlink()
    dist.barrier()
    try:
        load_checkpoint(broken, model=root2.lm)
        raised = None
    except (ValueError, RuntimeError) as e:
        raised = type(e).__name__
    errors = [None] * world
    dist.all_gather_object(errors, raised)
    if rank == 0:
        checks = {
            "path_is_latest": latest_checkpoint(run_dir) == path,
            "state": state == {"step": 1, "pos": 5},
            "weights": same(expect_model, got_model),
            "teacher": same(expect_teacher, got_teacher),
            "optimizer": same_optim(expect_optim, got_optim),
            "scheduler": expect_sched == got_sched,
            "rng_all_ranks": all(rng_ok),
            "next_step": same(expect_next, got_next),
            "weights_changed_by_step": not same(expect_model, expect_next),
            "error_on_every_rank": errors == ["ValueError"] + ["RuntimeError"] * (world - 1),
        }
        torch.save({"model": expect_model, "teacher": expect_teacher, "optimizer": expect_optim,
                    "ids": ids}, f"{run_dir}/expected.pt")
        with open(out_path, "w") as f:
            json.dump({"checks": checks, "path": str(path), "world": world}, f)
    dist.barrier()  # rank 1 must not tear its connections down while rank 0 still writes
    dist.destroy_process_group()
    exit_rank(0)


if __name__ == "__main__":
    main()
