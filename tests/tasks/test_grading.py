"""Tests for fastsd.tasks.grading: exact and math-verify graders, bounded time, threads, cache."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastsd.tasks.grading import ExactGrader, MathGrader, make_grader

# (answer, truth): the same value written two ways
EQUIVALENT = [
    ("0.75", r"\frac{3}{4}"),  # decimal vs fraction
    ("3/4", r"\frac{3}{4}"),
    (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}"),  # an answer that boxes itself
    (r"\dfrac{3}{4}", r"\frac{3}{4}"),
    (r"\tfrac34", "0.75"),
    (r"\dfrac34", r"\frac{3}{4}"),
    (r"$\frac{1}{2}$", "0.5"),
    (r"50\%", "0.5"),  # percentages
    ("0.5", r"50\%"),
    (r"-\frac{1}{2}", "-0.5"),  # negative numbers
    ("-3.0", "-3"),
    (r"5\text{ cm}", "5"),  # units
    (r"12 \text{ meters}", "12"),
    (r"\left(1, 2\right]", "(1,2]"),  # intervals
    (r"[-1, \infty)", r"[-1,\infty)"),
    (r"\{2, 1\}", r"\{1,2\}"),  # sets: order does not matter
    (r"2\sqrt{2}", r"\sqrt{8}"),  # symbolic
    ("1+x", "x+1"),
    (r"\pi", r"\pi"),
    ("1,000", "1000"),
]

# (answer, truth): different values, or no value at all
DIFFERENT = [
    ("4/3", r"\frac{3}{4}"),
    ("0.7", "0.75"),
    ("3", "-3"),
    ("(1,2)", "[1,2]"),  # open vs closed interval
    ("(1,2]", "(1,2)"),
    (r"\{1,2,3\}", r"\{1,2\}"),
    ("3.14159", r"\pi"),
    ("abc", "12"),
    ("", "12"),
    ("   ", "12"),
    (None, "12"),
    ("x+2", "x+1"),
    (r"\frac{1}{3}", "0.3"),
]


@pytest.fixture(scope="module")
def math_grader():
    g = MathGrader()
    yield g
    g.close()


@pytest.mark.parametrize("answer,truth", EQUIVALENT)
def test_math_equivalent(math_grader, answer, truth):
    assert math_grader.equal(answer, truth)


@pytest.mark.parametrize("answer,truth", DIFFERENT)
def test_math_different(math_grader, answer, truth):
    assert not math_grader.equal(answer, truth)


def test_exact_grader():
    g = ExactGrader()
    assert g.equal(" 52 ", "52") and g.equal("52", 52)
    assert not g.equal("0.75", r"\frac{3}{4}") and not g.equal("052", "52")
    assert not g.equal(None, "52") and not g.equal("", "52")


def test_make_grader_shares_one_per_kind_and_names_the_key():
    assert make_grader("exact") is make_grader("exact")
    assert make_grader("math") is make_grader("math") and make_grader("math").kind == "math"
    with pytest.raises(ValueError, match="^grader: expected one of"):
        make_grader("maths")


def test_results_are_cached(math_grader):
    math_grader.equal("0.125", r"\frac{1}{8}")
    before = dict(math_grader.stats)
    for _ in range(20):
        assert math_grader.equal("0.125", r"\frac{1}{8}")
    assert math_grader.stats["cached"] - before["cached"] == 20
    assert math_grader.stats["starts"] == before["starts"]


def test_pathological_answer_costs_bounded_time_and_counts_as_wrong():
    # 10^(10^10) is beyond any machine: math-verify's own timeout stops it inside the worker.
    g = MathGrader(timeout=5.0)
    try:
        assert g.equal("1", "1.0")  # starts the worker
        t = time.monotonic()
        assert not g.equal(r"10^{10^{10}}", "10")
        assert time.monotonic() - t < 5.0
        assert g.equal("2/4", "0.5")  # the worker lives on
    finally:
        g.close()


def test_a_late_worker_is_killed_and_replaced():
    # With a bound shorter than math-verify's own 1-second timeout the parent's bound acts:
    # the worker is killed, the answer is wrong, and the next call gets a fresh worker.
    g = MathGrader()
    try:
        assert g.equal("1", "1.0")  # started and warm
        g.timeout = 0.3
        t = time.monotonic()
        assert not g.equal(r"10^{10^{10}}", "10")
        assert time.monotonic() - t < 2.0
        assert g.stats["timeouts"] == 1 and g._proc is None
        g.timeout = 10.0  # a cold worker's first answer is slow on a busy machine
        assert g.equal("0.25", r"\frac14")
        assert g.stats["starts"] == 2
    finally:
        g.close()


def test_calls_from_worker_threads(math_grader):
    # math-verify's SIGALRM timeouts fail outside the main thread; the grader works from any thread.
    cases = [(a, t, True) for a, t in EQUIVALENT] + [(a, t, False) for a, t in DIFFERENT]
    fresh = MathGrader()  # nothing cached: every thread really asks the worker
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            got = list(pool.map(lambda c: fresh.equal(c[0], c[1]), cases))
        assert got == [want for _, _, want in cases]
        out = []
        th = threading.Thread(target=lambda: out.append(fresh.equal("1/8", "0.125")))
        th.start()
        th.join()
        assert out == [True]
    finally:
        fresh.close()


def test_a_dead_worker_is_replaced(math_grader):
    assert math_grader.equal("6/8", "0.75")
    math_grader._proc.kill()
    assert math_grader.equal("7/8", "0.875") is False  # the request found the worker dead
    assert math_grader.equal("9/8", "1.125")  # and the next one a fresh worker


# ---------------------------------------------------------------- the http critic's answer check

def test_parse_reply_checks_the_answer_with_the_grader(math_grader):
    from fastsd.feedback.http_critic import parse_reply

    steps = ["$x = 1/2$"]
    reply = "<first_error>none</first_error>\n<step_1>$x = 1/2$</step_1><answer>\\boxed{\\frac{1}{2}}</answer>"
    with pytest.raises(ValueError, match="not the correct answer"):
        parse_reply(reply, steps, "\\frac{1}{2}")  # exact, as before
    c = parse_reply(reply, steps, "\\frac{1}{2}", math_grader)
    assert c.ok and c.first_error is None and c.text.endswith("<answer>\\boxed{\\frac{1}{2}}</answer>")
    with pytest.raises(ValueError, match="not the correct answer"):
        parse_reply(reply, steps, "\\frac{1}{3}", math_grader)


def test_http_critic_grades_the_critique_answer_with_the_configured_grader(tmp_path):
    """A critic that boxes its answer: every critique failed under exact match (the issue), none
    fails when build_critic hands the client grader=math."""
    import sys
    from pathlib import Path

    from fastsd.config import load_config
    from fastsd.model.dist import Dist
    from fastsd.run.build import build_critic
    from fastsd.tasks import make_split
    from fastsd.tasks.format import parse_response

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    from critic_server import CriticServer

    srv = CriticServer().start()
    plain = srv.reply_text
    srv.reply_text = lambda body: plain(body).replace("<answer>", "<answer>\\boxed{").replace("</answer>", "}</answer>")
    try:
        items = [(p.question, p.answer, parse_response(p.solution).steps[:1], None, p.reference_solution)
                 for p in make_split("test", 3, 0)]
        keys = ["condition=critique", "critic=http", f"critic.base_url={srv.url}", "critic.retries=0",
                f"run_dir={tmp_path}"]
        exact = build_critic(load_config(None, keys), Dist())
        assert [c.error for c in exact.critique_batch(items)] == ["invalid reply: the trace ends in "
                                                                  f"'\\\\boxed{{{a}}}', not the correct answer '{a}'"
                                                                  for _, a, *_ in items]
        graded = build_critic(load_config(None, keys + ["grader=math"]), Dist())
        got = graded.critique_batch(items)
        assert all(c.ok for c in got) and graded.stats["ok"] == 3
    finally:
        srv.close()


def test_a_broken_math_verify_is_an_error_at_start_not_all_answers_wrong(tmp_path, monkeypatch):
    from fastsd.tasks import grading

    broken = tmp_path / "worker.py"
    broken.write_text("import math_verify_is_not_here\n")
    monkeypatch.setattr(grading, "_WORKER", broken)
    g = MathGrader(timeout=5.0)
    assert g.equal("1/2", "0.5") is False  # equal() itself never raises
    with pytest.raises(ValueError, match="^grader: math-verify does not work here: .*No module named 'math_verify_is_not_here'"):
        g.check()
    g.close()
