"""Tests for fastsd.tasks.data: jsonl loading (and its errors) and the built-in split."""

import json

import pytest

from fastsd.tasks import arith, make_records, write_jsonl
from fastsd.tasks.data import Example, builtin_split, load_examples, load_jsonl, load_parquet
from fastsd.tasks.format import reward


def write(tmp_path, lines: list[str], name="q.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_jsonl(tmp_path):
    path = write(tmp_path, [
        json.dumps({"question": "1+2", "answer": "3", "reference_solution": "r1", "solution": "x", "id": 7}),
        "",
        "   ",
        json.dumps({"question": "q2", "answer": 52, "reference_solution": "r2"}),
        json.dumps({"question": "q3", "answer": 4.0, "reference_solution": "r3"}),
        json.dumps({"question": "q4", "answer": 0.5, "reference_solution": "r4"}),
    ])
    assert load_jsonl(path) == [
        Example("1+2", "3", "r1"), Example("q2", "52", "r2"), Example("q3", "4", "r3"), Example("q4", "0.5", "r4")]
    assert load_jsonl(str(path))[1].answer == "52"


def test_empty_file_gives_no_examples(tmp_path):
    assert load_jsonl(write(tmp_path, ["", " "])) == []


def test_reads_task_records(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, make_records("train", 5, seed=1))
    assert load_jsonl(path) == builtin_split("train", 5, 1)


GOOD = {"question": "q", "answer": "1", "reference_solution": "r"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "invalid JSON"),
        ('{"question": "q"', "invalid JSON"),
        ('{"question": "2+2", "answer": 4,', "at column 33)"),  # the end of the line, not column 1
        ("[1, 2]", "expected a JSON object, got list"),
        ('"text"', "expected a JSON object, got str"),
        (json.dumps({"answer": "1", "reference_solution": "r"}), "missing key 'question' (data.fields.question)"),
        (json.dumps({"question": "q", "reference_solution": "r"}), "missing key 'answer'"),
        (json.dumps({"question": "q", "answer": "1"}), "missing key 'reference_solution'"),
        (json.dumps({**GOOD, "question": ""}), "'question' is empty"),
        (json.dumps({**GOOD, "answer": "  "}), "'answer' is empty (data.fields.answer)"),
        (json.dumps({**GOOD, "reference_solution": ""}), "'reference_solution' is empty"),
        (json.dumps({**GOOD, "question": 3}), "'question' must be a string, got int"),
        (json.dumps({**GOOD, "answer": None}), "'answer' must be a string or a number, got NoneType"),
        (json.dumps({**GOOD, "answer": True}), "'answer' must be a string or a number, got bool"),
        (json.dumps({**GOOD, "answer": [1]}), "'answer' must be a string or a number, got list"),
        (json.dumps({**GOOD, "answer": float("nan")}), "'answer' must be a string or a number"),
        (json.dumps({**GOOD, "reference_solution": {"a": 1}}), "'reference_solution' must be a string, got dict"),
        # what JSON accepts but a run cannot use (issue 25)
        ('{"question": "q", "answer": "4", "answer": "999", "reference_solution": "r"}',
         "key 'answer' appears twice in the record"),
        ('{"question": "q", "answer": "4", "reference_solution": "r", "id": 1, "id": 2}', "key 'id' appears twice"),
        ('{"question": "\\ud800", "answer": "4", "reference_solution": "r"}',
         "'question' holds invalid Unicode: a lone surrogate '\\ud800' at character 1 (data.fields.question)"),
        ('{"question": "q", "answer": "4\\udfff", "reference_solution": "r"}', "at character 2 (data.fields.answer)"),
        ('{"question": "q", "answer": ' + "9" * 5000 + ', "reference_solution": "r"}',
         "'answer' is an integer of 5000 digits, longer than Python reads"),
        ("-" + "1" * 5000, "expected a JSON object, got an integer of 5000 digits"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad, message):
    path = write(tmp_path, [json.dumps(GOOD), "", bad, json.dumps(GOOD)])
    with pytest.raises(ValueError) as e:
        load_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert message in str(e.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"question": "\xff"}\n')
    with pytest.raises(ValueError, match=f"^{path}:2: not UTF-8"):
        load_jsonl(path)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=f"path: {missing} does not exist"):
        load_jsonl(missing)
    with pytest.raises(ValueError, match="is not a file"):
        load_jsonl(tmp_path)


def test_builtin_split():
    train, test = builtin_split("train", 40, 0), builtin_split("test", 10, 0)
    assert len(train) == 40 and len(test) == 10
    assert all(isinstance(e, Example) for e in train + test)
    assert not {e.question for e in train} & {e.question for e in test}
    assert builtin_split("train", 40, 0) == train
    assert builtin_split("train", 40, 1) != train
    for e in train + test:
        assert e.answer == arith.solve(e.question)[-1].result.__str__()
        assert reward(e.reference_solution, e.answer) == 1.0
        assert e.reference_solution != arith.canonical_solution(e.question)


def test_builtin_split_errors():
    with pytest.raises(ValueError, match="split"):
        builtin_split("dev", 3, 0)
    with pytest.raises(ValueError, match="n"):
        builtin_split("train", -1, 0)


# ---------------------------------------------------------------- data.fields, parquet

OMR = {"problem": "Simplify $\\frac{6}{8}$.", "expected_answer": "\\frac{3}{4}",
       "generated_solution": "Divide by 2: \\boxed{\\frac{3}{4}}", "problem_source": "x"}


class Fields:  # what data.fields holds
    def __init__(self, question="problem", answer="expected_answer", reference_solution="generated_solution",
                 context=""):
        self.question, self.answer, self.reference_solution = question, answer, reference_solution
        self.context = context  # "": no context column (condition=context names one)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_fields_map_any_column_names(tmp_path):
    path = write(tmp_path, [json.dumps(OMR), json.dumps({**OMR, "expected_answer": 7})])
    want = [Example(OMR["problem"], OMR["expected_answer"], OMR["generated_solution"]),
            Example(OMR["problem"], "7", OMR["generated_solution"])]
    assert load_jsonl(path, Fields()) == want
    assert load_examples(path, Fields()) == want
    with pytest.raises(ValueError, match=f"^{path}:1: missing key 'question' \\(data.fields.question\\)"):
        load_jsonl(path)  # the default names


def test_reference_solution_is_optional_unless_needed(tmp_path):
    rows = [{"problem": "q1", "expected_answer": "1"}, {**OMR, "generated_solution": None},
            {**OMR, "generated_solution": " "}, OMR]
    path = write(tmp_path, [json.dumps(r) for r in rows])
    got = load_jsonl(path, Fields(), need_reference=False)
    assert [e.reference_solution for e in got] == [None, None, None, OMR["generated_solution"]]
    assert [e.reference_solution for e in load_jsonl(path, Fields(reference_solution=""), need_reference=False)] == [None] * 4
    with pytest.raises(ValueError, match=f"^{path}:1: missing key 'generated_solution' \\(data.fields.reference_solution\\)"):
        load_jsonl(path, Fields(), need_reference=True)
    bad = write(tmp_path, [json.dumps({**OMR, "generated_solution": 3})], "bad.jsonl")
    with pytest.raises(ValueError, match="'generated_solution' must be a string, got int 3"):
        load_jsonl(bad, Fields(), need_reference=False)  # optional, but not any type


def test_load_parquet(tmp_path):
    path = write_parquet(tmp_path / "q.parquet", [OMR, {**OMR, "problem": "q2", "expected_answer": "-2"}])
    want = [Example(OMR["problem"], OMR["expected_answer"], OMR["generated_solution"]),
            Example("q2", "-2", OMR["generated_solution"])]
    assert load_parquet(path, Fields()) == want
    assert load_examples(str(path), Fields()) == want
    nums = write_parquet(tmp_path / "n.parquet", [{"question": "a", "answer": 52}, {"question": "b", "answer": 0.5}])
    assert load_examples(nums, need_reference=False) == [Example("a", "52"), Example("b", "0.5")]


FLOATS = [(1e-05, "0.00001"), (1.5e-7, "0.00000015"), (123456.789, "123456.789"), (1e20, "100000000000000000000"),
          (4.0, "4")]
INTS = [(2**60 + 1, "1152921504606846977"), (-3, "-3")]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_numbers_keep_their_value_from_file_to_grader(tmp_path, kind):
    """A float answer with an exponent was kept as repr ("1e-05"), which math-verify reads as e - 5."""
    from fastsd.tasks.grading import make_grader

    for name, numbers in (("floats", FLOATS), ("ints", INTS)):  # a parquet column has one type
        rows = [{"question": f"q{i}", "answer": value} for i, (value, _) in enumerate(numbers)]
        path = write_parquet(tmp_path / f"{name}.parquet", rows) if kind == "parquet" else write(
            tmp_path, [json.dumps(r) for r in rows], f"{name}.jsonl")
        assert [e.answer for e in load_examples(str(path), need_reference=False)] == [text for _, text in numbers]
    exact, math_grader = make_grader("exact"), make_grader("math")
    try:
        assert exact.equal("0.00001", "0.00001")
        assert math_grader.equal("10^{-5}", "0.00001") and math_grader.equal("0.00001", "0.00001")
        assert not math_grader.equal("e - 5", "0.00001")
        assert math_grader.equal("1152921504606846977", "1152921504606846977")
        assert not math_grader.equal("1152921504606846976", "1152921504606846977")  # not rounded to a double
    finally:
        math_grader.close()


def test_numpy_and_decimal_answers_keep_their_value():
    from decimal import Decimal

    import numpy as np

    from fastsd.tasks.data import _answer_text

    assert _answer_text(np.float32(0.1)) == "0.1" and _answer_text(np.float64(1e-5)) == "0.00001"
    assert _answer_text(np.int64(2**60 + 1)) == "1152921504606846977" and _answer_text(np.bool_(True)) is None
    assert _answer_text(Decimal("1.50")) == "1.50" and _answer_text(Decimal("1E-7")) == "0.0000001"


@pytest.mark.parametrize(
    "rows, fields, message",
    [
        ([OMR, {**OMR, "problem": ""}], Fields(), "row 2: 'problem' is empty (data.fields.question)"),
        ([OMR, OMR, {**OMR, "expected_answer": None}], Fields(),
         "row 3: 'expected_answer' must be a string or a number, got NoneType None (data.fields.answer)"),
        ([OMR], Fields(question="question"), "no column 'question' (data.fields.question); it has"),
        ([{"problem": "q", "expected_answer": "1"}], Fields(), "no column 'generated_solution' (data.fields.reference_solution)"),
    ],
)
def test_parquet_errors_name_file_row_and_key(tmp_path, rows, fields, message):
    path = write_parquet(tmp_path / "q.parquet", rows)
    with pytest.raises(ValueError) as e:
        load_parquet(path, fields, need_reference=True)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_not_parquet(tmp_path):
    path = tmp_path / "q.parquet"
    path.write_text("not parquet")
    with pytest.raises(ValueError, match=f"^{path}: not a readable parquet file"):
        load_examples(path)


def test_load_data_from_the_config(tmp_path):
    """What a user writes: data.path, data.eval_path and data.fields.*; the condition decides
    whether reference solutions are required."""
    from fastsd.config import load_config
    from fastsd.tasks.data import load_data

    train = write_parquet(tmp_path / "train.parquet", [OMR, {**OMR, "generated_solution": None}])
    held = write(tmp_path, [json.dumps({"problem": "q", "expected_answer": "3"})], "held.jsonl")
    keys = [f"data.path={train}", f"data.eval_path={held}", "data.fields.question=problem",
            "data.fields.answer=expected_answer", "data.fields.reference_solution=generated_solution"]
    got_train, got_held = load_data(load_config(None, keys + ["condition=critique", "critic=http"]))
    assert [e.reference_solution for e in got_train] == [OMR["generated_solution"], None]
    assert got_held == [Example("q", "3")]
    with pytest.raises(ValueError, match=f"^data.path: {train}: row 2: 'generated_solution' must be a string"):
        load_data(load_config(None, keys + ["condition=reference"]))
    with pytest.raises(ValueError, match=f"^data.path: {train}: no column 'question' \\(data.fields.question\\)"):
        load_data(load_config(None, keys[:2] + ["condition=grpo"]))  # the default names
    with pytest.raises(ValueError, match=f"^data.eval_path: {held}:1: missing key 'answer' \\(data.fields.answer\\)"):
        load_data(load_config(None, [keys[1], "data.fields.question=problem", "condition=grpo"]))


def test_the_builtin_critic_on_other_data_is_an_error_in_dry_run_too(tmp_path, capsys):
    """critic=builtin (the default) knows only the arithmetic task: on other data --dry-run stops
    too (a run stops before the model loads: tests/run/test_preflight.py), naming critic.kind and the
    way out; arithmetic questions in a file are fine."""
    from fastsd import cli

    math = write(tmp_path, [json.dumps({"question": "1+2", "answer": "3"}),
                            json.dumps({"question": r"Simplify $\frac{6}{8}$.", "answer": r"\frac{3}{4}"})])
    with pytest.raises(SystemExit):
        cli.main(["--dry-run", f"data.path={math}", "condition=critique"])
    err = capsys.readouterr().err
    assert "fastsd-train: error: critic.kind: critic=builtin is the built-in arithmetic task's own critic" in err
    assert f"{math}:2 is not one of that task's questions" in err and "use critic=http" in err
    arith_only = write(tmp_path, [json.dumps({"question": "12+7*3-5", "answer": "52"})], "arith.jsonl")
    assert cli.main(["--dry-run", f"data.path={arith_only}", "condition=critique"]) == 0


def test_data_task_picks_the_builtin_task():
    from fastsd.config import load_config
    from fastsd.tasks.data import load_data

    def operands(cfg):
        train, held = load_data(cfg)
        return {len(arith.parse_question(e.question)[0]) for e in train + held}

    small = ["data.train_size=30", "data.eval_size=10"]
    assert operands(load_config(None, small)) <= set(range(9, 13))  # long is the default
    short = load_config(None, [*small, "data.task=short"])
    assert short.data.task == "short" and operands(short) <= {3, 4, 5}
    assert load_data(short)[0][0].reference_solution == arith.reference_solution(
        load_data(short)[0][0].question, "regrouped")
    with pytest.raises(ValueError, match="^data.task: expected one of"):
        load_config(None, ["data.task=medium"])
