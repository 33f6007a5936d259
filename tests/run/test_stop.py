"""SIGTERM and SIGHUP: the run stops at a consistent point, saves the last completed step within
checkpoint.stop_timeout, and the same command resumes bit for bit (fastsd/run/stop.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs import SMALL, config, read_jsonl, train_rows

from fastsd import cli
from fastsd import train as train_mod
from fastsd.model.dist import Dist
from fastsd.run import checkpoint as ckpt_mod
from fastsd.run.checkpoint import latest_checkpoint
from fastsd.train import train

REPO = Path(__file__).resolve().parents[2]
KEYS = ("loss", "gap", "grad_norm", "reward", "usable", "lr")


def numbers(run_dir) -> tuple[list, list]:
    """Each step's figures and its rollouts' token ids: what a resumed run must repeat bit for bit."""
    rows = [[r[k] for k in KEYS] for r in train_rows(run_dir)]
    ids = [(r["step"], r["prompt_ids"], r["response_ids"]) for r in read_jsonl(Path(run_dir) / "rollouts.jsonl")]
    return rows, ids


def same_checkpoint(a: Path, b: Path) -> None:
    """Two checkpoints hold the same weights, optimizer, scheduler, state and random state."""
    assert (a / "hf/model.safetensors").read_bytes() == (b / "hf/model.safetensors").read_bytes()
    for name in ("trainer_state.pt", "rng_rank0.pt"):
        x, y = (torch.load(p / name, weights_only=True) for p in (a, b))
        flat_x, flat_y = torch.utils._pytree.tree_flatten(x), torch.utils._pytree.tree_flatten(y)
        assert flat_x[1] == flat_y[1], name
        for u, v in zip(flat_x[0], flat_y[0]):
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v, name


def signal_on_call(monkeypatch, name: str, call: int, signum: int) -> None:
    """The `call`-th call of train's `name` (a stage) sends this process `signum` first."""
    real, calls = getattr(train_mod, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, name, patched)


def test_sigterm_abandons_the_step_saves_the_last_one_as_every_step_would_and_resumes_bitwise(
        tmp_path, monkeypatch, capsys):
    common = [*SMALL, "eval=off", "steps=3"]
    train(config(tmp_path / "straight", *common[1:]), Dist())
    train(config(tmp_path / "every", *common[1:], "checkpoint.every=1"), Dist())
    signal_on_call(monkeypatch, "rollout", 3, signal.SIGTERM)  # in step 3's rollout
    stopped = tmp_path / "stopped"
    assert cli.main([*common, f"run_dir={stopped}"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM: the step in progress was abandoned" in err
    assert f"step 2 is kept in {stopped}/checkpoints/step_00000002; running the same command again resumes" in err
    assert [r["step"] for r in train_rows(stopped)] == [1, 2]
    same_checkpoint(latest_checkpoint(stopped), tmp_path / "every/checkpoints/step_00000002")
    monkeypatch.undo()
    assert cli.main([*common, f"run_dir={stopped}"]) == 0
    assert numbers(stopped) == numbers(tmp_path / "straight")


def test_a_sigterm_between_steps_saves_the_random_state_the_next_step_starts_from(tmp_path, monkeypatch, capsys):
    """The signal lands at the top of step 3, before its start is noted: the checkpoint holds the
    random state as it is (step 3's start), not step 2's."""
    train(config(tmp_path / "every", "eval=off", "steps=2", "checkpoint.every=1"), Dist())
    real, calls = train_mod.ckpt.rng_state, []

    def sigterm_at_the_third_step(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(train_mod.ckpt, "rng_state", sigterm_at_the_third_step)
    stopped = tmp_path / "stopped"
    assert cli.main([*SMALL, "eval=off", "steps=3", f"run_dir={stopped}"]) == 128 + signal.SIGTERM
    assert "step 2 is kept in" in capsys.readouterr().err
    same_checkpoint(latest_checkpoint(stopped), tmp_path / "every/checkpoints/step_00000002")


def test_sighup_during_the_update_finishes_the_step_and_saves_it(tmp_path, monkeypatch, capsys):
    signal_on_call(monkeypatch, "update", 2, signal.SIGHUP)
    assert cli.main([*SMALL, "eval=off", "steps=4", f"run_dir={tmp_path}"]) == 128 + signal.SIGHUP
    err = capsys.readouterr().err
    assert "stopped by SIGHUP once step 2's logs were written" in err
    assert [r["step"] for r in train_rows(tmp_path)] == [1, 2] and latest_checkpoint(tmp_path).name == "step_00000002"


def test_a_save_past_stop_timeout_is_abandoned_and_the_exit_code_says_so(tmp_path, monkeypatch, capsys):
    real_seal = ckpt_mod.seal

    started = []

    def slow_seal(*args, **kwargs):  # the stop's save: the alarm ends it while it waits
        started.append(time.monotonic())
        time.sleep(30)
        return real_seal(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "seal", slow_seal)
    signal_on_call(monkeypatch, "rollout", 3, signal.SIGTERM)
    assert cli.main([*SMALL, "eval=off", "steps=4", "checkpoint.stop_timeout=1", f"run_dir={tmp_path}"]) == 3
    assert time.monotonic() - started[0] < 25  # not the 30 s the seal waits
    err = capsys.readouterr().err
    assert "step 2 was not saved (the save did not finish within checkpoint.stop_timeout=1 s); no checkpoint" in err
    assert list((tmp_path / "checkpoints").iterdir()) == []  # its temporary folder removed


def test_stop_timeout_is_checked():
    with pytest.raises(ValueError, match=r"checkpoint\.stop_timeout: must be >= 0, got -1"):
        config("runs/x", "checkpoint.stop_timeout=-1")


def test_a_stop_with_stop_timeout_0_saves_nothing(tmp_path, monkeypatch, capsys):
    signal_on_call(monkeypatch, "rollout", 2, signal.SIGTERM)
    assert cli.main([*SMALL, "eval=off", "steps=3", "checkpoint.stop_timeout=0", f"run_dir={tmp_path}"]) == 3
    err = capsys.readouterr().err
    assert "step 1 was not saved (checkpoint.stop_timeout=0); no checkpoint: the same command starts afresh" in err
    assert latest_checkpoint(tmp_path) is None


def sigterm_after_two_steps(cmd: list[str], env: dict, run_dir: Path) -> tuple[int, str]:
    """Start `cmd` with `run_dir`, SIGTERM it once two steps are logged; its exit code and stderr."""
    proc = subprocess.Popen([*cmd, f"run_dir={run_dir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and not (
                (run_dir / "metrics.jsonl").exists() and len(train_rows(run_dir)) >= 2):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_sigterm_to_a_run_saves_the_last_step_and_the_same_command_resumes_bitwise(tmp_path):
    """A real SIGTERM to `python -m fastsd.cli` (checkpoint.every=0): exit 143, no traceback, and
    the resumed run's figures and rollouts are the straight run's, bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastsd.cli", *SMALL, "steps=5", "eval=off"]
    straight = subprocess.run([*cmd, f"run_dir={tmp_path / 'straight'}"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "stopped"
    code, err = sigterm_after_two_steps(cmd, env, run_dir)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    done = len(train_rows(run_dir))
    assert 2 <= done < 5 and latest_checkpoint(run_dir).name == f"step_{done:08d}", err[-3000:]
    again = subprocess.run([*cmd, f"run_dir={run_dir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"resumed from {run_dir}/checkpoints/step_{done:08d}" in again.stdout, again.stderr
    assert numbers(run_dir) == numbers(tmp_path / "straight")


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_the_last_step_on_every_rank_and_resumes_bitwise(tmp_path):
    """torchrun's agent forwards the SIGTERM to both ranks (gloo); they agree where to stop, save the
    last completed step together, and the same command resumes bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastsd.cli",
           *SMALL, "steps=5", "eval=off"]
    straight = subprocess.run([*cmd, f"run_dir={tmp_path / 'straight'}"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "stopped"
    code, err = sigterm_after_two_steps(cmd, env, run_dir)  # to the agent, as a scheduler would
    done = len(train_rows(run_dir))
    assert 2 <= done < 5 and latest_checkpoint(run_dir).name == f"step_{done:08d}", err[-3000:]
    assert f"step {done} is kept in" in err and "Sending process" in err  # the agent's forwarding
    assert (latest_checkpoint(run_dir) / "rng_rank1.pt").is_file()
    again = subprocess.run([*cmd, f"run_dir={run_dir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert numbers(run_dir) == numbers(tmp_path / "straight")
