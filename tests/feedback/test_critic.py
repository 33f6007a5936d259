"""Tests for the Critic interface and the exact ArithCritic."""

import random

import pytest

from fastsd.feedback.critic import ArithCritic, Critic, Critique, correct_step, step_matches
from fastsd.tasks import arith, make_split
from fastsd.tasks.format import format_steps, parse_response

Q, GT = "12+7*3-5", "52"
CANON = ["12+7=19", "19*3=57", "57-5=52"]
FULL = format_steps(CANON, GT)


@pytest.fixture(scope="module")
def critic():
    return ArithCritic()


def critique_text(critic, text, question=Q, truth=GT):
    parsed = parse_response(text)
    return critic.critique(question, truth, parsed.steps, parsed.answer)


def test_fully_correct_attempt_is_copied_verbatim(critic):
    c = critique_text(critic, FULL)
    assert (c.text, c.verdicts, c.first_error, c.ok) == (FULL, [True] * 3, None, True)


def test_correct_attempt_in_other_notation_is_copied_verbatim(critic):
    text = format_steps(["7 + 12 = 19", "3*19=57", "057 - 5=52"], "52")
    c = critique_text(critic, text)
    assert (c.text, c.verdicts, c.first_error) == (text, [True] * 3, None)


def test_error_in_step_2(critic):
    c = critique_text(critic, format_steps(["12+7=19", "19*3=58", "58-5=53"], "53"))
    assert c.text == FULL
    assert (c.verdicts, c.first_error) == ([True, False, False], 1)


def test_error_in_step_2_keeps_student_notation(critic):
    attempt = format_steps(["7 + 12 = 19", "3 * 19 = 67", "67 - 5 = 62"], "62")
    c = critique_text(critic, attempt)
    assert c.text == format_steps(["7 + 12 = 19", "3 * 19 = 57", "57 - 5 = 52"], "52")
    assert (c.verdicts, c.first_error) == ([True, False, False], 1)


def test_error_in_step_1(critic):
    c = critique_text(critic, format_steps(["12+7=20", "20*3=60", "60-5=55"], "55"))
    assert c.text == FULL and (c.verdicts, c.first_error) == ([False, False, False], 0)


def test_wrong_operation_is_replaced(critic):
    c = critique_text(critic, format_steps(["12+7=19", "19+3=22", "22-5=17"], "17"))
    assert c.text == FULL and (c.verdicts, c.first_error) == ([True, False, False], 1)


def test_later_step_using_correct_values_is_judged_correct(critic):
    # Step 2 is wrong but step 3 uses the correct previous result: judged against canon.
    c = critique_text(critic, format_steps(["12+7=19", "19*3=56", "57-5=52"], "52"))
    assert (c.verdicts, c.first_error, c.text) == ([True, False, True], 1, FULL)


def test_only_final_answer_wrong(critic):
    c = critique_text(critic, format_steps(CANON, "51"))
    assert (c.text, c.verdicts, c.first_error) == (FULL, [True] * 3, None)


def test_truncated_attempt_is_finished(critic):
    truncated = FULL[: FULL.index("57</step_2>")]  # "...<step_2>19*3="
    c = critique_text(critic, truncated)
    assert c.text == FULL and c.text.startswith(truncated)
    assert (c.verdicts, c.first_error) == ([True, False], 1)


def test_missing_steps_are_filled_in(critic):
    c = critique_text(critic, format_steps(CANON[:1], "52"))
    assert (c.text, c.verdicts, c.first_error) == (FULL, [True], None)


def test_extra_steps_are_dropped(critic):
    c = critique_text(critic, format_steps(CANON + ["52+0=52"], "52"))
    assert (c.text, c.verdicts, c.first_error) == (FULL, [True, True, True, False], 3)


@pytest.mark.parametrize("text", ["", "garbage", "<answer>52</answer>", "<step_1>hmm</step_1>"])
def test_garbage_attempt_gets_full_correct_trace(critic, text):
    c = critique_text(critic, text)
    assert c.text == FULL and c.ok
    assert c.first_error == (0 if parse_response(text).steps else None)


def test_ground_truth_may_be_a_solution_trace(critic):
    assert critic.critique(Q, FULL, CANON).text == FULL


def test_bad_arguments_raise_value_error(critic):
    with pytest.raises(ValueError, match="ground_truth"):
        critic.critique(Q, "53", CANON)
    with pytest.raises(ValueError, match="steps"):
        critic.critique(Q, GT, "12+7=19")
    with pytest.raises(ValueError, match="question"):
        critic.critique("twelve", GT, CANON)
    with pytest.raises(ValueError, match="items"):
        critic.critique_batch([(Q, GT)])


def test_critique_batch_loops(critic):
    items = [(Q, GT, CANON), (Q, GT, ["12+7=18"], "51")]
    assert critic.critique_batch(items) == [critic.critique(*item) for item in items]


def test_critic_is_an_interface():
    with pytest.raises(TypeError):
        Critic()

    class Echo(Critic):
        def critique(self, question, ground_truth, steps, answer=None):
            return Critique(format_steps(steps, ground_truth), [True] * len(steps))

    assert Echo().critique_batch([("1+1+1", "3", ["x"])])[0].text == "<step_1>x</step_1><answer>3</answer>"


def test_step_matches_and_correct_step():
    target = arith.Step(19, "*", 3, 57)
    assert step_matches("19*3=57", target) and step_matches(" 3 * 19 = 057", target)
    assert not step_matches("19*3=58", target) and not step_matches("19+3=57", target)
    assert not step_matches("5-57=52", arith.Step(57, "-", 5, 52))  # "-" does not commute
    gaps = ("", "", "", "")
    assert correct_step("3 *20 =60", target, gaps) == "3 *19 =57"
    assert correct_step("19 + 3 = 22", target, gaps) == "19 * 3 = 57"
    assert correct_step("19*", target, (" ", " ", " ", " ")) == "19 * 3 = 57"


def _corrupt(step: arith.Step, rng: random.Random) -> str:
    """A wrong version of `step`: bad result, bad operand, bad operator, garbage or a cut."""
    kind = rng.choice(["result", "left", "right", "op", "garbage", "cut"])
    left, op, right, result = step.left, step.op, step.right, step.result
    if kind == "result":
        result += rng.choice([-3, -2, -1, 1, 2, 3, 10])
    elif kind == "left":
        left += rng.randint(1, 5)
    elif kind == "right":
        right += rng.randint(1, 5)
    elif kind == "op":
        op = rng.choice([o for o in "+-*" if o != op])
    elif kind == "garbage":
        return "".join(rng.choice("abcxyz ") for _ in range(rng.randint(1, 6)))
    else:
        return step.render()[: rng.randint(0, len(step.render()) - 1)]
    return f"{left}{op}{right}={abs(result)}" if result < 0 else f"{left}{op}{right}={result}"


def test_property_random_corruptions(critic):
    rng = random.Random(0)
    for problem in make_split("train", 300, seed=1):
        canon = arith.solve(problem.question)
        steps = [s.render() for s in canon]
        k = rng.randrange(len(steps))
        steps[k] = _corrupt(canon[k], rng)
        if rng.random() < 0.3:
            steps = steps[: k + 1]  # the student stops after its mistake
        student = format_steps(steps, rng.choice([problem.answer, "0", "7"]))
        parsed = parse_response(student)
        c = critic.critique(problem.question, problem.answer, parsed.steps, parsed.answer)
        prefix = format_steps(parsed.steps[:k]) + f"<step_{k + 1}>"
        assert c.text.startswith(prefix), (student, c.text)
        assert c.first_error == k and c.verdicts[: k + 1] == [True] * k + [False]
        out = parse_response(c.text)
        assert out.well_formed and out.answer == problem.answer
        assert arith.verify_trace(problem.question, c.text, problem.answer)
        assert all(step_matches(s, t) for s, t in zip(out.steps, canon, strict=True))


def test_property_truncated_rollouts_are_extended(critic):
    for problem in make_split("test", 60, seed=2):
        for cut in range(0, len(problem.solution) - len("</answer>")):
            student = problem.solution[:cut]
            c = critique_text(critic, student, problem.question, problem.answer)
            # A cut inside the answer tag leaves steps that are all correct: a verbatim extension.
            assert c.text == problem.solution, (student, c.text)
