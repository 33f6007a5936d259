"""The run directory claimed before the model loads (fastsd/run/lock.py): one writer (a second run
fails naming the holder; a lock left by a killed run is no obstacle), writable, with room for a
checkpoint; a full disk during a write names the path and what was kept."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from runs import SMALL, config

from fastsd import cli
from fastsd import train as train_mod
from fastsd.model.dist import Dist
from fastsd.run.lock import LOCK, RunDirLock
from fastsd.train import train

REPO = Path(__file__).resolve().parents[2]


def no_model(monkeypatch) -> None:
    def build_models(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(train_mod, "build_models", build_models)


def test_a_held_run_dir_refuses_a_second_run_before_the_model_loads(tmp_path, monkeypatch):
    cfg = config(tmp_path, "steps=1", "eval=off")
    no_model(monkeypatch)
    with RunDirLock(cfg, Dist()) as held:
        held.take()
        with pytest.raises(ValueError, match=rf"run_dir: {tmp_path} is in use by another run \(pid {os.getpid()} "
                                             rf"on host {socket.gethostname()}, since .*; lock {tmp_path}/{LOCK}\)"):
            train(cfg, Dist())
    with pytest.raises(AssertionError, match="the model loaded"):  # released: the run gets as far as the model
        train(cfg, Dist())


def test_a_lock_left_by_a_killed_run_is_no_obstacle(tmp_path, monkeypatch):
    holder = ("import sys, time; from fastsd.config import load_config; from fastsd.model.dist import Dist; "
              "from fastsd.run.lock import RunDirLock; lock = RunDirLock(load_config(overrides=[f'run_dir={sys.argv[1]}']),"
              " Dist()); lock.take(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        cfg = config(tmp_path, "steps=1", "eval=off")
        with RunDirLock(cfg, Dist()) as second, pytest.raises(ValueError, match=f"pid {proc.pid} on host"):
            second.take()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"pid {proc.pid}" in (tmp_path / LOCK).read_text()  # the dead run's lock file is still there
    no_model(monkeypatch)
    with pytest.raises(AssertionError, match="the model loaded"):
        train(cfg, Dist())
    assert f"pid {os.getpid()} on host" in (tmp_path / LOCK).read_text()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_run_dir_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    no_model(monkeypatch)
    try:
        with pytest.raises(ValueError, match=rf"run_dir: {run_dir} cannot be written \(Permission denied"):
            train(config(run_dir, "steps=1", "eval=off"), Dist())
    finally:
        run_dir.chmod(0o755)


def test_too_little_free_space_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from fastsd.run import lock as lock_mod

    real = shutil.disk_usage
    monkeypatch.setattr(lock_mod.shutil, "disk_usage", lambda path: real(path)._replace(free=2**20))
    no_model(monkeypatch)
    with pytest.raises(ValueError, match=rf"run_dir: {tmp_path} has 1 MiB free, less than the \d+ MiB a checkpoint "
                                         r"needs \(estimated from .*tiny-arith's weights x 3\)"):
        train(config(tmp_path, "steps=1", "eval=off"), Dist())


def stops_with_exit_1(run_dir, capsys) -> str:
    """Run 3 steps, a checkpoint each, in `run_dir`: it must stop with exit code 1; its stderr."""
    with pytest.raises(SystemExit) as stopped:
        cli.main([*SMALL, "steps=3", "eval=off", "checkpoint.every=1", f"run_dir={run_dir}"])
    assert stopped.value.code == 1
    return capsys.readouterr().err


FULL = {"OSError": lambda path: OSError(errno.ENOSPC, "No space left on device", path),
        "torch.save's RuntimeError": lambda path: RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")}


@pytest.mark.parametrize("error", FULL)
def test_a_full_disk_during_a_checkpoint_names_it_and_the_checkpoint_kept(tmp_path, monkeypatch, capsys, error):
    from fastsd.run import checkpoint as ckpt_mod

    real = ckpt_mod._write_shared

    def full_at_step_2(tmp, *args):
        if "step_00000002" in tmp.name:
            raise FULL[error](str(tmp / "trainer_state.pt"))
        return real(tmp, *args)

    monkeypatch.setattr(ckpt_mod, "_write_shared", full_at_step_2)
    err = stops_with_exit_1(tmp_path, capsys)
    assert f"checkpoint checkpoints/step_00000002 in {tmp_path}: could not be written ({error.split()[-1]}" in err
    assert f"MiB free there; kept: the last checkpoint {tmp_path}/checkpoints/step_00000001 (intact)" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]  # no half-written one


def test_a_full_disk_during_a_log_write_names_the_file(tmp_path, monkeypatch, capsys):
    from fastsd.run import run_dir as run_dir_mod

    calls = []

    def full_open(path, *args, **kwargs):
        if str(path).endswith("rollouts.jsonl"):
            calls.append(1)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(run_dir_mod, "open", full_open, raising=False)
    err = stops_with_exit_1(tmp_path, capsys)
    assert f"{tmp_path}/rollouts.jsonl: could not be written (OSError: [Errno 28] No space left on device" in err
    assert f"kept: the last checkpoint {tmp_path}/checkpoints/step_00000001 (intact)" in err
