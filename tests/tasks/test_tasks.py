"""Tests for the built-in arithmetic tasks (fastsd.tasks.arith, fastsd.tasks.splits)."""

import json
import random
import statistics

import pytest

from fastsd.tasks import TASKS, arith, make_records, make_split, read_jsonl, splits, write_jsonl
from fastsd.tasks.format import parse_response


def _draw(task):
    return make_split("train", 400, seed=3, task=task) + make_split("test", 100, seed=3, task=task)


@pytest.fixture(scope="module", params=sorted(TASKS))
def problems(request):
    return _draw(request.param)


@pytest.fixture(scope="module")
def long_problems():
    return _draw("long")


@pytest.fixture(scope="module")
def short_problems():
    return _draw("short")


def test_long_is_the_default_task():
    assert make_split("train", 5, seed=1) == make_split("train", 5, seed=1, task="long")
    assert make_split("train", 5, seed=1) != make_split("train", 5, seed=1, task="short")


def test_same_seed_same_problems():
    assert make_split("train", 50, seed=7) == make_split("train", 50, seed=7)
    assert make_split("test", 20, seed=7) == make_split("test", 20, seed=7)


def test_different_seed_different_problems():
    a = {p.question for p in make_split("train", 50, seed=0)}
    b = {p.question for p in make_split("train", 50, seed=1)}
    assert a != b


def test_split_is_stable_under_size():
    assert make_split("train", 10, seed=2) == make_split("train", 30, seed=2)[:10]


def test_splits_disjoint_for_every_seed():
    train = {p.question for s in range(3) for p in make_split("train", 300, seed=s)}
    test = {p.question for s in range(3) for p in make_split("test", 100, seed=s)}
    assert len(test) > 100 and not train & test


def test_questions_distinct_within_split():
    qs = [p.question for p in make_split("train", 300, seed=0)]
    assert len(set(qs)) == len(qs)


@pytest.mark.parametrize("task, lo, hi, longest", [("short", 3, 5, 16), ("long", 9, 12, 40)])
def test_question_shape_and_ranges(task, lo, hi, longest):
    counts = set()
    for p in _draw(task):
        operands, ops = arith.parse_question(p.question)
        assert lo <= len(operands) <= hi and len(ops) == len(operands) - 1
        counts.add(len(operands))
        for step in arith.solve(p.question):
            assert 0 <= step.result <= arith.MAX_VALUE
        assert len(p.question) <= longest
    assert counts == set(range(lo, hi + 1))


def test_left_to_right_semantics():
    steps = arith.solve("12+7*3-5")
    assert [s.render() for s in steps] == ["12+7=19", "19*3=57", "57-5=52"]
    assert arith.canonical_solution("12+7*3-5") == (
        "<step_1>12+7=19</step_1><step_2>19*3=57</step_2><step_3>57-5=52</step_3><answer>52</answer>"
    )


def test_solution_and_reference_derive_the_answer(problems):
    for p in problems:
        assert p.answer == str(arith.solve(p.question)[-1].result)
        assert arith.verify_trace(p.question, p.solution, p.answer), p
        assert arith.verify_trace(p.question, p.reference_solution, p.answer), p
        assert parse_response(p.solution).well_formed
        assert parse_response(p.reference_solution).well_formed


def test_reference_differs_from_solution(problems):
    for p in problems:
        assert p.reference_solution != p.solution
        ref, sol = parse_response(p.reference_solution), parse_response(p.solution)
        assert not set(ref.steps) & set(sol.steps)  # no step is worded the same


def test_short_reference_regroups_some_problems(short_problems):
    def n_steps(text):
        return len(parse_response(text).steps)

    longer = [p for p in short_problems if n_steps(p.reference_solution) > n_steps(p.solution)]
    assert len(longer) > len(short_problems) // 10


def test_long_reference_takes_two_operations_per_step(long_problems):
    for p in long_problems:
        canon = arith.solve(p.question)
        ref = parse_response(p.reference_solution)
        assert len(ref.steps) == (len(canon) + 1) // 2
        # Only every other intermediate result is written (and the last).
        written = [arith.parse_chain(s)[2] for s in ref.steps]
        assert written == [s.result for s in canon[1::2]] + ([canon[-1].result] if len(canon) % 2 else [])
        assert all(len(arith.parse_chain(s)[1]) == 2 for s in ref.steps[:-1])


def test_long_reference_example():
    assert arith.reference_solution("12+7*3-5+9") == (
        "<step_1>12 + 7 * 3 = 57</step_1><step_2>57 - 5 + 9 = 61</step_2><answer>61</answer>"
    )
    assert arith.reference_solution("12+7*3") == (
        "<step_1>12 + 7 * 3 = 57</step_1><answer>57</answer>"
    )
    assert arith.reference_solution("12+7+3") != arith.reference_solution("12+7+3", style="regrouped")
    with pytest.raises(ValueError, match="^style:"):
        arith.reference_solution("12+7", style="shuffled")


def test_reference_example():
    assert arith.reference_solution("12+7*3-5", style="regrouped") == (
        "<step_1>12 * 3 = 36</step_1><step_2>7 * 3 = 21</step_2><step_3>36 + 21 = 57</step_3>"
        "<step_4>57 - 5 = 52</step_4><answer>52</answer>"
    )
    assert arith.reference_solution("20-3-5+2", style="regrouped") == (
        "<step_1>3 + 5 = 8</step_1><step_2>20 - 8 = 12</step_2><step_3>2 + 12 = 14</step_3>"
        "<answer>14</answer>"
    )


@pytest.mark.parametrize("task, longest", [("short", 120), ("long", 320)])
def test_trace_length_and_alphabet(task, longest):
    for p in _draw(task):
        assert len(p.solution) <= longest
        text = p.question + p.solution + p.reference_solution + p.answer
        assert set(text) <= set(arith.ALPHABET)


def test_long_traces_are_several_times_the_short_ones(long_problems, short_problems):
    long_mean = statistics.mean(len(p.solution) for p in long_problems)
    short_mean = statistics.mean(len(p.solution) for p in short_problems)
    assert short_mean < 100 and long_mean > 2.5 * short_mean, (short_mean, long_mean)


def test_parse_chain():
    assert arith.parse_chain("12 + 7 * 3 = 57") == ([12, 7, 3], ["+", "*"], 57)
    assert arith.parse_chain("12+7=19") == ([12, 7], ["+"], 19)
    assert arith.parse_chain(" 5 - 3= 2 ") == ([5, 3], ["-"], 2)
    for bad in ("12 = 12", "12 + = 3", "a+b=c", "1+2", 7):
        assert arith.parse_chain(bad) is None, bad


def test_verify_trace_rejects_wrong_traces():
    q = "12+7*3-5"
    wrong = "<step_1>12+7=19</step_1><step_2>19*3=58</step_2><answer>58</answer>"
    assert not arith.verify_trace(q, wrong, "52")
    assert not arith.verify_trace(q, "<step_1>50+2=52</step_1><answer>52</answer>", "52")  # 50 not available
    assert not arith.verify_trace(q, "<step_1>12+7=19</step_1><answer>52</answer>", "52")  # last result 19
    assert not arith.verify_trace(q, "", "52")
    assert arith.verify_trace(q, "<step_1>12 + 7 * 3 - 5 = 52</step_1><answer>52</answer>", "52")
    assert not arith.verify_trace(q, "<step_1>12 + 7 * 3 - 5 = 53</step_1><answer>53</answer>", "53")
    assert not arith.verify_trace(q, "<step_1>12 + 8 * 3 = 60</step_1><answer>60</answer>", "60")  # 8 not available


def test_records_and_jsonl_round_trip(tmp_path):
    records = make_records("test", 12, seed=5)
    assert set(records[0]) == {"question", "answer", "solution", "reference_solution"}
    path = tmp_path / "test.jsonl"
    write_jsonl(path, records)
    assert len(path.read_text().splitlines()) == 12
    assert read_jsonl(path) == records


def test_read_jsonl_names_missing_key(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "1+2+3", "answer": "6"}) + "\n")
    with pytest.raises(ValueError, match="reference_solution"):
        read_jsonl(path)


@pytest.mark.parametrize("bad", ["", "12", "12+", "a+b", "1/2+3", 12])
def test_parse_question_rejects_non_questions(bad):
    with pytest.raises(ValueError, match="question"):
        arith.parse_question(bad)


def test_make_split_validates_arguments():
    with pytest.raises(ValueError, match="split"):
        make_split("dev", 3)
    with pytest.raises(ValueError, match="n:"):
        make_split("train", -1)
    with pytest.raises(ValueError, match="^task: .*'long'"):
        make_split("train", 3, task="medium")


def test_make_problem_uses_only_the_rng():
    a = splits.make_problem(random.Random(11))
    b = splits.make_problem(random.Random(11))
    assert a == b and a.to_dict()["question"] == a.question
