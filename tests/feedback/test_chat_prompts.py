r"""Prompts through the chat template: per-role kwargs and system messages, braces in templates,
dict-valued config keys, the response tokens on both sides, --dry-run and the paper's recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fastsd import cli
from fastsd.config import load_config, to_yaml
from fastsd.feedback import feedback
from fastsd.feedback.prompts import encode, example_prompts, fill, student_text, teacher_text
from fastsd.model.batch import build_batch
from fastsd.model.load import DEFAULT_MODEL_DIR
from fastsd.rollout import Rollout
from fastsd.tasks.data import Example
from fastsd.tasks.format import parse_response

REPO = Path(__file__).resolve().parents[2]
EX = Example(r"Simplify $\frac{6}{8}$.", r"\frac{3}{4}", r"Divide by 2: $\boxed{\frac{3}{4}}$.")
THINK_OFF = "{enable_thinking: false}"
THINK_ON = "{enable_thinking: true}"


@pytest.fixture(scope="module")
def tok(standin):
    return AutoTokenizer.from_pretrained(standin, local_files_only=True)


def cfg_for(*overrides):
    return load_config(overrides=list(overrides))


# ---------------------------------------------------------------- templates and config

def test_templates_fill_only_their_fields():
    assert fill(r"{question} Put it in \boxed{}: {x} {{question}}", {"question": "Q"}) == r"Q Put it in \boxed{}: {x} {Q}"
    assert fill("{question}|{critique}", {"question": "{critique}", "critique": "C"}) == "{critique}|C"  # one pass
    cfg = cfg_for(r"templates.student={question} Put the answer in \boxed{}.")
    assert student_text(cfg.templates, None, "1+2") == r"1+2 Put the answer in \boxed{}."


@pytest.mark.parametrize("override,message", [
    ("templates.student=Q:{questoin}", r"templates.student: unknown field \{questoin\} \(did you mean \{question\}"),
    ("templates.critique=Q:{question} C:{critique", r"templates.critique: does not use \{critique\}"),
    ("templates.reference={reference}", r"templates.reference: does not use \{question\}"),
    ("templates.student_chat_kwargs=[1, 2]", r"templates.student_chat_kwargs: expected a mapping"),
    ("templates.teacher_chat_kwargs={a: [", r"templates.teacher_chat_kwargs: expected a mapping"),
    ("templates.chat=maybe", r"templates.chat: expected one of"),
])
def test_bad_templates_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        cfg_for(override)


def test_chat_kwargs_from_the_command_line_and_a_file(tmp_path):
    cfg = cfg_for(f"templates.student_chat_kwargs={THINK_OFF}", "templates.teacher_chat_kwargs={a: 1, b: [x]}")
    assert cfg.templates.student_chat_kwargs == {"enable_thinking": False}
    assert cfg.templates.teacher_chat_kwargs == {"a": 1, "b": ["x"]}
    (tmp_path / "c.yaml").write_text("templates:\n  chat: off\n")  # YAML 1.1 reads off as false
    assert load_config(str(tmp_path / "c.yaml")).templates.chat == "off"
    (tmp_path / "c.yaml").write_text("templates:\n  teacher_chat_kwargs:\n    enable_thinking: true\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert cfg.templates.teacher_chat_kwargs == {"enable_thinking": True} and cfg.templates.student_chat_kwargs == {}
    (tmp_path / "saved.yaml").write_text(to_yaml(cfg))
    assert load_config(str(tmp_path / "saved.yaml")) == cfg  # the run directory's config.yaml reads back


# ---------------------------------------------------------------- rendering

def test_each_side_gets_its_own_chat_kwargs_and_system_message(tok):
    cfg = cfg_for(f"templates.student_chat_kwargs={THINK_OFF}", f"templates.teacher_chat_kwargs={THINK_ON}",
                  "templates.teacher_system=You teach.")
    s = student_text(cfg.templates, tok, EX.question)
    t = teacher_text(cfg.templates, tok, "critique", EX.question, "the critique")
    assert s == f"<|im_start|>user\nQ:{EX.question}\n<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert t == (f"<|im_start|>system\nYou teach.<|im_end|>\n<|im_start|>user\nQ:{EX.question}\nC:the critique\n"
                 "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(encode(tok, s)) == s  # the special tokens are single ids, the text round-trips
    assert encode(tok, s)[0] == tok.convert_tokens_to_ids("<|im_start|>")
    off = cfg_for("templates.chat=off")
    assert student_text(off.templates, tok, EX.question) == f"Q:{EX.question}\n"


def test_the_builtin_model_keeps_its_plain_prompts():
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    cfg = cfg_for()
    assert not getattr(tok, "chat_template", None)
    assert student_text(cfg.templates, tok, "1+2") == "Q:1+2\n"
    assert teacher_text(cfg.templates, tok, "critique", "1+2", "C") == "Q:1+2\nC:C\n"
    with pytest.raises(ValueError, match="templates.chat: on, but the tokenizer of model.path has no chat template"):
        student_text(cfg_for("templates.chat=on").templates, tok, "1+2")


def test_chat_template_errors_name_the_key(tok):
    cfg = cfg_for("templates.student_chat_kwargs={add_generation_prompt: false}")
    with pytest.raises(ValueError, match=r"templates.student_chat_kwargs: \['add_generation_prompt'\] are fastsd's own"):
        student_text(cfg.templates, tok, "q")
    broken = AutoTokenizer.from_pretrained(tok.name_or_path, local_files_only=True)
    broken.chat_template = "{{ raise_exception('no system messages') if messages[0].role == 'system' }}"
    cfg = cfg_for("templates.teacher_system=hello")
    with pytest.raises(ValueError, match="templates.teacher_chat_kwargs: the tokenizer's chat template failed"):
        teacher_text(cfg.templates, broken, "critique", "q", "c")


def test_a_template_holding_the_chat_markup_is_refused_before_it_is_wrapped_again(tok):
    """With templates.chat=auto a hand-written Qwen turn was wrapped a second time, in silence."""
    turn = "<|im_start|>user\nQ: {question}<|im_end|>\n<|im_start|>assistant\n"
    example = Example("1+1", "2", "1+1=2")
    with pytest.raises(ValueError, match=r"templates.student: holds '<\|im_start\|>', markup of the tokenizer's chat"):
        example_prompts(cfg_for(f"templates.student={turn}"), tok, example)
    with pytest.raises(ValueError, match=r"templates.reference: holds '<\|im_start\|>'"):
        example_prompts(cfg_for("condition=reference", "templates.reference=<|im_start|>R:{reference} {question}"), tok,
                        example)
    plain = example_prompts(cfg_for(f"templates.student={turn}", "templates.chat=off"), tok, example)
    assert plain["student"] == turn.replace("{question}", "1+1")  # sent as written
    assert example_prompts(cfg_for(), tok, example)["student"].count("<|im_start|>user") == 1


def test_the_teacher_scores_exactly_the_sampled_tokens(tok):
    """Student prompt (thinking off) + sampled ids, teacher prompt (thinking on) + the same ids: the
    response positions of both sides predict the same targets, and nothing is re-tokenised."""
    cfg = cfg_for("condition=reference", "format=free", f"templates.student_chat_kwargs={THINK_OFF}",
                  f"templates.teacher_chat_kwargs={THINK_ON}")
    prompt = encode(tok, student_text(cfg.templates, tok, EX.question))
    text = "Halve both.\n\nSo $\\boxed{\\frac{3}{4}}$"
    response = encode(tok, text) + [tok.eos_token_id]
    roll = Rollout(EX, prompt, response, parse_response(text, "free"), 1.0, 0)
    feedback(cfg, tok, [roll], None)
    assert tok.decode(roll.teacher_prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(roll.prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    b = build_batch([roll.prompt], [roll.response], tok.pad_token_id, [roll.teacher_prompt])
    s_next = b.s_ids.flatten()[b.s_index + 1]
    t_next = b.t_ids.flatten()[b.t_index + 1]
    assert s_next.tolist() == t_next.tolist() == response


# ---------------------------------------------------------------- --dry-run and the recipe

def test_dry_run_prints_the_rendered_prompts(standin, math_data, capsys):
    train, test = math_data
    assert cli.main(["--dry-run", f"model={standin}", f"data={train}", f"data.eval_path={test}",
                     f"templates.student_chat_kwargs={THINK_OFF}", "condition=reference"]) == 0
    out = capsys.readouterr().out
    student = out.split("# The student's prompt")[1].split("# The teacher's prompt")[0]
    teacher = out.split("# The teacher's prompt")[1]
    assert r"#   <think>\n" in student and r"#   <|im_start|>assistant\n" in student
    assert "<think>" not in teacher and r"Simplify $\frac{6}{8}$." in teacher
    assert "Divide numerator and denominator by 2." in teacher  # the reference solution
    assert cli.main(["--dry-run", "condition=grpo"]) == 0
    assert "condition=grpo: no teacher" in capsys.readouterr().out


def test_paper_recipe_dry_run(standin, math_data, tmp_path, capsys):
    """Every value the paper states, checked through --dry-run with model= at the stand-in and
    the data renamed to OpenMathReasoning's columns (as the recipe maps them)."""
    from standin import write_math_data

    train, test = write_math_data(tmp_path, {"question": "problem", "answer": "expected_answer",
                                             "reference_solution": "generated_solution"})
    recipe = str(REPO / "configs" / "paper_qwen3_1.7b.yaml")
    assert cli.main(["--config", recipe, "--dry-run", f"model={standin}", f"data={train}", f"data.eval_path={test}"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(recipe, [f"model={standin}"])
    assert (cfg.optim.lr, cfg.questions_per_step, cfg.rollout.temperature, cfg.rollout.max_new_tokens) == (5e-6, 32, 1.1, 2048)
    assert (cfg.loss.divergence, cfg.teacher.kind, cfg.eval.k, cfg.eval.every) == ("forward_kl", "initial", 12, 10)
    assert (cfg.critic.kind, cfg.condition, cfg.format, cfg.grader) == ("http", "critique", "free", "math")
    assert cfg.templates.student_chat_kwargs == {"enable_thinking": False}
    assert cfg.templates.teacher_chat_kwargs == {"enable_thinking": True}
    assert cfg.data.fields.question == "problem" and cfg.data.fields.answer == "expected_answer"
    lora = cfg.model.lora  # paper: r=64, alpha=128 on the attention and MLP projections
    assert (lora.r, lora.alpha, sorted(lora.target_modules)) == (
        64, 128, sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    student = out.split("# The student's prompt")[1].split("# The teacher's prompt")[0]
    teacher = out.split("# The teacher's prompt")[1]
    assert r"Simplify $\frac{6}{8}$." in student and r"within \boxed{}." in student  # braces kept as written
    assert r"<think>\n" in student and "<think>" not in teacher
    assert "[the critic's step-aligned critique of this rollout]" in teacher
