"""What a user watches: the step rate and time left count training steps only, an evaluation's
progress moves within a batch of samples, and its log line gives its samples/s."""

from __future__ import annotations

import sys

import pytest
import torch

from fastsd import cli
from fastsd.config import load_config
from fastsd.model.dist import Dist
from fastsd.model.load import load_model_and_tokenizer
from fastsd.model.policy import Policy
from fastsd.rollout.sample import sample
from fastsd.run import progress as progress_mod
from fastsd.run.progress import Progress

SMALL = ["steps=1", "questions_per_step=2", "data.train_size=16", "optim.micro_batch=2"]
STEP = {"time_rollout": 1.0, "time_feedback": 0.25, "time_update": 0.75}  # a 2 s training step


def test_the_step_rate_and_time_left_leave_the_evaluations_out(capsys):
    cfg = load_config(overrides=["steps=10", "eval.every=5", "log_every=1"])
    shown = Progress(cfg, True, 0)
    shown.step(1, {"loss": 0.5, **STEP})
    shown.evaluated(100.0)  # a long evaluation between two 2 s steps is not a slow step
    shown.step(2, {"loss": 0.4, **STEP})
    out = capsys.readouterr().out.splitlines()
    # 8 steps left at 2 s, and two evaluations still due (at step 5 and the final one) at 100 s each
    assert out[-1] == "[fastsd] step 2/10 loss=0.4 (2 s/step, 3:36 left)"
    assert out[0] == "[fastsd] step 1/10 loss=0.5 (2 s/step, 0:18 left)"  # no evaluation timed yet
    off = Progress(load_config(overrides=["steps=10", "eval=off"]), True, 0)
    off.step(1, STEP)
    assert capsys.readouterr().out.strip().endswith("(2 s/step, 0:18 left)")


def test_on_a_terminal_the_step_bar_shows_the_training_rate(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    shown = Progress(load_config(overrides=["steps=4"]), True, 0)
    shown.step(1, {"loss": 0.5, **STEP})
    shown.evaluated(60.0)
    shown.step(2, {"loss": 0.5, **STEP})
    shown.close()
    err = capsys.readouterr().err
    assert "2 s/step, 1:04 left" in err and "2/4" in err  # 2 steps x 2 s + the final evaluation's 60 s


@pytest.fixture(scope="module")
def policy():
    lm, tok = load_model_and_tokenizer()
    return Policy(lm), tok


@pytest.mark.parametrize("engine", ["generate", "fastsd"])
def test_an_evaluation_batch_reports_its_decode_steps(policy, engine):
    pol, tok = policy
    seen = []
    prompts = [tok.encode("12+7=")] * 3
    torch.manual_seed(0)
    sample(pol, prompts, eos_id=-1, pad_id=tok.pad_token_id, temperature=1.0, top_p=1.0, max_new_tokens=9,
           d=Dist(), batch_size=2, engine=engine, progress=lambda done, total: seen.append((done, total)))
    assert all(total == 2 for _, total in seen)
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 2 and 1 in done
    inside = [d for d in done if 0 < d < 1]  # no EOS (eos_id -1): every one of the 9 decode steps is seen
    assert len(inside) == 9 and len([d for d in done if 1 < d < 2]) == 9


def test_without_a_terminal_a_long_batch_says_how_far_it_is(monkeypatch, capsys):
    monkeypatch.setattr(progress_mod, "HEARTBEAT_S", 0.0)
    report = Progress(load_config(overrides=["steps=3"]), True, 0).eval_progress(0, 128)
    for done in (0, 0.5, 1, 1.25, 2):
        report(done, 2)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[fastsd] eval at step 0: 128 questions x 12 samples, 2 batches"
    assert out[1].startswith("[fastsd] eval at step 0: batch 1/2, 50% of its decode steps (")
    assert out[2].startswith("[fastsd] eval at step 0: batch 1/2 done (")
    assert out[3].startswith("[fastsd] eval at step 0: batch 2/2, 25% of its decode steps (")
    assert out[4].startswith("[fastsd] eval at step 0: batch 2/2 done (") and len(out) == 5


def test_each_evaluation_line_gives_its_samples_per_second(tmp_path, capsys):
    assert cli.main([*SMALL, "steps=1", "data.eval_size=3", "eval.k=4", "rollout.max_new_tokens=8", "eval=on",
                     f"run_dir={tmp_path}"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "] eval at step " in ln and ": avg@k=" in ln]
    assert len(lines) == 2 and all(ln.endswith(" samples/s)") for ln in lines)


def test_item_progress_counts_this_process_only_and_says_the_rate(capsys, monkeypatch):
    """fastsd-select's lines: problems done of all (those graded before a restart count as done,
    not in the rate), kept, per minute and time left at that rate."""
    now = [100.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    shown = progress_mod.ItemProgress("fastsd-select", total=40, first=10, on=True)
    now[0] = 160.0
    shown.done(10, kept=4)  # 10 problems in 60 s: 10/min, 20 left
    now[0] = 165.0
    shown.done(1)  # within HEARTBEAT_S of the last line: no line
    now[0] = 220.0
    shown.done(9, kept=1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[fastsd-select] 20/40 problems (4 kept in this process; 10 problems/min, 2:00 left)"
    assert lines[1] == "[fastsd-select] 30/40 problems (5 kept in this process; 10 problems/min, 1:00 left)"
    progress_mod.ItemProgress("x", 4, 0, on=False).done(4)
    assert capsys.readouterr().out == ""


def test_item_progress_says_how_far_a_long_batch_is(capsys, monkeypatch):
    """Within a batch of samples, a heartbeat at most every HEARTBEAT_S seconds (none at its start
    or end: the per-batch line says those)."""
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    shown = progress_mod.ItemProgress("fastsd-select", total=32, first=0, on=True)
    report = shown.within(16)
    now[0] = 100.0
    report(0, 1)
    report(0.25, 1)
    now[0] = 100.0 + progress_mod.HEARTBEAT_S / 2
    report(0.5, 1)  # too soon after the last line
    now[0] = 100.0 + progress_mod.HEARTBEAT_S
    report(0.75, 1)
    report(1, 1)
    assert capsys.readouterr().out.splitlines() == [
        "[fastsd-select] 0/32 problems; the next 16: 25% of its decode steps",
        "[fastsd-select] 0/32 problems; the next 16: 75% of its decode steps"]
    assert progress_mod.ItemProgress("x", 4, 0, on=False).within(4) is None
