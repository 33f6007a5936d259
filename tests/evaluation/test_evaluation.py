"""Tests for fastsd.evaluation.metrics: avg@k, pass@k, maj@k on hand-built cases with known answers."""

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


# ---------------------------------------------------------------- under the math grader


@pytest.fixture(scope="module")
def math_grader():
    from fastsd.tasks.grading import make_grader

    return make_grader("math")


def test_maj_votes_over_equivalence_classes(math_grader):
    row = ["0.75", "3/4", "\\frac{3}{4}"]
    assert score_samples([row], ["\\frac{3}{4}"]) == {"avg@k": 1 / 3, "pass@k": 1.0, "maj@k": 0.0, "k": 3,
                                                       "questions": 1}  # exact: three different strings
    assert score_samples([row], ["\\frac{3}{4}"], math_grader) == {"avg@k": 1.0, "pass@k": 1.0, "maj@k": 1.0, "k": 3,
                                                                    "questions": 1}
    # two spellings of a wrong answer outvote one right answer only once they are one class
    row = ["0.5", "1/2", "\\frac{3}{4}"]
    assert score_samples([row], ["0.75"])["maj@k"] == 0.0  # exact: a three-way tie, "0.5" first
    assert score_samples([row], ["0.75"], math_grader)["maj@k"] == 0.0
    assert majority_vote(row, math_grader) == "0.5"
    row = ["\\frac{3}{4}", "0.5", "1/2", "0.75", "3/4"]  # classes: {3/4: 3}, {1/2: 2}
    assert majority_vote(row, math_grader) == "\\frac{3}{4}"
    assert majority_vote(["7", "x", "0.5", "1/2", "7.0"], math_grader) == "7"  # a tie: first class wins


def test_maj_is_deterministic_and_ignores_none(math_grader):
    row = [None, "2/4", None, "\\frac{1}{2}", "0.2", "1/5"]
    assert {majority_vote(row, math_grader) for _ in range(5)} == {"2/4"}
    assert score_samples([row, [None] * 6], ["0.5", "1"], math_grader) == {
        "avg@k": 2 / 12, "pass@k": 0.5, "maj@k": 0.5, "k": 6, "questions": 2}


def test_evaluate_parses_and_grades_as_configured(monkeypatch):
    """evaluate() -> rollout() parses with cfg.format and grades with cfg.grader."""
    import fastsd.rollout.rollouts
    from fastsd.config import load_config
    from fastsd.evaluation import evaluate
    from fastsd.model.dist import Dist
    from fastsd.tasks.data import Example

    texts = ["So $\\boxed{0.75}$.", "First.\n\nThen \\boxed{\\dfrac{3}{4}}", "\\boxed{4/3}",  # question 1
             "\\boxed{-2}", "It is\n\\boxed{-2.0}", "\\boxed{2"]  # question 2 (the last one cut off)

    class Tok:
        eos_token_id = pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1]}

        def decode(self, ids, skip_special_tokens=True):
            return texts[ids[0]]

    monkeypatch.setattr(fastsd.rollout.rollouts, "sample", lambda policy, prompts, **kw: [[i] for i in range(len(prompts))])
    held = [Example("q1", "\\frac{3}{4}"), Example("q2", "-2")]
    cfg = load_config(None, ["format=free", "grader=math", "eval.k=3"])
    assert evaluate(cfg, Dist(), None, Tok(), held) == {
        "avg@k": 4 / 6, "pass@k": 1.0, "maj@k": 1.0, "k": 3, "questions": 2}
    cfg = load_config(None, ["format=free", "eval.k=3"])  # exact: only "-2" matches
    assert evaluate(cfg, Dist(), None, Tok(), held)["avg@k"] == 1 / 6
    cfg = load_config(None, ["grader=math", "eval.k=3"])  # steps: no tags, no answers
    assert evaluate(cfg, Dist(), None, Tok(), held)["pass@k"] == 0.0


def test_evaluate_samples_in_batches_of_eval_batch_size(monkeypatch):
    """eval.batch_size reaches the sampler (0: the sampler's choice, `fitting_batch`)."""
    import fastsd.rollout.rollouts
    from fastsd.config import load_config
    from fastsd.evaluation import evaluate
    from fastsd.model.dist import Dist
    from fastsd.tasks.data import Example

    class Tok:
        eos_token_id = pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1]}

        def decode(self, ids, skip_special_tokens=True):
            return "<answer>1</answer>"

    asked = []

    def sample(policy, prompts, batch_size, **kw):
        asked.append(batch_size)
        return [[0] for _ in prompts]

    monkeypatch.setattr(fastsd.rollout.rollouts, "sample", sample)
    held = [Example("q1", "1"), Example("q2", "2")]
    for overrides in ([], ["eval.batch_size=3"]):
        evaluate(load_config(None, overrides), Dist(), None, Tok(), held)
    assert asked == [0, 3]


def test_exact_maj_is_the_string_vote():
    """Under exact match maj@k is the plain string vote: the built-in task's figures do not move."""
    import random

    rng = random.Random(2)
    for _ in range(300):
        k = rng.randint(1, 7)
        row = [rng.choice(["1", " 1", "2", "3", None]) for _ in range(k)]
        truth = rng.choice("123")
        assert score_samples([row], [truth])["maj@k"] == float(majority_vote(row) == truth), (row, truth)


def test_grading_calls_stay_near_k_per_question():
    from fastsd.tasks.grading import ExactGrader

    class Counting(ExactGrader):
        calls = 0

        def equal(self, answer, truth):
            Counting.calls += 1
            return super().equal(answer, truth)

    g = Counting()
    score_samples([[str(i) for i in range(12)]], ["99"], g)  # all wrong: nothing to vote on
    assert Counting.calls == 12
    Counting.calls = 0
    score_samples([["5"] * 7 + [str(i) for i in range(5)]], ["5"], g)  # 7 right: 5 wrong cannot outvote
    assert Counting.calls == 12
