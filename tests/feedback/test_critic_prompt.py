r"""The HTTP critic, configurable: critic.prompt_file, critic.extra_body, the answer check through the
grader, format=free's alignment rule, and tools/critic_server.py --mode math."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fastsd.config import CriticConfig, load_config
from fastsd.feedback.critic_prompt import FREE_INSTRUCTIONS, free_text
from fastsd.feedback.http_critic import SCRIBE_INSTRUCTIONS, HttpCritic, parse_reply
from fastsd.tasks.format import format_steps, parse_response
from fastsd.tasks.grading import make_grader

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from critic_server import CriticServer  # noqa: E402

FREE = "We halve the top and the bottom.\n\nSo 6/8 = 3/5, since 5 > 4.\n\nThe answer is $\\boxed{\\frac{3}{5}}$."
STEPS = parse_response(FREE, "free").steps


@pytest.fixture
def server():
    started = []

    def start(**kw) -> CriticServer:
        started.append(CriticServer(**kw).start())
        return started[-1]

    yield start
    for srv in started:
        srv.close()


def reply(first: str, steps: list[str], answer: str) -> str:
    return f"<first_error>{first}</first_error>\n{format_steps(steps, answer)}"


# ---------------------------------------------------------------- the answer check, format=free

def test_the_answer_check_goes_through_the_grader():
    text = reply("2", [STEPS[0], "So 6/8 = 3/4, since x > 0.", r"\boxed{\frac{3}{4}}"], r"\boxed{\frac{3}{4}}")
    with pytest.raises(ValueError, match="not the correct answer"):
        parse_reply(text, STEPS, r"\frac{3}{4}")  # exact: \boxed{\frac{3}{4}} is not \frac{3}{4}
    crit = parse_reply(text, STEPS, r"\frac{3}{4}", make_grader("math"))
    assert crit.ok and crit.first_error == 1 and crit.verdicts == [True, False, False]
    for wrong in ("0.8", r"\frac{4}{3}"):
        with pytest.raises(ValueError, match="not the correct answer"):
            parse_reply(reply("2", [STEPS[0], "fixed", wrong], wrong), STEPS, r"\frac{3}{4}", make_grader("math"))


def test_free_format_critique_keeps_the_students_paragraphs():
    """The alignment rule of format=free (docs/critic.md): the critic numbers the student's paragraphs;
    the teacher reads the verbatim prefix, then the critic's paragraphs, ending in \\boxed{}."""
    text = reply("2", ["  We halve the top and the bottom. ", "So 6/8 = 3/4."], "0.75")
    crit = parse_reply(text, STEPS, r"\frac{3}{4}", make_grader("math"), fmt="free")
    assert crit.text == ("We halve the top and the bottom.\n\nSo 6/8 = 3/4.\n\n"
                         "The answer is $\\boxed{\\frac{3}{4}}$.")
    assert crit.text.startswith(FREE.split("\n\n")[0] + "\n\n")  # the student's own text, as written
    again = parse_response(crit.text, "free")
    assert again.steps[:2] == ["We halve the top and the bottom.", "So 6/8 = 3/4."] and again.answer == r"\frac{3}{4}"
    assert free_text(["a", r"so $\boxed{2}$"], "2") == "a\n\nso $\\boxed{2}$"  # no second answer
    with pytest.raises(ValueError, match="step 1 is not the student's step 1 copied verbatim"):
        parse_reply(reply("2", ["We halve.", "So 6/8 = 3/4."], "0.75"), STEPS, "0.75", fmt="free")


def test_free_format_critique_ends_in_the_right_boxed_answer():
    """The teacher reads the critique's last \\boxed{} as its answer: a right <answer> tag does not
    excuse a last paragraph that boxes a wrong one, and a boxed guess in the student's copied
    prefix is not the critique's answer (the right one is added after the last paragraph)."""
    steps = ["We have $x + 1 = 3$.", r"So $x = 3$, and the answer is $\boxed{3}$."]
    grader = make_grader("math")
    wrong_box = reply("2", [steps[0], r"So $x = 2$, and the answer is $\boxed{5}$."], "2")
    with pytest.raises(ValueError, match=r"the last step's \\boxed\{\} holds '5', not the correct answer '2'"):
        parse_reply(wrong_box, steps, "2", grader, fmt="free")
    with pytest.raises(ValueError, match=r"never closed"):
        parse_reply(reply("2", [steps[0], r"So $x = 2$: $\boxed{2$"], "2"), steps, "2", grader, fmt="free")
    guess = [r"Guess $\boxed{7}$ first, then check.", "So $x = 3$."]
    crit = parse_reply(reply("2", [guess[0], "So $x = 2$."], "2"), guess, "2", grader, fmt="free")
    assert crit.text == "Guess $\\boxed{7}$ first, then check.\n\nSo $x = 2$.\n\nThe answer is $\\boxed{2}$."
    assert parse_response(crit.text, "free").answer == "2"


# ---------------------------------------------------------------- prompt_file, extra_body

def test_prompt_file_and_extra_body_reach_the_server(server, tmp_path):
    srv = server(mode="math")
    system = tmp_path / "system.txt"
    system.write_text("Be a faithful scribe. Put answers in \\boxed{}.")
    cfg = CriticConfig(kind="http", base_url=srv.url, prompt_file=str(system),
                       extra_body={"top_p": 0.95, "seed": 1, "chat_template_kwargs": {"enable_thinking": True}})
    critic = HttpCritic(cfg, grader=make_grader("math"), fmt="free")
    (crit,) = critic.critique_batch([("Simplify 6/8.", r"\frac{3}{4}", STEPS, r"\frac{3}{5}", "Halve: 3/4.")])
    assert crit.ok, crit.error
    body = srv.last_body
    assert body["top_p"] == 0.95 and body["seed"] == 1 and body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["messages"][0] == {"role": "system", "content": "Be a faithful scribe. Put answers in \\boxed{}."}
    assert "<student_attempt>" in body["messages"][1]["content"]

    whole = tmp_path / "user.txt"  # with fields: the whole request is one user message
    whole.write_text("Check this {{not a field}} \\boxed{}.\n<question>\n{question}\n</question>\n"
                     "<correct_answer>{answer}</correct_answer>\n<student_attempt>\n{attempt}\n</student_attempt>")
    critic = HttpCritic(CriticConfig(kind="http", base_url=srv.url, prompt_file=str(whole)),
                        grader=make_grader("math"), fmt="free")
    (crit,) = critic.critique_batch([("Simplify 6/8.", r"\frac{3}{4}", STEPS, None, None)])
    assert crit.ok, crit.error
    (msg,) = srv.last_body["messages"]
    assert msg["role"] == "user" and msg["content"].startswith("Check this {{not a field}} \\boxed{}.\n<question>\n"
                                                               "Simplify 6/8.\n</question>")
    assert "<step_2>So 6/8 = 3/5, since 5 > 4.</step_2>" in msg["content"]


def test_default_instructions_follow_the_format(server):
    srv = server(mode="math")
    for fmt, text in (("steps", SCRIBE_INSTRUCTIONS), ("free", FREE_INSTRUCTIONS)):
        critic = HttpCritic(CriticConfig(kind="http", base_url=srv.url), fmt=fmt)
        assert critic.request("q", "1", ["a"])["messages"][0]["content"] == text
    assert "paragraph" in FREE_INSTRUCTIONS and "\\boxed{}" in FREE_INSTRUCTIONS


@pytest.mark.parametrize("content,message", [
    (None, "critic.prompt_file: cannot read"),
    ("  \n", "is empty"),
    ("Check {question} and {atempt}", r"unknown field \{atempt\} \(did you mean \{attempt\}"),
    ("Check {question} against {answer}", r"uses fields but not \{attempt\}"),
])
def test_bad_prompt_files_fail_at_config_load(tmp_path, content, message):
    path = tmp_path / "prompt.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_config(overrides=["critic=http", f"critic.prompt_file={path}"])


def test_extra_body_cannot_replace_fastsds_fields():
    with pytest.raises(ValueError, match=r"critic.extra_body: \['messages', 'model'\] are set by fastsd"):
        load_config(overrides=["critic.extra_body={model: x, messages: [], top_p: 0.9}"])
    assert load_config(overrides=["critic.extra_body={top_p: 0.9}"]).critic.extra_body == {"top_p": 0.9}


# ---------------------------------------------------------------- the math-mode server

@pytest.mark.parametrize("first_error,expected", [(2, 1), (0, None), (9, None)])
def test_math_mode_server_critiques_validate(server, first_error, expected):
    srv = server(mode="math", first_error=first_error)
    critic = HttpCritic(CriticConfig(kind="http", base_url=srv.url), grader=make_grader("math"), fmt="free")
    items = [("Simplify 6/8.", r"\frac{3}{4}", STEPS, r"\frac{3}{5}", None), ("Simplify 6/8.", "0.75", [], None, None)]
    crits = critic.critique_batch(items)
    assert all(c.ok for c in crits), [c.error for c in crits]
    assert crits[0].first_error == expected
    assert parse_response(crits[0].text, "free").answer == r"\frac{3}{4}"
    kept = STEPS if expected is None else STEPS[:expected]
    assert crits[0].text.startswith("\n\n".join(kept))
    exact = HttpCritic(CriticConfig(kind="http", base_url=srv.url, retries=0), fmt="free")  # grader=exact
    assert not any(c.ok for c in exact.critique_batch(items[:1]))
