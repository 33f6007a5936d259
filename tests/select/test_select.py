"""fastsd-select: the band, bad input before the model loads, determinism, stop and resume, the
output read by fastsd-train, one and two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastsd.select import SelectOptions
from fastsd.select import files as sfiles
from fastsd.select import run as srun
from fastsd.select.cli import main

ROOT = Path(__file__).resolve().parents[2]
# A small, fast selection on the shipped model: 5 problems of the built-in task, 3 samples each.
SMALL = ["--k", "3", "--batch", "2", "--max-pass", "3", "data.train_size=5", "rollout.max_new_tokens=24"]


def _select(out, *args) -> int:
    return main(["--out", str(out), *SMALL, *args])


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "graded.jsonl").read_text().splitlines()]


def test_options_refuse_a_band_outside_zero_to_k_naming_the_flags():
    for bad, flag in ((dict(min_pass=3, max_pass=2), "--min-pass"), (dict(max_pass=17), "--max-pass"),
                      (dict(k=0), "--k"), (dict(batch=0), "--batch"), (dict(split="dev"), "--split")):
        with pytest.raises(ValueError, match=flag):
            SelectOptions("out", **bad).check()
    SelectOptions("out", k=16, min_pass=0, max_pass=16).check()


def test_the_band_includes_both_ends(tmp_path):
    """min-pass <= passes <= max-pass: with the band [1, 3] of 4, passes 1 and 3 are kept, 0 and 4 not."""
    opts = SelectOptions(str(tmp_path), k=4, min_pass=1, max_pass=3)
    graded = {i: {"index": i, "passes": p, "k": 4} for i, p in enumerate([0, 1, 2, 3, 4])}
    records = [{"question": f"q{i}", "answer": str(i), "extra": i} for i in range(5)]
    tmp_path.joinpath("select.json").write_text(json.dumps({"settings": {}}))
    cfg = type("C", (), {"model": type("M", (), {"path": "builtin"}), "seed": 3})
    summary = srun._finish(cfg, opts, tmp_path, records, graded, list(range(5)), 1.0, 1)
    kept = [json.loads(line) for line in (tmp_path / "selected.jsonl").read_text().splitlines()]
    assert [r["extra"] for r in kept] == [1, 2, 3]
    assert kept[0]["select"] == {"passes": 1, "k": 4, "pass_rate": 0.25, "model": "builtin", "seed": 3}
    assert summary["passes_histogram"] == [1, 1, 1, 1, 1] and summary["selected"] == 3


def test_critic_check_keeps_only_problems_with_a_valid_critique():
    class Refuses:
        def critique_batch(self, items):
            return [type("Crit", (), {"ok": False, "error": "invalid reply"})() for _ in items]

    from fastsd.tasks.data import Example
    from fastsd.tasks.format import Parsed

    roll = type("R", (), {"reward": 0.0, "example": Example("1+1", "2"), "parsed": Parsed(["1+1=3"], "3")})()
    verdict = srun._critic_verdict(Refuses(), [roll])
    assert verdict == {"ok": False, "error": "invalid reply"}
    opts = SelectOptions("o", k=4, critic_check=True)
    assert not srun._in_band({"passes": 0, "critic": verdict}, opts)
    assert srun._in_band({"passes": 0, "critic": {"ok": True}}, opts)
    assert not srun._in_band({"passes": 0}, opts)  # never asked: not kept


def test_a_damaged_last_line_is_cut_and_one_before_it_is_an_error(tmp_path):
    good = json.dumps({"index": 0, "passes": 1, "k": 2}) + "\n"
    (tmp_path / "graded.jsonl").write_text(good + '{"index": 1, "pas')
    assert list(sfiles.read_graded(tmp_path)) == [0]
    assert (tmp_path / "graded.jsonl").read_text() == good  # appending goes on after the whole lines
    (tmp_path / "graded.jsonl").write_text(good + "{broken\n" + good)
    with pytest.raises(ValueError, match=r"graded.jsonl:2 is damaged"):
        sfiles.read_graded(tmp_path)


def test_a_restart_with_other_settings_is_refused_naming_the_setting(tmp_path):
    sfiles.check_settings(tmp_path, {"--k": 16, "seed": 0})
    sfiles.check_settings(tmp_path, {"--k": 16, "seed": 0})
    with pytest.raises(ValueError, match=r"^--k: 16 in the selection already in"):
        sfiles.check_settings(tmp_path, {"--k": 8, "seed": 0})


def test_bad_data_is_named_with_file_and_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import fastsd.run.build as build

    monkeypatch.setattr(build, "build_models", lambda *a, **k: pytest.fail("the model loaded"))
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"}\n')
    with pytest.raises(SystemExit) as e:
        _select(tmp_path / "out", f"data={data}", "condition=grpo")
    assert e.value.code == 2
    assert f"{data}:2: missing key 'answer' (data.fields.answer)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written either
    with pytest.raises(SystemExit):
        _select(tmp_path / "out", "--critic-check", "condition=grpo")
    assert "--critic-check: condition=grpo uses no critic" in capsys.readouterr().err


def test_same_seed_same_output_also_after_a_stop_and_the_output_trains(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _select(a) == 0 and _select(c, "seed=1", "--critic-check") == 0
    rows = _rows(a)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4] and all(r["k"] == 3 and len(r["rewards"]) == 3 for r in rows)
    assert [r["samples_sha256"] for r in rows] != [r["samples_sha256"] for r in _rows(c)]  # the seed matters
    # --critic-check: the built-in critic critiques every failed sample of the built-in task
    assert all(r["critic"]["ok"] for r in _rows(c)) and "critic" not in rows[0]
    # b: stopped after its first batch, in the middle of writing its second: the same command goes on.
    assert _select(b) == 0
    lines = (b / "graded.jsonl").read_text().splitlines(keepends=True)
    (b / "graded.jsonl").write_text("".join(lines[:2]) + lines[2][:15])
    (b / "selected.jsonl").unlink()
    assert _select(b) == 0
    assert _rows(b) == rows
    assert (b / "selected.jsonl").read_text() == (a / "selected.jsonl").read_text()
    kept = [json.loads(line) for line in (a / "selected.jsonl").read_text().splitlines()]
    from fastsd.tasks.splits import make_records

    by_question = {r["question"]: r for r in make_records("train", 5)}
    assert kept and all({k: v for k, v in r.items() if k != "select"} == by_question[r["question"]] for r in kept)
    # fastsd-train reads the output as it is (one step, no evaluation).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fastsd.cli", f"data={a / 'selected.jsonl'}", "steps=1", "eval=off",
           "questions_per_step=2", "rollout.max_new_tokens=24", f"run_dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_two_processes_give_the_one_process_output(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): batches sharded by rank, gathered on rank 0; the same
    graded rows and output as one process (both at one thread, as torchrun sets)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "fastsd.select.cli", "--out", str(tmp_path / "one"), *SMALL]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "fastsd.select.cli", "--out", str(tmp_path / "two"), *SMALL]
    for cmd in (one, two):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    key = lambda rows: sorted(rows, key=lambda r: r["index"])  # noqa: E731
    assert key(_rows(tmp_path / "two")) == key(_rows(tmp_path / "one"))
    assert (tmp_path / "two" / "selected.jsonl").read_text() == (tmp_path / "one" / "selected.jsonl").read_text()


def test_questions_left_out_as_too_long_keep_the_others_indices():
    """data.too_long=skip drops questions before sampling: the kept ones keep their index in the
    data, so each output record is the one read at that place."""
    from fastsd.tasks.data import Example

    full = [Example(f"q{i}", "1") for i in range(5)]
    assert srun._aligned(full, [full[1], full[2], full[4]]) == [1, 2, 4]
    assert srun._aligned(full, full) == [0, 1, 2, 3, 4]
    twins = [Example("q", "1"), Example("q", "1"), Example("r", "1")]
    assert srun._aligned(twins, [twins[1], twins[2]]) == [0, 2]  # equal records: the first place


def test_a_restart_on_edited_data_is_refused(tmp_path):
    from fastsd.tasks.data import Example

    full = [Example("1+1", "2"), Example("2+2", "4")]
    srun._same_questions(tmp_path, {1: {"question": "2+2"}}, full)
    with pytest.raises(ValueError, match=r"graded problem 2 as '3\+3', but the data now has '2\+2' there"):
        srun._same_questions(tmp_path, {1: {"question": "3+3"}}, full)
    with pytest.raises(ValueError, match="data now has no problem there"):
        srun._same_questions(tmp_path, {2: {"question": "3+3"}}, full)


def test_ctrl_c_exits_130_and_says_the_same_command_goes_on(tmp_path, monkeypatch, capsys):
    import fastsd.select.cli as cli

    def stopped(cfg, opts, d):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "select", stopped)
    assert main(["--out", str(tmp_path / "o")]) == 130
    assert f"{tmp_path / 'o'}/graded.jsonl keeps what was graded: the same command goes on" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_mid_run_the_same_command_goes_on_to_the_same_output(tmp_path):
    """SIGKILL (no handler runs) once a problem is graded; the same command finishes the rest, and
    the output equals an uninterrupted run's."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastsd.select.cli", "--out", str(tmp_path / "b"), *SMALL, "--batch", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    graded, t0 = tmp_path / "b" / "graded.jsonl", time.monotonic()
    while not (graded.exists() and graded.read_text().count("\n") >= 1) and proc.poll() is None:
        assert time.monotonic() - t0 < 600
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= graded.read_text().count("\n") < 5 and not (tmp_path / "b" / "selected.jsonl").exists()
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0
    ref = [sys.executable, "-m", "fastsd.select.cli", "--out", str(tmp_path / "a"), *SMALL, "--batch", "1"]
    assert subprocess.run(ref, env=env, capture_output=True, timeout=600).returncode == 0
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")
    assert (tmp_path / "b" / "selected.jsonl").read_text() == (tmp_path / "a" / "selected.jsonl").read_text()
