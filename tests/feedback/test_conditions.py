"""The condition interface: the registry, user conditions by import path (the worked example of
docs/conditions.md among them), condition=peer's demonstrations and counters, condition=context."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fastsd.config import load_config
from fastsd.config.dry_run import annotated_yaml
from fastsd.feedback import feedback
from fastsd.feedback.critic import ArithCritic
from fastsd.feedback.peer import strip_thinking
from fastsd.feedback.prompts import encode, fill, student_text
from fastsd.feedback.registry import registered
from fastsd.model.batch import build_batch
from fastsd.model.load import build_tokenizer
from fastsd.rollout import Rollout
from fastsd.run import run_dir as run_dir_mod
from fastsd.tasks import arith
from fastsd.tasks.data import Example, builtin_split, load_data
from fastsd.tasks.format import parse_response, reward

REPO = Path(__file__).resolve().parents[2]
TOK = build_tokenizer()


def group(cfg, tok, texts, g=0, ex=None):
    """Rollouts of one question, one per response text, in that order."""
    ex = ex or builtin_split("train", 1, 0)[0]
    prompt = encode(tok, student_text(cfg.templates, tok, ex.question))
    out = []
    for t in texts:
        parsed = parse_response(t, cfg.format)
        out.append(Rollout(ex, prompt, encode(tok, t) + [tok.eos_token_id], parsed, reward(parsed, ex.answer), g))
    return out


def right_and_wrong(ex):
    right = arith.canonical_solution(ex.question)
    return right, right.replace("=", "=1", 1).replace(f"<answer>{ex.answer}<", f"<answer>{ex.answer}1<")


# ---------------------------------------------------------------- registry and user conditions

def test_the_built_in_conditions_are_registered():
    assert set(registered()) == {"grpo", "reference", "critique", "peer", "context"}
    assert load_config(overrides=["condition=peer"]).group_size == 8


@pytest.mark.parametrize("name,message", [
    ("sft", "unknown condition 'sft'; expected one of"),
    ("no_such_module_xyz:Rubric", "cannot import module 'no_such_module_xyz'"),
    ("fastsd.feedback.peer:Rubric", "module 'fastsd.feedback.peer' has no attribute 'Rubric'"),
    ("fastsd.feedback.peer:strip_thinking", "is not a subclass of fastsd.feedback.Condition"),
    ("user_conditions:NoContext", "has a teacher but does not define context"),
])
def test_a_condition_that_cannot_be_used_is_an_error_naming_the_key(name, message, monkeypatch, tmp_path):
    (tmp_path / "user_conditions.py").write_text("from fastsd.feedback import Condition\n\n"
                                                 "class NoContext(Condition):\n    name = 'nocontext'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="^condition: .*" + re.escape(message)):
        load_config(overrides=[f"condition={name}"])


def _docs_example(tmp_path, monkeypatch) -> str:
    """The worked example's code from docs/conditions.md, written as module `corrected_step`."""
    page = (REPO / "docs" / "conditions.md").read_text()
    code = page.split("<!-- example: corrected_step.py -->\n```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "corrected_step.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("corrected_step", None)
    return code


def test_the_worked_example_of_the_docs_runs_by_import_path(tmp_path, monkeypatch):
    _docs_example(tmp_path, monkeypatch)
    cfg = load_config(overrides=["condition=corrected_step:CorrectedStep"])
    ex = builtin_split("train", 1, 0)[0]
    right, wrong = right_and_wrong(ex)
    rolls = group(cfg, TOK, [wrong, right])
    feedback(cfg, TOK, rolls, ArithCritic())
    critique = ArithCritic().critique(ex.question, ex.answer, rolls[0].parsed.steps)
    fixed = re.findall(r"<step_\d+>.*?</step_\d+>", critique.text)[critique.first_error]
    assert rolls[0].context == fixed and rolls[0].trained
    assert TOK.decode(rolls[0].teacher_prompt) == f"Q:{ex.question}\nFix:{fixed}\n"
    assert rolls[1].teacher_prompt is None and not rolls[1].trained  # no wrong step: no teacher
    assert "  base_url: http://127.0.0.1:8100/v1  # ignored: critic=http only" in annotated_yaml(cfg)
    assert "peer:  # ignored: condition=corrected_step:CorrectedStep does not read it" in annotated_yaml(cfg)


# ---------------------------------------------------------------- peer

def test_peer_demonstrates_the_first_correct_other_sibling_and_never_itself():
    cfg = load_config(overrides=["condition=peer"])
    ex = builtin_split("train", 1, 0)[0]
    right, wrong = right_and_wrong(ex)
    rolls = group(cfg, TOK, [wrong, right, wrong, right + " "]) + group(cfg, TOK, [wrong, wrong], g=1)
    feedback(cfg, TOK, rolls, None)
    demo_of = [r.notes.get("demo_index") for r in rolls]
    assert demo_of == [1, 3, 1, 1, None, None]  # rollout 1 is correct: the next correct one, not itself
    for r in rolls[:4]:
        demo = TOK.decode(rolls[r.notes["demo_index"]].response, skip_special_tokens=True)
        assert r.teacher_prompt == encode(TOK, f"Q:{ex.question}\nR:{demo}\n") and r.trained
        b = build_batch([r.prompt], [r.response], TOK.pad_token_id, [r.teacher_prompt])  # the sampled ids follow
        assert b.t_ids.flatten()[b.t_index + 1].tolist() == r.response == b.s_ids.flatten()[b.s_index + 1].tolist()
    assert all(r.teacher_prompt is None and not r.trained for r in rolls[4:])  # no correct sibling: no teacher
    row, _ = run_dir_mod.step_row(cfg, _one(), 1, rolls, {"divergence": 0.1, "gap": 0.0, "grad_norm": 1.0}, 1e-4,
                                  [0.0, 1.0, 2.0, 3.0])
    assert row["peer_groups_solved"] == 0.5 and row["peer_demo"] == 4 / 6 and row["peer_no_teacher"] == 2 / 6
    assert row["peer_demo"] + row["peer_fallback"] + row["peer_no_teacher"] == 1 and row["peer_feedback"] == 0
    assert row["usable"] == 4 / 6


def test_peer_picks_a_sibling_by_position_when_two_sampled_the_same_response():
    cfg = load_config(overrides=["condition=peer"])
    right, _ = right_and_wrong(builtin_split("train", 1, 0)[0])
    rolls = group(cfg, TOK, [right, right])  # equal as values: each still reads the other
    feedback(cfg, TOK, rolls, None)
    assert [r.notes["demo_index"] for r in rolls] == [1, 0]


def _one():
    from fastsd.model.dist import Dist

    return Dist()


@pytest.mark.parametrize("kind", ["verdict", "critique"])
def test_peer_feedback_and_fallback(kind):
    cfg = load_config(overrides=["condition=peer", f"peer.feedback={kind}", "peer.fallback=reference"])
    ex = builtin_split("train", 1, 0)[0]
    right, wrong = right_and_wrong(ex)
    rolls = group(cfg, TOK, [wrong, right])
    feedback(cfg, TOK, rolls, ArithCritic())
    said = (f"the answer {ex.answer}1 is wrong" if kind == "verdict"
            else ArithCritic().critique(ex.question, ex.answer, rolls[0].parsed.steps).text)
    assert TOK.decode(rolls[0].teacher_prompt) == f"Q:{ex.question}\nR:{right}\nF:{said}\n"
    assert rolls[0].notes == {"peer": "demonstration", "demo_index": 1, "feedback": True}
    # The correct rollout has no other correct sibling: the fallback, the reference solution.
    assert TOK.decode(rolls[1].teacher_prompt) == f"Q:{ex.question}\nR:{ex.reference_solution}\n"
    assert rolls[1].notes == {"peer": "fallback"}
    row, _ = run_dir_mod.step_row(cfg, _one(), 1, rolls, {"divergence": 0.1, "gap": 0.0, "grad_norm": 1.0}, 1e-4,
                                  [0.0, 1.0, 2.0, 3.0])
    assert (row["peer_demo"], row["peer_fallback"], row["peer_no_teacher"], row["peer_feedback"]) == (0.5, 0.5, 0, 0.5)
    assert ("critique_failed" in row) == (kind == "critique")


def test_peer_cuts_the_demonstration_never_the_question_and_strips_thinking():
    assert strip_thinking("<think>a\nb</think>\n\nAnswer 4<think>open") == "Answer 4"
    cfg = load_config(overrides=["condition=peer", "peer.max_demo_tokens=7", "peer.strip_thinking=true"])
    ex = builtin_split("train", 1, 0)[0]
    right, wrong = right_and_wrong(ex)
    rolls = group(cfg, TOK, [wrong, "<think>scratch</think>" + right])
    feedback(cfg, TOK, rolls, None)
    assert TOK.decode(rolls[0].teacher_prompt) == f"Q:{ex.question}\nR:{right[:7]}\n"  # one token per character


def test_peer_on_the_chat_stand_in_reads_the_sampled_ids_after_the_rendered_demonstration(standin):
    tok = AutoTokenizer.from_pretrained(standin, local_files_only=True)
    cfg = load_config(overrides=["condition=peer", "format=free", "peer.strip_thinking=true",
                                 "templates.teacher_chat_kwargs={enable_thinking: false}"])
    ex = Example(r"What is $\frac{6}{8}$ in lowest terms?", r"\frac{3}{4}")
    texts = ["It is $\\boxed{\\frac{6}{8}}$", "<think>halve</think>Halve both: $\\boxed{\\frac{3}{4}}$"]
    rolls = group(cfg, tok, texts, ex=ex)
    assert [r.reward for r in rolls] == [0, 1]
    feedback(cfg, tok, rolls, None)
    demo = "Halve both: $\\boxed{\\frac{3}{4}}$"
    user = fill(cfg.peer.template, {"question": ex.question, "demonstration": demo, "feedback": ""})
    want = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False)
    assert tok.decode(rolls[0].teacher_prompt) == want and "<|im_start|>user" in want
    b = build_batch([rolls[0].prompt], [rolls[0].response], tok.pad_token_id, [rolls[0].teacher_prompt])
    assert b.t_ids.flatten()[b.t_index + 1].tolist() == rolls[0].response


@pytest.mark.parametrize("overrides,message", [
    (["peer.template=Q:{question}\\n"], "^peer.template: does not use {demonstration}"),
    (["peer.feedback=verdict", "peer.template=Q:{question}\\nR:{demonstration}\\n"], "^peer.template: peer.feedback"),
    (["peer.max_demo_tokens=-1"], "^peer.max_demo_tokens: must be >= 0"),
    (["peer.fallback=reference", "data.fields.reference_solution="], "^peer.fallback: reference needs"),
    (["rollout.group_size=1"], "^rollout.group_size: peer needs at least 2"),
])
def test_bad_peer_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=["condition=peer", *overrides])


# ---------------------------------------------------------------- a data column as the context

def test_a_data_column_is_the_teachers_context(tmp_path):
    data = tmp_path / "hints.jsonl"
    data.write_text('{"question": "1+2", "answer": 3, "hint": "add them"}\n{"question": "2+2", "answer": 4}\n')
    cfg = load_config(overrides=["condition=context", f"data={data}", "data.fields.context=hint",
                                 "templates.context=Hint: {context}. {question}="])
    with pytest.raises(ValueError, match=f"^data.path:.*{data.name}:2: missing key 'hint' \\(data.fields.context\\)"):
        load_data(cfg)
    data.write_text('{"question": "1+2", "answer": 3, "hint": "add them"}\n')
    ex = load_data(cfg)[0][0]
    assert ex.context == "add them"
    rolls = group(cfg, TOK, ["<answer>3</answer>"], ex=ex)
    feedback(cfg, TOK, rolls, None)
    assert TOK.decode(rolls[0].teacher_prompt) == "Hint: add them. 1+2=" and rolls[0].trained
    assert load_data(load_config(overrides=[f"data={data}"]))[0][0].context is None  # other conditions: not read
    with pytest.raises(ValueError, match="^data.fields.context: condition=context needs"):
        load_config(overrides=["condition=context", f"data={data}"])


# ---------------------------------------------------------------- the tools take any condition

def _tool(name):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        return __import__(name)
    finally:
        sys.path[:1] = []


def test_the_tools_take_any_registered_or_user_condition(tmp_path, monkeypatch, capsys):
    _docs_example(tmp_path, monkeypatch)
    compare, advantage = _tool("compare_conditions"), _tool("advantage_report")
    args = compare.parse_args(["--conditions", "peer", "context", "corrected_step:CorrectedStep", "--dry-run"])
    assert args.conditions == ["peer", "context", "corrected_step:CorrectedStep"]
    assert advantage.parse_args(["--condition", "peer", "corrected_step:CorrectedStep"]).condition[0] == "peer"
    for tool, flag, name, message in [(compare, "--conditions", "sft", "unknown condition 'sft'"),
                                      (advantage, "--condition", "grpo", "grpo has no teacher"),
                                      (advantage, "--condition", "nope_xyz:A", "cannot import module 'nope_xyz'")]:
        with pytest.raises(SystemExit):
            tool.parse_args([flag, name])
        assert message in capsys.readouterr().err
    text = compare.dry_run(compare.parse_args(["--conditions", "peer", "corrected_step:CorrectedStep", "grpo"]))
    question = builtin_split("train", 16, 0)[0].question  # the default data: the first training question
    assert f"#   Q:{question}\\n\n#   R:[a correct sibling rollout's response]\\n\n" in text
    assert f"#   Q:{question}\\n\n#   Fix:[condition=corrected_step's context for this rollout]\\n\n" in text
    assert "# condition=grpo: no teacher" in text
