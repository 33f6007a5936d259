"""log.report_to: every metrics.jsonl row reaches the trackers, read back from what they wrote
(TensorBoard's event files, W&B's offline run file, trackio's local database); a tracker that is
missing or fails to start stops the run before the model loads; a resume goes on in the same run."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from runs import config, read_jsonl

from fastsd.model.dist import Dist
from fastsd.run import trackers as trackers_mod
from fastsd.run.trackers import scalars, table
from fastsd.train import train

REPO = Path(__file__).resolve().parents[2]


def metrics(run_dir) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def expected(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Each number of metrics.jsonl as (step, value) points, by tracker key."""
    out: dict[str, list] = {}
    for row in metrics(run_dir):
        for key, value in scalars(row).items():
            out.setdefault(key, []).append((row["step"], value))
    return out


def test_scalars_and_table_of_a_row():
    row = {"step": 3, "loss": 0.5, "entropy": None, "final": True, "eval": {"avg@k": 0.25, "k": 4}, "time_eval": 2.0}
    assert scalars(row) == {"loss": 0.5, "eval/avg@k": 0.25, "eval/k": 4, "time_eval": 2.0}
    samples = [{"question": f"q{i}", "truth": "1", "responses": ["a", "b"], "answers": ["1", None],
                "correct": [True, False]} for i in range(3)]
    assert table(samples, 2) == [["q0", "1", "a", "1", True], ["q1", "1", "a", "1", True]]


def test_unknown_or_repeated_tracker_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match=r"log.report_to: expected one of"):
        config(tmp_path, "log.report_to=[tensorboard, mlflow]")
    with pytest.raises(ValueError, match=r"log.report_to: a tracker named twice"):
        config(tmp_path, "log.report_to=[wandb, wandb]")
    assert config(tmp_path, "log=tensorboard,wandb").log.report_to == ["tensorboard", "wandb"]


def test_missing_package_is_an_error_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("fastsd.train.build_models", no_model)
    with pytest.raises(ValueError, match=r"log.report_to: wandb cannot be imported .*package wandb.*fastsd\[wandb\]"):
        train(config(tmp_path / "r", "log.report_to=[wandb]"), Dist())
    assert not (tmp_path / "r").exists()  # preflight: nothing written


def test_failing_to_start_is_an_error_before_the_model_loads(tmp_path, monkeypatch):
    pytest.importorskip("torch.utils.tensorboard")

    def broken(*a, **k):
        raise RuntimeError("no server")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setitem(trackers_mod.BACKENDS, "trackio", broken)
    monkeypatch.setattr("fastsd.train.build_models", no_model)
    monkeypatch.setattr(trackers_mod, "check_installed", lambda cfg: None)
    started = []
    monkeypatch.setattr(trackers_mod._TensorBoard, "close", lambda self: started.append(self))
    with pytest.raises(ValueError, match=r"log.report_to: trackio failed to start \(RuntimeError: no server\)"):
        train(config(tmp_path / "r", "log.report_to=[tensorboard, trackio]"), Dist())
    assert len(started) == 1  # the tracker started before it was closed


def test_only_rank_0_reports(tmp_path):
    class Rank1:
        main = False

    assert start_backends(config(tmp_path, "log.report_to=[wandb]"), Rank1()) == []


def start_backends(cfg, d):
    return trackers_mod.start_trackers(cfg, d, None).backends


def _events(run_dir) -> dict[str, list[tuple[int, object]]]:
    """What TensorBoard shows of run_dir/tensorboard: (step, value) by tag (its purges applied)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    value = lambda e: make_ndarray(e.tensor_proto).item()  # noqa: E731
    return {tag: [(e.step, value(e)) for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}


def test_tensorboard_gets_every_row_and_a_resume_replaces_the_steps_it_redoes(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "r"
    train(config(run, "log.report_to=[tensorboard]", "checkpoint.every=1"), Dist())
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    train(config(run, "log.report_to=[tensorboard]", "checkpoint.every=1"), Dist())  # resumes at step 1
    shown = _events(run)
    want = expected(run)
    assert {"loss", "reward", "grad_norm", "time_update", "eval/avg@k", "eval/k"} <= set(want)
    for key, points in want.items():
        assert shown[key] == [(s, pytest.approx(v, rel=1e-6)) for s, v in points], key  # step 2 once, not twice
    assert [s for s, _ in want["eval/avg@k"]] == [0, 2]
    config_text = shown["config/text_summary"]
    assert [s for s, _ in config_text] == [0, 2]  # each process's config, at the first step it wrote
    assert "condition: critique" in config_text[1][1].decode()
    samples = shown["eval/samples/text_summary"]
    assert [s for s, _ in samples] == [0, 2]
    first = read_jsonl(run / "evals.jsonl")[0]
    assert first["question"].splitlines()[0] in samples[0][1].decode()


def _wandb_records(path: Path) -> list:
    """The records of a W&B run file (.wandb: a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, out, pos, buf = path.read_bytes(), 32768, [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def test_wandb_offline_gets_every_row_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "r"
    # eval=off first: a final evaluation at step 1, cut from metrics.jsonl on resume, would stay in W&B
    train(config(run, "log.report_to=[wandb]", "steps=1", "eval=off"), Dist())
    train(config(run, "log.report_to=[wandb]", "steps=2"), Dist())  # resumed from step 1, evaluates there
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # one run, two processes
    history, configs = [], []
    for f in files:
        for r in _wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
            elif kind == "run":
                configs.append({u.key: json.loads(u.value_json) for u in r.run.config.update})
    assert [c["steps"] for c in configs] == [1, 2] and configs[0]["log"]["report_to"] == ["wandb"]
    want = expected(run)
    for key, points in want.items():
        got = [(h["step"], h[key]) for h in history if key in h]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in points], key
    tables = [h for h in history if "eval/samples/_type" in h]
    assert [(h["step"], h["eval/samples/nrows"]) for h in tables] == [(1, 2), (2, 2)]  # data.eval_size=2


TRACKIO_RUN = """
import json, sys
from fastsd.cli import main
from trackio.sqlite_storage import SQLiteStorage
for steps, ev in (("1", "off"), ("2", "on")):
    main(["run_dir=" + sys.argv[1], "log.report_to=[trackio]", "log.project=t", "log.samples=1", "steps=" + steps,
          "eval=" + ev,
          "questions_per_step=2", "eval.k=2", "data.eval_size=2", "data.train_size=16",
          "rollout.max_new_tokens=40", "optim.micro_batch=2"])
name = json.load(open(sys.argv[1] + "/trackers.json"))["trackio"]
print("RUNS", json.dumps(SQLiteStorage.get_runs("t")))
print("LOGS", json.dumps(SQLiteStorage.get_logs("t", name), default=str))
"""


def test_trackio_locally_gets_every_row_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", TRACKIO_RUN, str(tmp_path / "r")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines()
             if line.startswith(("RUNS ", "LOGS "))}
    assert len(lines["RUNS"]) == 1  # the resumed process logged into the same run
    logs = lines["LOGS"]
    for key, points in expected(tmp_path / "r").items():
        got = [(row["step"], row[key]) for row in logs if key in row]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in points], key
    tables = [row for row in logs if "eval/samples" in row]
    assert [row["step"] for row in tables] == [1, 2]
