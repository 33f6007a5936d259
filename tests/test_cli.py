"""What a user meets at the command line: --dry-run's annotated config, eval=off, evaluation
progress, Ctrl-C, and the tools' --help texts."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fastsd import cli
from fastsd import train as train_mod
from fastsd.config import TrainConfig, load_config, to_dict
from fastsd.config.dry_run import annotated_yaml, field_docs
from fastsd.model.dist import Dist
from fastsd.run.checkpoint import latest_checkpoint
from fastsd.run.run_dir import RunLog, StoppedAfterStep, uninterrupted

REPO = Path(__file__).resolve().parents[1]
SMALL = ["questions_per_step=2", "eval.k=2", "data.eval_size=2", "data.train_size=16",
         "rollout.max_new_tokens=40", "optim.micro_batch=2"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- --dry-run

@pytest.mark.vllm  # auto resolves to vllm on CUDA where vLLM is installed
def test_dry_run_reads_back_and_resolves_what_grpo_runs_with(capsys):
    assert cli.main(["condition=grpo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == to_dict(load_config(overrides=["condition=grpo"]))  # --config reads it back
    lines = out.splitlines()
    assert "  group_size: 0  # resolved: 8 (grpo's default)" in lines
    assert "  engine: auto  # resolved: fastsd (on a CPU)" in lines
    assert "  divergence: reverse_kl  # ignored: grpo trains on rewards" in lines
    assert "teacher:  # ignored: grpo has no teacher" in lines
    assert lines[lines.index("steps: 60") - 1] == "# Optimizer steps."
    cfg = load_config(overrides=["condition=critique"])
    text = annotated_yaml(cfg, "cuda")
    assert "  group_size: 0  # resolved: 1 (self-distillation's default)" in text
    on_cuda = "fastsd" if cfg.vllm_unusable() else "vllm"  # vllm where it is installed (CI has it)
    assert f"  engine: auto  # resolved: {on_cuda} (on CUDA)" in text
    assert "  divergence: reverse_kl  # what auto resolves to for the built-in model" in text
    assert "  pg_clip: 0.2  # ignored: grpo only" in text and "  base_url: http://127.0.0.1:8100/v1  # ignored" in text
    assert "liger: true  # ignored" not in text
    assert "  every: 0  # ignored: eval=off" in annotated_yaml(load_config(overrides=["eval=off"]))


def test_dry_run_marks_the_topk_keys_a_run_ignores():
    text = annotated_yaml(load_config(overrides=["loss.divergence=jsd"]))
    assert "  topk_from: teacher  # ignored: loss.topk=0 (the full vocabulary)" in text
    assert "  tail: true  # ignored: loss.topk=0 (the full vocabulary)" in text
    assert "  clip: null\n" in text  # clip takes every divergence
    text = annotated_yaml(load_config(overrides=["loss.divergence=jsd", "loss.topk=8", "loss.clip=0.05"]))
    assert "  topk: 8\n" in text and "  topk_from: teacher\n" in text and "  clip: 0.05\n" in text
    grpo = annotated_yaml(load_config(overrides=["condition=grpo", "loss.topk=8"]))
    assert "  topk: 8  # ignored: grpo trains on rewards" in grpo
    both = annotated_yaml(load_config(overrides=["loss.topk=8", "loss.is_clip=2"]))
    assert "  topk: 8\n" in both and "  is_clip: 2.0\n" in both
    sampled = annotated_yaml(load_config(overrides=["loss=sampled_token", "loss.topk=8"]))
    assert "  tail: true  # ignored: loss=sampled_token uses no divergence" in sampled


def test_dry_run_may_stand_between_overrides(capsys):
    assert cli.main(["condition=grpo", "--dry-run", "steps=3"]) == 0  # argparse refused the key after it
    assert "steps: 3" in capsys.readouterr().out.splitlines()


def test_every_config_key_has_a_docstring_for_dry_run():
    docs = field_docs()

    def walk(node, prefix):
        for f in dataclasses.fields(node):
            child = getattr(node, f.name)
            if dataclasses.is_dataclass(child):
                yield from walk(child, f"{prefix}{f.name}.")
            elif f.name not in docs.get(type(node).__name__, {}):
                yield prefix + f.name

    assert list(walk(TrainConfig(), "")) == []


# ---------------------------------------------------------------- evaluation: off, progress, time

def test_eval_off_runs_no_evaluation(tmp_path, monkeypatch, capsys):
    assert load_config(overrides=["eval=off"]).eval.enabled is False and load_config(overrides=["eval=on"]).eval.enabled
    with pytest.raises(ValueError, match="^eval.enabled: expected true or false"):
        load_config(overrides=["eval=sometimes"])
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: pytest.fail("evaluated with eval=off"))
    assert cli.main([*SMALL, "steps=1", "eval=off", f"run_dir={tmp_path}"]) == 0
    assert [r["step"] for r in rows(tmp_path)] == [1] and "eval" not in rows(tmp_path)[0]
    assert "[fastsd] no evaluation (eval=off)" in capsys.readouterr().out


def test_evaluation_says_what_it_does_and_how_long_it_took(tmp_path, capsys):
    assert cli.main([*SMALL, "steps=1", "data.eval_size=3", "eval.k=100", "rollout.max_new_tokens=8",
                     "eval.batch_size=256", f"run_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out  # not a terminal: a line when it starts and one per batch of 256 samples
    for step in (0, 1):
        assert f"[fastsd] eval at step {step}: 3 questions x 100 samples, 2 batches" in out
        assert f"[fastsd] eval at step {step}: batch 1/2 done (" in out and f"eval at step {step}: batch 2/2 done" in out
        assert f"[fastsd] eval at step {step}: avg@k=" in out
    evals = [r for r in rows(tmp_path) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 1] and all(r["time_eval"] > 0 for r in evals)


def test_an_evaluation_in_one_batch_says_so(tmp_path, capsys):
    """eval.batch_size=0 on a CPU: the shipped model's 300 samples in one batch (not "1 batches")."""
    assert cli.main([*SMALL, "steps=1", "data.eval_size=3", "eval.k=100", "rollout.max_new_tokens=8",
                     f"run_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "[fastsd] eval at step 0: 3 questions x 100 samples, 1 batch\n" in out
    assert "[fastsd] eval at step 0: batch 1/1 done (" in out


def test_on_a_terminal_evaluation_draws_a_bar_below_the_step_bar(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    log = RunLog(load_config(overrides=["steps=3"]), Dist(), 0)
    report = log.eval_progress(0, 128)
    for done in range(4):
        report(done, 3)
    log.say("[fastsd] eval at step 0: done")
    log.close()
    out, err = capsys.readouterr()
    assert "[fastsd] eval at step 0: done" in out  # through the bar, not across it
    assert "\reval at step 0:   0%|" in err and "128 questions x 12 samples, 3 batches" in err  # the bar, under the step bar


# ---------------------------------------------------------------- Ctrl-C

def test_uninterrupted_holds_ctrl_c_until_the_block_is_done():
    done = []
    with pytest.raises(StoppedAfterStep):  # a KeyboardInterrupt that says the block was done
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("the rest of the block")
    assert done == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_abandons_the_step_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    argv = [*SMALL, "steps=3", "checkpoint.every=1", "eval=off"]
    assert cli.main([*argv, f"run_dir={tmp_path / 'whole'}"]) == 0
    real, calls = train_mod.update, []

    def interrupted_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "update", interrupted_in_step_2)
    run_dir = tmp_path / "cut"
    capsys.readouterr()
    assert cli.main([*argv, f"run_dir={run_dir}"]) == 130
    err = capsys.readouterr().err
    assert "stopped by Ctrl-C: the step in progress was abandoned" in err
    assert f"last checkpoint: {run_dir}/checkpoints/step_00000001; running the same command again resumes" in err
    assert [r["step"] for r in rows(run_dir)] == [1] and latest_checkpoint(run_dir).name == "step_00000001"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000001"]
    monkeypatch.setattr(train_mod, "update", real)
    assert cli.main([*argv, f"run_dir={run_dir}"]) == 0
    cut, whole = rows(run_dir), rows(tmp_path / "whole")
    assert [r["step"] for r in cut] == [1, 2, 3]
    for a, b in zip(cut, whole):  # as if never interrupted
        for key in ("loss", "gap", "grad_norm", "reward"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_ctrl_c_while_a_step_is_written_says_the_step_was_written(tmp_path, monkeypatch, capsys):
    """The Ctrl-C lands while step 1's logs and checkpoint are written: they are written whole,
    and the message says so (it said the step was abandoned, with nothing of it written)."""
    real = RunLog.rollouts

    def ctrl_c_while_writing(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RunLog, "rollouts", ctrl_c_while_writing)
    assert cli.main([*SMALL, "steps=3", "checkpoint.every=1", "eval=off", f"run_dir={tmp_path}"]) == 130
    err = capsys.readouterr().err
    assert "stopped by Ctrl-C once the step's logs (and its checkpoint, if one was due) were written" in err
    assert "abandoned" not in err
    assert [r["step"] for r in rows(tmp_path)] == [1] and latest_checkpoint(tmp_path).name == "step_00000001"


def test_sigint_to_a_run_exits_130_without_a_traceback(tmp_path):
    """A real SIGINT to `python -m fastsd.cli`, once a checkpoint exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastsd.cli", *SMALL, "steps=100000", "checkpoint.every=1", "eval=off",
           f"run_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(tmp_path) is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert latest_checkpoint(tmp_path) is not None, "no checkpoint was saved in time"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = latest_checkpoint(tmp_path)
    assert f"last checkpoint: {last}; running the same command again resumes from it." in err
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())  # whole lines
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name] == []


def test_a_torchrun_rank_ends_through_exit_rank_with_the_runs_exit_code(monkeypatch, capsys):
    """Under torchrun (WORLD_SIZE > 1) every way out of main, a return, parser.exit or --help,
    goes through dist.exit_rank with the code the single process would return."""
    from fastsd.model import dist

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(dist, "exit_rank", fake_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    codes = []
    for argv in (["--dry-run"], ["optim.lrr=1"], ["--help"]):
        with pytest.raises(Exited) as e:
            cli.main(argv)
        codes.append(e.value.args[0])
    assert codes == [0, 2, 0]
    assert "did you mean optim.lr?" in capsys.readouterr().err


def test_exit_rank_runs_atexit_handlers_flushes_and_exits_with_the_code():
    code = ("import atexit, sys; from fastsd.model.dist import exit_rank; "
            "atexit.register(lambda: print('atexit ran')); sys.stdout.write('unflushed '); "
            "sys.stderr.write('to stderr'); exit_rank(3)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "unflushed atexit ran\n" and proc.stderr == "to stderr"


# ---------------------------------------------------------------- --help texts

def test_tool_help_explains_every_fault_and_the_whole_description(capsys):
    sys.path.insert(0, str(REPO / "tools"))
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import critic_server
        import gpu_bench
    finally:
        sys.path[:2] = []
    with pytest.raises(SystemExit):
        critic_server.main(["--help"])
    out = capsys.readouterr().out
    for fault in critic_server.FAULTS[1:]:
        assert f"\n    {fault} " in out, fault
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "against the cuBLAS\nfloor, eager PyTorch and liger-kernel.\n" in out


def test_advantage_plots_share_their_y_limits_across_conditions():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import advantage_report
    finally:
        sys.path[:1] = []
    row = lambda adv: {"adv": adv, "segments": ["before", "first_wrong", "after"]}  # noqa: E731
    summary = lambda m: {"mean_before": 0.0, "mean_first_wrong": m, "mean_after": None, "mean_correct": 0.1}  # noqa: E731
    lim = advantage_report.y_limits({"critique": [row([0.5, -12.0, 1.0])], "reference": [row([0.2, -1.0, 2.0])]},
                                    {"critique": summary(-0.4), "reference": summary(-0.2)})
    assert lim["tokens"][0] < -12.0 and lim["tokens"][1] > 2.0  # both conditions' rollouts fit in one scale
    assert lim["segments"][0] < -0.4 and lim["segments"][1] > 0.1
