"""Tests for fastsd.evaluation: avg@k, pass@k, maj@k on hand-built cases with known answers."""

import pytest

from fastsd.evaluation import majority_vote, score_samples


def test_known_values():
    answers = [
        ["1", "2", "1", None],  # 2/4 correct, majority "1" -> correct
        ["3", "3", "5", "5"],  # tie 3 vs 5, "3" first -> majority wrong (truth 5), 2/4 correct
        [None, None, None, None],  # nothing parsed -> wrong everywhere
        ["7", " 7 ", "8", "8"],  # stripped: tie 7 vs 8, "7" first -> correct; 2/4 correct
    ]
    m = score_samples(answers, ["1", "5", "4", "7"])
    assert m == {"avg@k": 6 / 16, "pass@k": 3 / 4, "maj@k": 2 / 4, "k": 4, "questions": 4}


def test_tie_goes_to_earliest_first_occurrence():
    assert majority_vote(["b", "a", "a", "b"]) == "b"
    assert majority_vote(["a", "b", "b", "a"]) == "a"
    assert majority_vote([None, "c", "d", None, "d", "c"]) == "c"
    # a strict majority beats first occurrence
    assert majority_vote(["x", "y", "y"]) == "y"
    assert score_samples([["9", "3", "3", "9"]], ["9"])["maj@k"] == 1.0
    assert score_samples([["3", "9", "9", "3"]], ["9"])["maj@k"] == 0.0


def test_none_votes_are_ignored():
    # three None and one right answer: the vote is over the parsed answers only
    assert score_samples([[None, None, "2", None]], ["2"]) == {
        "avg@k": 0.25, "pass@k": 1.0, "maj@k": 1.0, "k": 4, "questions": 1}


def test_all_none():
    assert majority_vote([None, None]) is None
    m = score_samples([[None, None], [None, None]], ["1", "2"])
    assert (m["avg@k"], m["pass@k"], m["maj@k"]) == (0.0, 0.0, 0.0)


def test_k1_all_metrics_equal_accuracy():
    m = score_samples([["1"], ["0"], [None], ["4"]], ["1", "2", "3", "4"])
    assert m == {"avg@k": 0.5, "pass@k": 0.5, "maj@k": 0.5, "k": 1, "questions": 4}


def test_all_correct_and_int_truth():
    m = score_samples([["12", "12"], ["5", "5"]], [12, "5"])
    assert (m["avg@k"], m["pass@k"], m["maj@k"]) == (1.0, 1.0, 1.0)


def test_values_in_unit_interval_and_ordered():
    import random

    rng = random.Random(0)
    for _ in range(50):
        k, n = rng.randint(1, 6), rng.randint(1, 5)
        answers = [[rng.choice(["1", "2", "3", None]) for _ in range(k)] for _ in range(n)]
        m = score_samples(answers, [rng.choice("123") for _ in range(n)])
        assert 0.0 <= m["avg@k"] <= m["pass@k"] <= 1.0
        assert 0.0 <= m["maj@k"] <= m["pass@k"]


@pytest.mark.parametrize(
    "answers, truths, name",
    [
        ([["1"]], ["1", "2"], "truths"),
        ([], [], "answers"),
        ([["1", "2"], ["1"]], ["1", "1"], "answers"),
        ([[]], ["1"], "answers"),
        ([[1]], ["1"], "answers"),
    ],
)
def test_errors_name_the_argument(answers, truths, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        score_samples(answers, truths)
