"""Questions whose prompt plus rollout.max_new_tokens is past the model's positions are refused
before the model loads, or left out and counted under data.too_long=skip (`fastsd.run.prompt_fit`)."""

from __future__ import annotations

import json
import logging

import pytest
from test_preflight import SMALL, fails, no_model, records, run_dir_with_an_earlier_file  # noqa: F401

from fastsd.config import load_config
from fastsd.feedback.prompts import encode, student_text
from fastsd.run.preflight import tokenizer
from fastsd.run.prompt_fit import fit_positions, model_positions
from fastsd.tasks.data import load_data

LONG = "1+" * 600 + "1"  # 1201 characters: past the shipped model's 1024 positions on its own


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def long_record(question=LONG, **extra) -> str:
    return json.dumps({"question": question, "answer": "601", "reference_solution": "r", **extra})


def test_a_question_too_long_for_the_model_is_an_error_naming_file_and_line(tmp_path, capsys, no_model):  # noqa: F811
    data = write(tmp_path / "q.jsonl", [*records(2), long_record(), "", long_record(), *records(1, 3)])
    err = fails(capsys, run_dir_with_an_earlier_file(tmp_path), f"data={data}")
    assert f"data.path: {data}:3: the student's prompt is " in err
    assert "; with rollout.max_new_tokens=40 that is " in err
    assert "past the model's 1024 positions (max_position_embeddings of model.path)" in err
    assert "1 more questions do not fit either" in err and "data.too_long=skip" in err
    # Held-out questions too, under their own key.
    err = fails(capsys, tmp_path / "fresh", f"data.eval_path={data}")
    assert f"data.eval_path: {data}:3: the student's prompt is" in err
    # A max_new_tokens that leaves no room for any prompt is named as such.
    assert "rollout.max_new_tokens: 1024 leaves no room" in fails(capsys, tmp_path / "fresh", "rollout.max_new_tokens=1024")


def test_skip_leaves_the_long_questions_out_and_counts_them(tmp_path, caplog):
    data = write(tmp_path / "q.jsonl", [*records(2), long_record(), "", long_record(), *records(1, 3)])
    cfg = load_config(overrides=[*SMALL, f"data={data}", f"data.eval_path={data}", "data.too_long=skip"])
    train, held = load_data(cfg)
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        kept_train, kept_held = fit_positions(cfg, tokenizer(cfg), 1024, train, held)
    assert kept_train == kept_held == [ex for ex in train if ex.question != LONG] and len(kept_train) == 3
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("data.too_long=skip: left out 2 of 5 questions of data" in m for m in said)
    assert f"{data}:3, {data}:5" in said[0]  # the lines, the blank one counted
    # Every question too long: an error still, not a run on nothing.
    only_long = write(tmp_path / "long.jsonl", [long_record()])
    cfg = load_config(overrides=[*SMALL, f"data={only_long}", "data.too_long=skip"])
    with pytest.raises(ValueError, match="^data.path: data.too_long=skip, but every one of the 1 questions"):
        fit_positions(cfg, tokenizer(cfg), 1024, *load_data(cfg))


def test_the_limit_is_exact(tmp_path):
    """A prompt of n tokens fits with max_new_tokens = positions - n, and not with one more."""
    data = write(tmp_path / "q.jsonl", [long_record("1+2*3")])
    cfg = load_config(overrides=[*SMALL, f"data={data}", f"data.eval_path={data}"])
    tok = tokenizer(cfg)
    n = len(encode(tok, student_text(cfg.templates, tok, "1+2*3")))
    cfg.rollout.max_new_tokens = 1024 - n
    train, held = load_data(cfg)
    assert fit_positions(cfg, tok, 1024, train, held) == (train, held)
    cfg.rollout.max_new_tokens += 1
    with pytest.raises(ValueError, match=f"the student's prompt is {n} tokens; with rollout.max_new_tokens={1025 - n} that is 1025,"):
        fit_positions(cfg, tok, 1024, train, held)
    assert fit_positions(cfg, tok, None, train, held) == (train, held)  # a model that states no limit


def test_the_teachers_prompt_counts_under_condition_reference(tmp_path):
    data = write(tmp_path / "q.jsonl", [*records(1), long_record("1+2", reference_solution=LONG)])
    for condition, fits in (("reference", False), ("critique", True), ("grpo", True)):
        cfg = load_config(overrides=[*SMALL, f"data={data}", f"condition={condition}"])
        train, held = load_data(cfg)
        if fits:
            assert fit_positions(cfg, tokenizer(cfg), 1024, train, held)[0] == train
        else:
            with pytest.raises(ValueError, match=f"^data.path: {data}:2: the teacher's prompt is"):
                fit_positions(cfg, tokenizer(cfg), 1024, train, held)


def test_the_chat_template_is_counted(standin, tmp_path):
    question = "What is 2 + 3?"
    data = write(tmp_path / "q.jsonl", [long_record(question)])
    cfg = load_config(overrides=[*SMALL, f"model={standin}", f"data={data}", f"data.eval_path={data}"])
    tok = tokenizer(cfg)
    chat = len(encode(tok, student_text(cfg.templates, tok, question)))
    cfg.templates.chat = "off"
    plain = len(encode(tok, student_text(cfg.templates, tok, question)))
    assert plain < chat
    cfg.rollout.max_new_tokens = 1024 - chat + 1  # room for the plain prompt, not the chat one
    train, held = load_data(cfg)
    assert fit_positions(cfg, tok, 1024, train, held) == (train, held)
    cfg.templates.chat = "auto"
    with pytest.raises(ValueError, match=f"the student's prompt is {chat} tokens"):
        fit_positions(cfg, tok, 1024, train, held)


def test_the_positions_come_from_the_model_config(standin):
    from transformers import AutoConfig

    assert model_positions(AutoConfig.from_pretrained(standin)) == 1024
    assert model_positions(object()) is None

