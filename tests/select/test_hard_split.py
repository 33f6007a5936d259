"""The hard split of the built-in task (bench/results/hard_split/, made by fastsd-select) and the
comparison tool's use of it: held out disjoint from training, the records fastsd-train reads, the
band and k they were selected with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastsd.config import load_config
from fastsd.tasks import arith
from fastsd.tasks.data import builtin_split, load_data
from fastsd.tasks.splits import make_records

ROOT = Path(__file__).resolve().parents[2]
HARD = ROOT / "bench" / "results" / "hard_split"
sys.path.insert(0, str(ROOT / "tools"))
import compare_conditions  # noqa: E402
import right_answer_wrong_steps  # noqa: E402


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (HARD / name).read_text().splitlines()]


def test_the_held_out_problems_are_disjoint_from_every_training_problem():
    train, test = _records("train.jsonl"), _records("test.jsonl")
    assert train and test
    questions = {r["question"] for r in train}
    assert len(questions) == len(train)
    assert not questions & {r["question"] for r in test}
    # nor does any held-out problem occur among all the candidates the training half was selected from
    settings = json.loads((HARD / "train.select.json").read_text())["settings"]
    candidates = make_records("train", settings["data"]["train_size"], settings["data"]["seed"], settings["data"]["task"])
    assert not {r["question"] for r in candidates} & {r["question"] for r in test}


def test_every_record_is_in_the_band_and_reads_as_fastsd_train_reads_it():
    for name in ("train", "test"):
        summary = json.loads((HARD / f"{name}.select.json").read_text())["summary"]
        lo, hi = summary["band"]
        rows = _records(f"{name}.jsonl")
        assert len(rows) == summary["selected"]
        assert all(r["select"]["k"] == summary["k"] == 16 and lo <= r["select"]["passes"] <= hi == 4 for r in rows)
        assert sum(summary["passes_histogram"][lo:hi + 1]) == summary["selected"]
    cfg = load_config(overrides=[f"data={HARD}/train.jsonl", f"data.eval_path={HARD}/test.jsonl", "condition=reference"])
    train, held = load_data(cfg)
    assert [ex.question for ex in train] == [r["question"] for r in _records("train.jsonl")]
    assert all(ex.reference_solution for ex in train) and len(held) == len(_records("test.jsonl"))


def test_compare_takes_the_hard_split_and_reports_the_no_signal_share(tmp_path):
    args = compare_conditions.parse_args(["--hard-split", "seed=3", "--conditions", "grpo", "peer"])
    assert args.overrides == [f"data={HARD}/train.jsonl", f"data.eval_path={HARD}/test.jsonl", "seed=3"]
    run = tmp_path / "grpo-seed0"
    run.mkdir()
    usable = [0.25] * 10 + [0.5] * 5 + [1.0] * 10  # 25 steps; step 12 logged twice (a resume): the last counts
    rows = [{"step": s + 1, "usable": u} for s, u in enumerate(usable)] + [{"step": 12, "usable": 0.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    share = compare_conditions.no_signal(run)
    assert share["first"] == 0.75 and share["last"] == 0.0
    assert abs(share["all"] - (10 * 0.75 + 4 * 0.5 + 1.0) / 25) < 1e-12
    assert compare_conditions._shares({"all": [0.3, 0.5], "first": [0.75], "last": []}) == "0.30-0.50; 0.75, -"


def test_right_answers_through_a_wrong_step_are_counted(tmp_path, capsys):
    """tools/right_answer_wrong_steps.py (the comparison's reading of peer's demonstrations): of the
    rewarded rollouts, those with a wrong intermediate step; unrewarded ones are not counted."""
    ex = builtin_split("train", 1, 0)[0]
    right = arith.canonical_solution(ex.question)
    lucky = right.replace("=", "=1", 1)  # the first result wrong, the final answer kept
    wrong = lucky.replace(f"<answer>{ex.answer}<", f"<answer>{ex.answer}1<")
    assert lucky != right and wrong != lucky
    rows = [{"step": 1, "question": ex.question, "truth": ex.answer, "response": text, "reward": reward}
            for text, reward in ((right, 1), (lucky, 1), (lucky, 1), (wrong, 0))]
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert right_answer_wrong_steps.main([str(tmp_path)]) == 0
    first = capsys.readouterr().out.splitlines()[0].split("\t")
    assert first[1:] == ["steps 1-10", "rollouts 4", "reward 1: 3", "with a wrong step: 2 (0.67)"]
