"""Per-token advantages: step segmentation and aggregates on hand-built cases, A_t against a direct
computation, and smoke runs of tools/advantage_report.py and tools/compare_conditions.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fastsd.evaluation.advantage import aggregate, segments, token_advantages, token_spans, token_steps
from fastsd.feedback.prompts import student_prompt, teacher_prompt
from fastsd.model.load import DEFAULT_MODEL_DIR, load_model_and_tokenizer
from fastsd.model.policy import Policy

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import advantage_report  # noqa: E402
import compare_conditions  # noqa: E402

TEXT = "<step_1>1+2=3</step_1><step_2>3*2=7</step_2><answer>7</answer>"
S2, ANS = TEXT.index("<step_2>"), TEXT.index("<answer>")


def char_spans(text: str) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(len(text))] + [(len(text), len(text))]  # + an end-of-sequence token


def test_token_steps_and_segments_by_hand():
    spans = char_spans(TEXT)
    steps = token_steps(TEXT, spans)
    assert steps[:S2] == [1] * S2 and steps[S2:ANS] == [2] * (ANS - S2) and set(steps[ANS:]) == {3}
    labels = segments(TEXT, spans, first_error=1, correct=False)
    assert labels[:S2] == ["before"] * S2
    assert labels[S2:ANS] == ["first_wrong"] * (ANS - S2)
    assert set(labels[ANS:]) == {"after"}  # the answer and the end-of-sequence token
    first = segments(TEXT, spans, first_error=0, correct=False)
    assert first[:S2] == ["first_wrong"] * S2 and set(first[S2:]) == {"after"}
    assert set(segments(TEXT, spans, None, correct=True)) == {"correct"}
    assert set(segments(TEXT, spans, None, correct=False)) == {"other"}  # no wrong step, wrong answer
    odd = "hi <step_1>1+2=3</step_3><step_7>3*2=7"  # text outside tags, misnumbered: still counted
    assert segments(odd, char_spans(odd), 1, False)[odd.index("<step_7>")] == "first_wrong"
    assert set(segments(TEXT, char_spans(TEXT), 2, False)) == {"other"}  # no such step
    cut = "<step_1>1+2=3</step_1><step_2>3*2=7"  # truncated: still located
    assert segments(cut, char_spans(cut), 1, False)[-2] == "first_wrong"


def test_aggregate_by_hand():
    adv = [torch.tensor([0.5, -0.5, -4.0, -1.0]), torch.tensor([0.2, -0.2, 0.0]), torch.tensor([9.0])]
    labels = [["before", "before", "first_wrong", "after"], ["correct"] * 3, ["other"]]
    m = aggregate(adv, labels)
    assert m["mean_before"] == 0.0 and m["mean_first_wrong"] == -4.0 and m["mean_after"] == -1.0
    assert m["mean_correct"] == pytest.approx(0.0) and m["mean_other"] == 9.0
    assert m["first_wrong_abs_share"] == pytest.approx(4.0 / 6.0)
    assert m["correct_negative_share"] == pytest.approx(0.2 / 5.7)  # of -0.5 - 4 - 1 - 0.2
    assert (m["rollouts_correct"], m["rollouts_wrong_step"], m["rollouts_other"]) == (1, 1, 1)
    assert m["tokens_before"] == 2
    empty = aggregate([], [])
    assert empty["mean_first_wrong"] is None and empty["first_wrong_abs_share"] is None
    assert empty["correct_negative_share"] is None
    with pytest.raises(ValueError, match="labels"):
        aggregate([torch.zeros(2)], [["before"]])


def test_token_advantages_equal_a_direct_computation():
    lm, tok = load_model_and_tokenizer(DEFAULT_MODEL_DIR, dtype=torch.float32)
    policy = Policy(lm.eval())
    q = "12+7*3-5"
    response = "<step_1>12+7=19</step_1><step_2>19*3=58</step_2><step_3>58-5=53</step_3><answer>53</answer>"
    critique = "<step_1>12+7=19</step_1><step_2>19*3=57</step_2><step_3>57-5=52</step_3><answer>52</answer>"
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc(student_prompt(q))] * 2
    t_prompts = [enc(teacher_prompt("critique", q, critique=critique)), enc(student_prompt(q))]
    resp = [enc(response) + [tok.eos_token_id], enc(response)[:20]]
    got = token_advantages(policy, policy, tok.pad_token_id, prompts, t_prompts, resp)
    for p, tp, r, a in zip(prompts, t_prompts, resp, got):
        def lp(prefix):
            with torch.no_grad():
                logits = lm(input_ids=torch.tensor([prefix + r])).logits[0].double()
            return torch.log_softmax(logits, -1)[len(prefix) - 1:-1].gather(1, torch.tensor(r)[:, None])[:, 0]
        assert torch.allclose(a.double(), lp(tp) - lp(p), atol=2e-4)
    assert got[1].abs().max() < 1e-4  # same context: no advantage
    spans = token_spans(tok, resp[0])
    assert "".join(response[a:b] for a, b in spans) == response and len(spans) == len(resp[0])


def test_advantage_report_and_compare_conditions_smoke(tmp_path, capsys):
    small = ["data.eval_size=2", "eval.k=2", "questions_per_step=2", "data.train_size=16", "rollout.max_new_tokens=60",
             "optim.micro_batch=4"]
    cmp_out = tmp_path / "compare"
    assert compare_conditions.main(["--out", str(cmp_out), "--seeds", "0", "--steps", "2", "--eval-every", "1",
                                    "--jobs", "2", *small]) == 0
    res = json.loads((cmp_out / "results.json").read_text())["summary"]
    assert set(res) == {"grpo", "reference", "critique"}
    for c in res.values():
        assert [step for step, _ in c["curves"]["0"]] == [0, 1, 2]
        assert 0 <= c["final"]["avg@k"]["mean"] <= 1 and c["final"]["avg@k"]["n"] == 1
    table = (cmp_out / "results.md").read_text()
    assert table.count("| critique |") == 3 and "avg@2" in table
    assert (cmp_out / "avg_vs_step.png").read_bytes()[:4] == b"\x89PNG"
    # run again: finished runs are not repeated
    assert compare_conditions.main(["--out", str(cmp_out), "--seeds", "0", "--steps", "2", "--eval-every", "1", *small]) == 0
    assert "3 of 3 runs already finished" in capsys.readouterr().out

    adv_out = tmp_path / "adv"
    assert advantage_report.main(["--questions", "3", "--out", str(adv_out), "rollout.max_new_tokens=60"]) == 0
    summary = json.loads((adv_out / "summary.json").read_text())
    assert set(summary) == {"critique", "reference"}
    for cond, s in summary.items():
        assert s["rollouts_correct"] + s["rollouts_wrong_step"] + s["rollouts_other"] == 3
        page = (adv_out / f"{cond}.html").read_text()
        assert page.count("<span") == page.count("</span>") > 0
        assert (adv_out / f"{cond}.png").read_bytes()[:4] == b"\x89PNG"
        rows = [json.loads(line) for line in (adv_out / f"{cond}.jsonl").read_text().splitlines()]
        assert all(len(r["tokens"]) == len(r["adv"]) == len(r["segments"]) for r in rows)
    # a run's own rollouts
    run_rolls = cmp_out / "critique-seed0" / "rollouts.jsonl"
    out2 = tmp_path / "adv2"
    assert advantage_report.main(["--rollouts", str(run_rolls), "--step", "2", "--condition", "critique",
                                  "--out", str(out2)]) == 0
    s = json.loads((out2 / "summary.json").read_text())["critique"]
    assert s["rollouts_correct"] + s["rollouts_wrong_step"] + s["rollouts_other"] + s["rollouts_without_context"] == 2
