"""One writer per run directory (fastsd/run/lock.py): a second run fails before the model loads,
naming the holder; a lock left by a killed run is no obstacle."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from runs import config

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
