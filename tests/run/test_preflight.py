"""Everything checkable without the model is checked before it loads, and a failed check leaves
the run directory as it was (`fastsd.run.preflight`)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from fastsd import cli
from fastsd import train as train_mod
from fastsd.config import load_config
from fastsd.tasks.data import builtin_split

SMALL = ["steps=1", "questions_per_step=2", "eval.k=2", "data.eval_size=2", "data.train_size=16",
         "rollout.max_new_tokens=40"]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the run gets as far as loading the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check failed")

    monkeypatch.setattr(train_mod, "build_models", refuse)


def run_dir_with_an_earlier_file(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    return run_dir


def fails(capsys, run_dir: Path, *overrides: str) -> str:
    """The error message of a run that must stop at exit code 2, leaving run_dir as it was."""
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) if run_dir.exists() else None
    with pytest.raises(SystemExit) as exc:
        cli.main([*SMALL, f"run_dir={run_dir}", *overrides])
    assert exc.value.code == 2
    after = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) if run_dir.exists() else None
    assert after == before, "a failed check wrote to the run directory"
    return capsys.readouterr().err


def records(n: int, offset: int = 0) -> list[str]:
    return [json.dumps({"question": ex.question, "answer": ex.answer, "reference_solution": ex.reference_solution})
            for ex in builtin_split("train", n + offset, 0)[offset:]]


def test_a_malformed_line_in_either_file_is_found_before_the_model_loads(tmp_path, capsys, no_model):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("\n".join(records(4)) + "\n")
    bad.write_text("\n".join(records(3)) + '\n{"question": "1+2", "answer": \n' + records(1, 5)[0] + "\n")
    run_dir = run_dir_with_an_earlier_file(tmp_path)
    err = fails(capsys, run_dir, f"data={bad}")
    assert f"data.path: {bad}:4: invalid JSON" in err
    err = fails(capsys, tmp_path / "fresh", f"data={good}", f"data.eval_path={bad}")
    assert f"data.eval_path: {bad}:4: invalid JSON" in err
    assert not (tmp_path / "fresh").exists()


def test_builtin_critic_on_other_data_names_critic_kind(tmp_path, capsys, no_model):
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(records(2)) + "\n\n"
                    + json.dumps({"question": "What is the derivative of x^2?", "answer": "2x",
                                  "reference_solution": "d/dx x^2 = 2x"}) + "\n")
    err = fails(capsys, run_dir_with_an_earlier_file(tmp_path), f"data={data}")
    assert "critic.kind: critic=builtin is the built-in arithmetic task's own critic" in err
    assert f"{data}:4 is not one of that task's questions" in err  # the line, blank lines counted
    assert "use critic=http" in err
    # A wrong answer to a question of the task is caught too; and other conditions need no critic.
    data.write_text(json.dumps({"question": "1+2*3", "answer": "7", "reference_solution": "x"}) + "\n")
    assert "disagrees" in fails(capsys, tmp_path / "run", f"data={data}")
    for condition in ("reference", "grpo"):
        with pytest.raises(AssertionError, match="the model was loaded"):  # got past every check
            cli.main([*SMALL, f"run_dir={tmp_path / condition}", f"data={data}", f"condition={condition}"])
        assert [p.name for p in (tmp_path / condition).iterdir()] == ["run.lock"]  # taken after every check


def test_an_unreachable_critic_server_is_found_before_the_model_loads(tmp_path, capsys, no_model):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = run_dir_with_an_earlier_file(tmp_path)
    err = fails(capsys, run_dir, "critic=http", f"critic.base_url=http://127.0.0.1:{port}/v1")
    assert f"critic.base_url: cannot reach http://127.0.0.1:{port}/v1" in err
    assert not (run_dir / "critic_cache").exists()


def test_a_template_that_cannot_be_rendered_is_found_before_the_model_loads(tmp_path, capsys, no_model):
    # Rendering needs the tokenizer (chat template or not), which preflight loads without the model.
    err = fails(capsys, run_dir_with_an_earlier_file(tmp_path), "templates.chat=on")
    assert "templates.chat: on, but the tokenizer of model.path has no chat template" in err
    # A template the config check cannot judge alone fails at load time, naming the key, too.
    err = fails(capsys, tmp_path / "fresh", "templates.student=Q:{questoin}")
    assert "templates.student" in err and not (tmp_path / "fresh").exists()


def test_missing_model_and_resume_never_are_found_before_anything_is_written(tmp_path, capsys, no_model):
    assert f"model.path: {tmp_path}/nope does not exist" in fails(capsys, tmp_path / "run", f"model={tmp_path}/nope")
    (tmp_path / "notamodel").mkdir()
    assert "is not a checkpoint (no config.json)" in fails(capsys, tmp_path / "run", f"model={tmp_path}/notamodel")
    run_dir = run_dir_with_an_earlier_file(tmp_path)
    (run_dir / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000001" / "COMPLETE").write_text("")
    assert "resume: never, but run_dir" in fails(capsys, run_dir, "resume=never")


def test_topk_beyond_the_vocabulary_is_found_before_the_model_loads(tmp_path, capsys, no_model):
    from fastsd.model.load import build_tokenizer

    vocab = len(build_tokenizer())
    err = fails(capsys, run_dir_with_an_earlier_file(tmp_path), f"loss.topk={vocab + 1}")
    assert f"loss.topk: {vocab + 1} exceeds the vocabulary of model.path ({vocab} tokens, " in err
    # ignored where the run uses no divergence (said by the config check, not refused): the checks pass
    with pytest.raises(AssertionError, match="the model was loaded"):
        cli.main([*SMALL, f"run_dir={tmp_path / 'grpo'}", f"loss.topk={vocab + 1}", "condition=grpo"])


@pytest.mark.parametrize("change, message", [
    ("seed=1", r"^seed: 0 in the run that saved .*, 1 now: a resumed run cannot change it \(the checkpoint's random"),
    ("model.lora.r=4", r"^model.lora.r: 0 in the run that saved"),
    ("teacher=ema", r"^teacher.kind: ema, but the run that saved .* had condition=critique teacher=initial"),
])
def test_a_key_the_checkpoint_fixes_is_refused_on_resume_before_the_model_loads(tmp_path, change, message, monkeypatch):
    """A changed seed was logged as changed, then the checkpoint's random state ran on; a LoRA
    rank or an ema teacher failed only once the model had loaded."""
    from fastsd.model import Dist
    from fastsd.run import build
    from fastsd.train import train

    run = [f"run_dir={tmp_path}", "steps=1", "eval=off", "questions_per_step=2", "rollout.max_new_tokens=16"]
    train(load_config(overrides=run), Dist())
    with monkeypatch.context() as m:
        m.setattr(build, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model loaded"))
        with pytest.raises(ValueError, match=message):
            train(load_config(overrides=[*run, "steps=2", change]), Dist())
    train(load_config(overrides=[*run, "steps=2", "optim.lr=1e-4", "eval.k=3"]), Dist())  # these take effect
