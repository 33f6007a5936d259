"""fastsd-report: a run's logged figures computed again from its files, and every disagreement named."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fastsd.config import load_config, to_yaml
from fastsd.evaluation.report import main
from fastsd.model import Dist
from fastsd.train import train

RIGHT = "<step_1>2+3=5</step_1><answer>5</answer>"
WRONG = "<step_1>2+3=6</step_1><answer>6</answer>"
CUT = "<step_1>2+3="


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rollout(response: str, answer, reward: float, trained=True, **extra) -> dict:
    return {"step": 1, "question": "2+3", "truth": "5", "response": response, "answer": answer, "reward": reward,
            "trained": trained, **extra}


def hand_made(run: Path, condition="grpo") -> Path:
    """A run directory written by hand: 4 rollouts (2 right, 1 wrong, 1 without an answer) and one
    evaluation of 2 questions x 3 samples whose figures are worked out here."""
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"condition": condition, "format": "steps", "grader": "exact"}))
    rolls = [rollout(RIGHT, "5", 1.0), rollout(RIGHT, "5", 1.0), rollout(WRONG, "6", 0.0),
             rollout(CUT, None, 0.0, trained=False, **({"critique_error": "timeout"} if condition == "critique" else {}))]
    write_jsonl(run / "rollouts.jsonl", rolls)
    evals = [{"step": 1, "final": True, "question": "2+3", "truth": "5", "responses": [RIGHT, WRONG, RIGHT],
              "answers": ["5", "6", "5"], "correct": [True, False, True]},
             {"step": 1, "final": True, "question": "1+1", "truth": "2", "responses": [WRONG, CUT, WRONG],
              "answers": ["6", None, "6"], "correct": [False, False, False]}]
    write_jsonl(run / "evals.jsonl", evals)
    counter = {"zero_variance_rollouts": 1} if condition == "grpo" else {"critique_failed": 1}
    write_jsonl(run / "metrics.jsonl", [
        {"step": 1, "loss": None, "reward": 0.5, "usable": 0.75, "no_answer": 0.25, **counter},
        {"step": 1, "final": True, "eval": {"avg@k": 2 / 6, "pass@k": 0.5, "maj@k": 0.5, "k": 3, "questions": 2}}])
    return run


def edit(path: Path, index: int, **changes) -> None:
    rows = read_jsonl(path)
    rows[index].update(changes)
    write_jsonl(path, rows)


def test_a_hand_made_run_checks_out(tmp_path, capsys):
    for condition in ("grpo", "critique"):
        assert main([str(hand_made(tmp_path / condition, condition))]) == 0
        out = capsys.readouterr().out
        assert "eval at step 1 (final): avg@k=0.333 pass@k=0.500 maj@k=0.500" in out
        assert "every recomputable figure agrees" in out


def test_each_tampered_figure_is_named(tmp_path, capsys):
    cases = [
        ("metrics.jsonl", 0, {"reward": 0.75}, "step 1: reward logged 0.75, from rollouts.jsonl 0.5"),
        ("metrics.jsonl", 0, {"no_answer": 0.0}, "step 1: no_answer logged 0.0, from rollouts.jsonl 0.25"),
        ("metrics.jsonl", 0, {"usable": 1.0}, "step 1: usable logged 1.0, from rollouts.jsonl 0.75"),
        ("metrics.jsonl", 0, {"zero_variance_rollouts": 0}, "zero_variance_rollouts logged 0, from rollouts.jsonl 1"),
        ("metrics.jsonl", 1, {"eval": {"avg@k": 0.5, "pass@k": 0.5, "maj@k": 0.5, "k": 3, "questions": 2}},
         "eval at step 1 (final): avg@k logged 0.5, from evals.jsonl 0.333"),
        ("rollouts.jsonl", 2, {"reward": 1.0}, "step 1, rollout 2: reward logged 1.0, graded 0.0"),
        ("rollouts.jsonl", 3, {"answer": "5"}, "step 1, rollout 3: answer logged '5', parsed None"),
        ("evals.jsonl", 1, {"correct": [False, False, True]}, "eval at step 1 (final), question 1: answers or verdicts"),
    ]
    for i, (name, index, changes, message) in enumerate(cases):
        run = hand_made(tmp_path / str(i))
        edit(run / name, index, **changes)
        assert main([str(run)]) == 1, message
        assert message in capsys.readouterr().err


def test_a_run_without_these_records_cannot_be_checked(tmp_path, capsys):
    run = hand_made(tmp_path / "old")
    write_jsonl(run / "rollouts.jsonl", [{k: v for k, v in r.items() if k != "truth"}
                                         for r in read_jsonl(run / "rollouts.jsonl")])
    assert main([str(run)]) == 2 and "a run logged before fastsd-report" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2 and "not a fastsd run directory" in capsys.readouterr().err


def test_a_finished_run_checks_out_and_a_tampered_one_does_not(tmp_path, capsys):
    """What fastsd-train writes is what fastsd-report reads: ids as trained, every evaluation's samples."""
    cfg = load_config(overrides=["steps=2", "questions_per_step=2", "eval.k=2", "data.eval_size=3", "data.train_size=16",
                                 "rollout.max_new_tokens=40", "optim.micro_batch=2", "eval.every=1",
                                 f"run_dir={tmp_path}"])
    train(cfg, Dist())
    assert main([str(tmp_path)]) == 0
    assert len(read_jsonl(tmp_path / "evals.jsonl")) == 3 * 3  # evaluations at steps 0, 1, 2
    roll = read_jsonl(tmp_path / "rollouts.jsonl")[0]
    assert roll["truth"] and roll["response_ids"] and roll["prompt_ids"] and roll["teacher_prompt_ids"]
    assert to_yaml(cfg) == (tmp_path / "config.yaml").read_text()
    edit(tmp_path / "metrics.jsonl", -1, eval={**read_jsonl(tmp_path / "metrics.jsonl")[-1]["eval"], "questions": 4})
    capsys.readouterr()
    assert main([str(tmp_path)]) == 1
    assert "eval at step 2 (final): questions logged 4, from evals.jsonl 3" in capsys.readouterr().err
