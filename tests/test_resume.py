"""Resume and the run directory: a stopped run goes on as if never stopped, the checkpoint schedule
changes nothing, changed settings take effect, and the logs say what ran."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import SMALL, config, read_jsonl, train_rows
from transformers import AutoModelForCausalLM

from fastsd.config import load_config
from fastsd.model.dist import Dist
from fastsd.run import run_dir as run_dir_mod
from fastsd.run.checkpoint import latest_checkpoint
from fastsd.train import train

REPO = Path(__file__).resolve().parents[1]


def test_resume_gives_the_same_next_step(tmp_path):
    train(config(tmp_path / "a", "steps=3"), Dist())
    train(config(tmp_path / "b", "steps=2"), Dist())
    train(config(tmp_path / "b", "steps=3"), Dist())  # resume=auto: from step 2's checkpoint
    a, b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("loss", "gap", "grad_norm", "reward"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7), key
    responses = lambda d: [r["response"] for r in read_jsonl(d / "rollouts.jsonl") if r["step"] == 3]  # noqa: E731
    assert responses(tmp_path / "b") == responses(tmp_path / "a")  # RNG state restored
    a_sd = AutoModelForCausalLM.from_pretrained(latest_checkpoint(tmp_path / "a") / "hf").state_dict()
    b_sd = AutoModelForCausalLM.from_pretrained(latest_checkpoint(tmp_path / "b") / "hf").state_dict()
    assert all(torch.allclose(v, b_sd[k], rtol=0, atol=1e-6) for k, v in a_sd.items())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("condition", ["grpo", "reference", "critique"])
def test_stopping_and_the_checkpoint_schedule_never_change_the_numbers(tmp_path, condition, lora):
    """Straight, stopped after step 2 and resumed, and checkpointed every step: the same losses,
    gradient norms, rewards and rollouts (token ids), bit for bit, for every condition, full
    fine-tuning and LoRA."""
    common = ["eval=off", f"condition={condition}", *(["rollout.group_size=2"] if condition == "grpo" else []),
              *(["model.lora.r=4"] if lora else [])]
    train(config(tmp_path / "straight", *common, "steps=2"), Dist())
    train(config(tmp_path / "resumed", *common, "steps=1"), Dist())
    train(config(tmp_path / "resumed", *common, "steps=2"), Dist())
    train(config(tmp_path / "every", *common, "steps=2", "checkpoint.every=1"), Dist())
    runs = {name: train_rows(tmp_path / name) for name in ("straight", "resumed", "every")}
    keys = ("loss", "gap", "grad_norm", "reward", "usable", "lr")
    want = [[r[k] for k in keys] for r in runs["straight"]]
    assert len(want) == 2 and all([[r[k] for k in keys] for r in rows] == want for rows in runs.values()), runs
    ids = {name: [(r["step"], r["prompt_ids"], r["response_ids"], r["teacher_prompt_ids"])
                  for r in read_jsonl(tmp_path / name / "rollouts.jsonl")] for name in runs}
    assert ids["resumed"] == ids["straight"] == ids["every"]


def test_resume_with_the_importance_correction_is_bitwise(tmp_path):
    """loss.is_clip: the sampler's log-probs ride on the rollouts of the step; stopped after step 1
    and resumed, the losses, entropies and clipped shares are those of the straight run, bit for bit."""
    common = ["eval=off", "condition=reference", "loss.is_clip=1.02"]
    train(config(tmp_path / "straight", *common, "steps=2"), Dist())
    train(config(tmp_path / "resumed", *common, "steps=1"), Dist())
    train(config(tmp_path / "resumed", *common, "steps=2"), Dist())
    keys = ("loss", "gap", "grad_norm", "reward", "entropy", "is_clipped")
    rows = {name: [[r[k] for k in keys] for r in train_rows(tmp_path / name)] for name in ("straight", "resumed")}
    assert len(rows["straight"]) == 2 and rows["resumed"] == rows["straight"], rows


def test_the_logged_lr_is_the_rate_each_step_trained_at(tmp_path):
    """Warm-up then linear decay over 3 steps: factors 0.5, 1, 0.5 (the schedule is stepped after
    each optimizer step, so reading it after the update logged the next step's rate)."""
    train(config(tmp_path, "steps=3", "eval=off", "optim.lr=1e-3", "optim.warmup_steps=1",
                 "optim.schedule=linear"), Dist())
    assert [r["lr"] for r in train_rows(tmp_path)] == pytest.approx([5e-4, 1e-3, 5e-4], rel=1e-12)


def test_a_resumed_run_trains_with_the_changed_optimizer_settings(tmp_path):
    """lr, betas, weight decay and the schedule changed on resume take effect (they were logged
    as changed, recorded in config.yaml, and then the checkpoint's own were used)."""
    train(config(tmp_path, "steps=1", "eval=off", "optim.lr=1e-3", "optim.warmup_steps=0"), Dist())
    train(config(tmp_path, "steps=3", "eval=off", "optim.lr=6e-4", "optim.warmup_steps=0", "optim.betas=[0.5,0.6]",
                 "optim.weight_decay=0.1", "optim.schedule=linear"), Dist())
    assert [r["lr"] for r in train_rows(tmp_path)] == pytest.approx([1e-3, 4e-4, 2e-4], rel=1e-12)
    groups = torch.load(latest_checkpoint(tmp_path) / "trainer_state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.5, 0.6) and g["weight_decay"] == 0.1 and g["initial_lr"] == 6e-4
               for g in groups)


def test_a_finished_run_rerun_with_eval_off_says_there_is_nothing_to_do(tmp_path, capsys):
    train(config(tmp_path, "steps=1", "eval=off"), Dist())
    capsys.readouterr()
    train(config(tmp_path, "steps=1", "eval=off"), Dist())
    out = capsys.readouterr().out
    assert "(the run is complete; eval=off: nothing to do)" in out and "evaluating it again" not in out


def test_resume_cuts_the_logs_back_to_the_checkpoint(tmp_path, capsys):
    """A run killed after step 3 but before its checkpoint: the resumed run writes step 3 (and the
    final evaluation) again, so the logs must not hold them twice."""
    run = config(tmp_path, "steps=3", "checkpoint.every=2", "checkpoint.keep=3")
    train(run, Dist())
    shutil.rmtree(latest_checkpoint(tmp_path))  # step 3's checkpoint never happened
    assert latest_checkpoint(tmp_path).name.endswith("2")
    train(run, Dist())
    assert "metrics.jsonl: cut back to step 2" in capsys.readouterr().out
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in metrics if "reward" in r] == [1, 2, 3]
    assert sum(bool(r.get("final")) for r in metrics) == 1
    assert [r["step"] for r in read_jsonl(tmp_path / "rollouts.jsonl")] == [1, 1, 2, 2, 3, 3]
    train(run, Dist())  # complete: evaluated again, still one final row
    assert "the run is complete" in capsys.readouterr().out
    assert sum(bool(r.get("final")) for r in read_jsonl(tmp_path / "metrics.jsonl")) == 1


def test_a_damaged_log_line_is_moved_aside_with_its_line_number_never_dropped(tmp_path):
    """A garbled line in the middle of metrics.jsonl and a torn last line of rollouts.jsonl, on
    resume at step 2: moved to *.damaged with their line numbers, and the message says their rows
    are not written again (it said they were)."""
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n{"step": 2, "lo\xffss": \n{"step": 3}\n')
    (tmp_path / "rollouts.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "resp')
    said = run_dir_mod.prepare_run_dir(config(tmp_path, "steps=3"), tmp_path / "checkpoints/x", 2)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1}]
    assert read_jsonl(tmp_path / "rollouts.jsonl") == [{"step": 1}, {"step": 2}]
    assert read_jsonl(tmp_path / "metrics.jsonl.damaged") == [{"line": 2, "text": '{"step": 2, "lo\udcffss": \n'}]
    assert read_jsonl(tmp_path / "rollouts.jsonl.damaged") == [{"line": 3, "text": '{"step": 3, "resp'}]
    assert ("metrics.jsonl: 1 damaged line(s) (line 2: not a JSON object) moved to metrics.jsonl.damaged with their "
            "line numbers; the rows they held are not written again") in said
    assert "metrics.jsonl: cut back to step 2 (1 rows of later steps, written again as the run goes on)" in said
    assert not any("rollouts.jsonl: cut back" in line for line in said)


def test_run_dir_of_an_earlier_run(tmp_path, capsys):
    train(config(tmp_path, "steps=1"), Dist())
    with pytest.raises(ValueError, match="resume: never, but run_dir"):  # would mix two runs
        train(config(tmp_path, "steps=1", "resume=never"), Dist())
    train(config(tmp_path, "steps=2", "optim.lr=1e-4"), Dist())  # resumed with a changed config: said, kept
    out = capsys.readouterr().out
    assert "config changed since the checkpoint" in out and "optim.lr: 0.0002 -> 0.0001" in out
    assert load_config(str(tmp_path / "config.before_step_1.yaml")).optim.lr == 2e-4
    assert load_config(str(tmp_path / "config.yaml")).optim.lr == 1e-4
    train(config(tmp_path, "steps=2", "optim.lr=1e-4", f"resume={latest_checkpoint(tmp_path)}"), Dist())
    assert "config changed" not in capsys.readouterr().out  # how to resume is not what runs
    fresh = tmp_path / "fresh"  # logs but no checkpoint (killed before the first, twice): moved aside
    fresh.mkdir()
    for attempt in ("a", "b"):
        (fresh / "metrics.jsonl").write_text(f'{{"step": 0, "attempt": "{attempt}"}}\n')
        prepare = run_dir_mod.prepare_run_dir(config(fresh, "steps=1"), None, 0)
        assert any("metrics.jsonl moved to" in line for line in prepare)
    assert "a" in (fresh / "metrics.jsonl.old").read_text() and "b" in (fresh / "metrics.jsonl.old.1").read_text()
    (fresh / "metrics.jsonl").write_text('[]\n{"step": 1}\n{"step": 2, "eval": 1}\n{"step": 2, "final": true}\n')
    (fresh / "config.yaml").write_text("- not a mapping\n")
    prepare = run_dir_mod.prepare_run_dir(config(fresh, "steps=2"), fresh / "checkpoints/x", 1)
    assert read_jsonl(fresh / "metrics.jsonl") == [{"step": 1}] and any("config changed" in x for x in prepare)


def test_two_processes_stopping_and_the_checkpoint_schedule_never_change_the_numbers(tmp_path):
    """The same under torchrun (2 processes, FSDP2, gloo): every rank's random state and shard
    restored, every rank's rollouts logged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(name: str, *overrides: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "fastsd.cli", *SMALL, "eval=off", f"run_dir={tmp_path / name}", *overrides]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run("straight", "steps=2")
    run("every", "steps=2", "checkpoint.every=1")
    shutil.copytree(tmp_path / "every", tmp_path / "resumed")  # as if stopped before step 2's checkpoint:
    shutil.rmtree(latest_checkpoint(tmp_path / "resumed"))  # the logs are cut back and step 2 runs again
    run("resumed", "steps=2", "checkpoint.every=1")
    keys = ("loss", "gap", "grad_norm", "reward", "usable", "lr")
    rows = {name: [[r[k] for k in keys] for r in train_rows(tmp_path / name)] for name in ("straight", "resumed", "every")}
    assert len(rows["straight"]) == 2 and rows["resumed"] == rows["straight"] == rows["every"], rows
    ids = {name: [(r["step"], r["prompt_ids"], r["response_ids"]) for r in read_jsonl(tmp_path / name / "rollouts.jsonl")]
           for name in rows}
    assert len(ids["straight"]) == 4 and ids["resumed"] == ids["straight"] == ids["every"]
