"""A damaged newest checkpoint: resume=auto says which file and falls back to the one before it
(moved aside, never deleted); an explicit resume=PATH names the file and stops (fastsd/run/checkpoint_check.py)."""

from __future__ import annotations

import shutil

import pytest
from runs import SMALL, config, train_rows

from fastsd import cli
from fastsd.model.dist import Dist
from fastsd.run.checkpoint_check import damage, pick_resume
from fastsd.train import train


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two")
    train(config(run_dir, "steps=2", "eval=off", "checkpoint.every=1"), Dist())
    return run_dir


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


DAMAGE = {"truncated weights": (lambda c: truncate(c / "hf/model.safetensors"), "hf/model.safetensors: ",
                                "incomplete metadata"),
          "no trainer_state.pt": (lambda c: (c / "trainer_state.pt").unlink(), "trainer_state.pt: missing", "")}


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_auto_falls_back_past_a_damaged_checkpoint_and_an_explicit_path_stops(two_checkpoints, tmp_path, kind,
                                                                                      capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    newest, before = run_dir / "checkpoints/step_00000002", run_dir / "checkpoints/step_00000001"
    hurt, file, why = DAMAGE[kind]
    assert damage(newest) is None
    hurt(newest)
    assert f"{newest}/{file}" in damage(newest) and why in damage(newest)
    assert pick_resume(config(run_dir, "steps=2")) == (before, [(newest, damage(newest))])
    with pytest.raises(ValueError, match=f"resume: {newest} cannot be resumed from, a file is damaged: {newest}/{file}"):
        pick_resume(config(run_dir, f"resume={newest}"))
    argv = [*SMALL, "eval=off", "steps=2", "checkpoint.every=1", f"run_dir={run_dir}"]
    with pytest.raises(SystemExit) as stopped:
        cli.main([*argv, f"resume={newest}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"a file is damaged: {newest}/{file}" in err and "Traceback" not in err
    assert cli.main(argv) == 0  # resume=auto: from step 1, step 2 trained again
    out = capsys.readouterr().out
    assert f"resumed from {before} at step 1" in out
    assert f"checkpoint step_00000002 is damaged ({newest}/{file}" in out and "moved to step_00000002.damaged" in out
    assert (run_dir / "checkpoints/step_00000002.damaged/COMPLETE").is_file()  # kept, out of the way
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2] and damage(newest) is None  # step 2 saved again


def test_resume_auto_with_only_damaged_checkpoints_stops(two_checkpoints, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    for step in (1, 2):
        (run_dir / f"checkpoints/step_0000000{step}/trainer_state.pt").unlink()
    with pytest.raises(ValueError, match="resume: auto, but every checkpoint in .* is damaged .*trainer_state.pt: "
                                         "missing.*: move them out of checkpoints/ to start afresh"):
        pick_resume(config(run_dir, "steps=2"))
