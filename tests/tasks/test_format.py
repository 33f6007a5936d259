"""Tests for the step-tagged format: rendering, tolerant parsing, reward."""

import pytest

from fastsd.tasks.format import Parsed, format_steps, parse_response, reward

GOOD = "<step_1>12+7=19</step_1><step_2>19*3=57</step_2><step_3>57-5=52</step_3><answer>52</answer>"


def test_format_steps_renders_compact_trace():
    assert format_steps(["12+7=19", "19*3=57", "57-5=52"], 52) == GOOD
    assert format_steps(["1+1=2"]) == "<step_1>1+1=2</step_1>"
    assert format_steps([], "3") == "<answer>3</answer>"


@pytest.mark.parametrize("steps", ["1+1=2", [1], ["<step_2>x"], ["a</answer>"]])
def test_format_steps_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        format_steps(steps, "2")


def test_round_trip():
    p = parse_response(GOOD)
    assert p == Parsed(["12+7=19", "19*3=57", "57-5=52"], "52", well_formed=True, truncated=False)
    assert format_steps(p.steps, p.answer) == GOOD


def test_whitespace_between_tags_is_allowed_and_contents_kept_verbatim():
    p = parse_response(" <step_1> 1 + 1 = 2 </step_1>\n<answer> 2 </answer>\n")
    assert p.well_formed and p.steps == [" 1 + 1 = 2 "] and p.answer == "2"


# (text, steps, answer, truncated)
MALFORMED = [
    ("", [], None, False),
    ("garbage 12+7=19", [], None, False),
    ("<<<>>></step_1></answer>", [], None, False),
    ("<answer>52</answer>", [], "52", False),  # no steps
    ("<step_1>12+7=19</step_1>", ["12+7=19"], None, False),  # no answer
    ("<step_1>12+7=19</step_1><step_2>19*3=5", ["12+7=19", "19*3=5"], None, True),  # cut mid-step
    ("<step_1>12+7=19</step_1><step_2>19*3=57</st", ["12+7=19", "19*3=57"], None, True),  # cut in tag
    ("<step_1>12+7=19</step_1><step_2>", ["12+7=19"], None, True),  # cut after an opening tag
    ("<step_1>12+7=19</step_1><answer>5", ["12+7=19"], None, True),  # cut answer earns nothing
    ("<step_1>12+7=19<step_2>19*3=57</step_2><answer>57</answer>", ["12+7=19", "19*3=57"], "57", False),
    ("<step_1>1+1=2</step_1><answer>2</answer><answer>3</answer>", ["1+1=2"], "2", False),  # duplicate
    ("<step_1>1+1=2</step_1><answer>2</answer><step_2>2+1=3</step_2>", ["1+1=2"], "2", False),
    ("<step_2>1+1=2</step_2><answer>2</answer>", ["1+1=2"], "2", False),  # misnumbered
    ("<step_1>1+1=2</step_2><answer>2</answer>", ["1+1=2"], "2", False),  # mismatched close
    ("<step_1>1+1=2</answer>", ["1+1=2"], None, False),  # step closed by an answer tag
    ("<step_1>1+1=2</step_1><answer>2</step_1></answer>", ["1+1=2"], "2</step_1>", False),
    ("Sure! <step_1>1+1=2</step_1><answer>2</answer>", ["1+1=2"], "2", False),  # preamble
    ("<step_1>1+1=2</step_1>x<answer>2</answer>", ["1+1=2"], "2", False),  # junk between tags
]


@pytest.mark.parametrize("text,steps,answer,truncated", MALFORMED)
def test_malformed_inputs_parse_sanely(text, steps, answer, truncated):
    p = parse_response(text)
    assert (p.steps, p.answer, p.well_formed, p.truncated) == (steps, answer, False, truncated)


def test_parser_never_raises_on_any_prefix_or_noise():
    import random

    rng = random.Random(0)
    tags = ["<step_1>", "</step_1>", "<step_2>", "</step_2>", "<answer>", "</answer>"]
    pieces = tags + ["<", ">", "1+1=2", "x", " "]
    texts = [GOOD[:i] for i in range(len(GOOD) + 1)]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(500)]
    for text in texts:
        p = parse_response(text)
        assert isinstance(p.steps, list) and all(isinstance(s, str) for s in p.steps)
        assert p.answer is None or isinstance(p.answer, str)
    for i in range(len(GOOD)):  # every strict prefix is ill-formed and earns nothing
        assert not parse_response(GOOD[:i]).well_formed and reward(GOOD[:i], "52") == 0.0


def test_non_string_input_parses_as_empty():
    assert parse_response(None) == Parsed()


def test_reward():
    assert reward(GOOD, "52") == 1.0
    assert reward(GOOD, 52) == 1.0
    assert reward(parse_response(GOOD), " 52 ") == 1.0
    assert reward("<step_1>x</step_1><answer> 52 </answer>", "52") == 1.0
    assert reward(GOOD, "53") == 0.0
    assert reward(GOOD.replace("<answer>52</answer>", ""), "52") == 0.0
    assert reward("", "52") == 0.0
    assert reward("<answer>052</answer>", "52") == 0.0  # exact match, not numeric
    assert reward("<answer>52</answer><answer>0</answer>", "52") == 1.0  # the first answer counts


def test_reward_validates_arguments():
    with pytest.raises(ValueError, match="parsed_or_text"):
        reward(None, "52")
    with pytest.raises(ValueError, match="ground_truth_answer"):
        reward(GOOD, None)


# ---------------------------------------------------------------- "<" and ">" inside steps


def test_steps_may_contain_angle_brackets():
    text = "<step_1>since x > 0 and y < 3, x<y+3</step_1><step_2>so a<b</step_2><answer>x > 0</answer>"
    p = parse_response(text)
    assert p == Parsed(["since x > 0 and y < 3, x<y+3", "so a<b"], "x > 0", well_formed=True, truncated=False)
    assert format_steps(p.steps, p.answer) == text


def test_truncated_step_keeps_a_comparison_but_cuts_a_partial_tag():
    p = parse_response("<step_1>x > 0</step_1><step_2>x+1 > 1</step_")
    assert p.steps == ["x > 0", "x+1 > 1"] and p.truncated and p.answer is None
    p = parse_response("<step_1>1 < 2 <")  # a lone "<" at the end may be a tag's start: cut
    assert p.steps == ["1 < 2 "] and p.truncated


# ---------------------------------------------------------------- format=free

FREE = (
    "We need $\\frac{6}{8}$ in lowest terms.\n\n"
    "Since $\\gcd(6, 8) = 2 > 1$, divide both by 2.\n\n"
    "So the answer is $\\boxed{\\frac{3}{4}}$."
)


def test_free_answer_is_last_boxed_and_steps_are_paragraphs():
    p = parse_response(FREE, "free")
    assert p.answer == "\\frac{3}{4}" and p.well_formed and not p.truncated
    assert p.steps == ["We need $\\frac{6}{8}$ in lowest terms.", "Since $\\gcd(6, 8) = 2 > 1$, divide both by 2.",
                       "So the answer is $\\boxed{\\frac{3}{4}}$."]


# (text, answer, steps, truncated)
FREE_CASES = [
    ("", None, [], False),
    ("no answer here", None, ["no answer here"], False),
    ("\\boxed{1} then \\boxed{2}", "2", ["\\boxed{1} then \\boxed{2}"], False),  # the last one
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}", None, False),  # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}", None, False),  # escaped braces do not count
    ("\\boxed {7}", "7", None, False),
    ("\\boxed{\\boxed{5}}", "5", None, False),
    ("a \\boxed{3} b \\boxed{\\frac{1", None, None, True),  # cut off inside the answer
    ("\\boxed{2}\n\n\\boxed{", None, None, True),
    ("\\boxed{}", "", None, False),
    ("line one\nline two\n\\boxed{4}", "4", ["line one", "line two", "\\boxed{4}"], False),  # lines
    ("a\nb\n\n c \n\n\n", None, ["a\nb", "c"], False),  # paragraphs keep their inner lines
    ("p1\r\n\r\np2 \\boxed{9}\r\n", "9", ["p1", "p2 \\boxed{9}"], False),
    ("<step_1>1+1=2</step_1><answer>2</answer>", None, None, False),  # tags mean nothing here
]


@pytest.mark.parametrize("text,answer,steps,truncated", FREE_CASES)
def test_free_cases(text, answer, steps, truncated):
    p = parse_response(text, "free")
    assert (p.answer, p.truncated) == (answer, truncated)
    if steps is not None:
        assert p.steps == steps
    assert p.well_formed == (bool(p.steps) and answer is not None and not truncated)


def test_free_parser_never_raises():
    import random

    rng = random.Random(1)
    pieces = ["\\boxed{", "{", "}", "\\", "\\{", "\n", "\n\n", "x", " ", "<answer>", "3"]
    texts = [FREE[:i] for i in range(len(FREE) + 1)]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 15))) for _ in range(1000)]
    for text in texts:
        p = parse_response(text, "free")
        assert all(isinstance(s, str) and s for s in p.steps)
        assert p.answer is None or isinstance(p.answer, str)
    assert parse_response(None, "free") == Parsed()


def test_unknown_format_names_the_key():
    with pytest.raises(ValueError, match="^format: expected one of"):
        parse_response("x", "tags")


def test_reward_under_a_grader():
    from fastsd.tasks.grading import make_grader

    exact, math = make_grader("exact"), make_grader("math")
    free = parse_response(FREE, "free")
    assert reward(free, "\\frac{3}{4}") == 1.0  # no grader: exact
    assert reward(free, "0.75") == 0.0 and reward(free, "0.75", exact) == 0.0
    assert reward(free, "0.75", math) == 1.0 and reward(free, "3/4", math) == 1.0
    assert reward(free, "0.7", math) == 0.0
    assert reward("<step_1>x</step_1><answer>\\dfrac{3}{4}</answer>", "0.75", math) == 1.0
    assert reward(parse_response("\\boxed{3", "free"), "3", math) == 0.0  # cut off: nothing


def test_free_parse_is_linear_in_nested_boxes():
    """A degenerate rollout of thousands of nested \\boxed{ (one token each, 2048 new tokens) is
    parsed in one pass over its braces: it took seconds when each \\boxed{ scanned to its close."""
    import time

    text = "\\boxed{" * 4000 + "7" + "}" * 4000
    t = time.perf_counter()
    parsed = parse_response(text, "free")
    assert time.perf_counter() - t < 1.0
    assert parsed.answer == "7" and not parsed.truncated
    assert parse_response("\\boxed{" * 4000 + "}" * 3999, "free").truncated  # one left open
