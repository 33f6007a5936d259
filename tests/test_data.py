"""Tests for fastsd.data: jsonl loading (and its errors) and the built-in split."""

import json

import pytest

from fastsd.data import Example, builtin_split, load_jsonl
from fastsd.format import reward
from fastsd.tasks import arith


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
    arith.write_jsonl(path, arith.make_records("train", 5, seed=1))
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
        (json.dumps({"answer": "1", "reference_solution": "r"}), "missing key 'question'"),
        (json.dumps({"question": "q", "reference_solution": "r"}), "missing key 'answer'"),
        (json.dumps({"question": "q", "answer": "1"}), "missing key 'reference_solution'"),
        (json.dumps({**GOOD, "question": ""}), "'question' is empty"),
        (json.dumps({**GOOD, "answer": "  "}), "'answer' is empty"),
        (json.dumps({**GOOD, "reference_solution": ""}), "'reference_solution' is empty"),
        (json.dumps({**GOOD, "question": 3}), "'question' must be a string, got int"),
        (json.dumps({**GOOD, "answer": None}), "'answer' must be a string or a number, got NoneType"),
        (json.dumps({**GOOD, "answer": True}), "'answer' must be a string or a number, got bool"),
        (json.dumps({**GOOD, "answer": [1]}), "'answer' must be a string or a number, got list"),
        (json.dumps({**GOOD, "answer": float("nan")}), "'answer' must be a string or a number"),
        (json.dumps({**GOOD, "reference_solution": {"a": 1}}), "'reference_solution' must be a string, got dict"),
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
