"""data.path and data.eval_path as shards (a glob, a folder), a datasets.save_to_disk folder and a
Hugging Face dataset name (from a local cache, offline): the same records and the same checks as
one file, a bad record named by its shard and line or row."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from fastsd.config import load_config
from fastsd.tasks.data import Example, load_data, record_places
from fastsd.tasks.data import load_questions as load_source

ROWS = [{"question": f"{i} + 1", "answer": i + 1, "reference_solution": f"{i} + 1 = {i + 1}"} for i in range(6)]
WANT = [Example(r["question"], str(r["answer"]), r["reference_solution"]) for r in ROWS]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_a_folder_of_jsonl_shards_in_name_order_and_a_bad_record_named_by_shard_and_line(tmp_path):
    write_jsonl(tmp_path / "part-1.jsonl", ROWS[3:])
    write_jsonl(tmp_path / "part-0.jsonl", ROWS[:3])
    (tmp_path / "README.md").write_text("not a shard")
    assert load_source(str(tmp_path)) == WANT
    write_jsonl(tmp_path / "part-1.jsonl", [ROWS[3], {"question": "", "answer": 1, "reference_solution": "x"}])
    with pytest.raises(ValueError, match=rf"^{tmp_path}/part-1.jsonl:2: 'question' is empty"):
        load_source(str(tmp_path))


def test_a_glob_of_parquet_shards_and_a_bad_row_named_by_shard_and_row(tmp_path):
    write_parquet(tmp_path / "train-00000.parquet", ROWS[:2])
    write_parquet(tmp_path / "train-00001.parquet", ROWS[2:])
    write_jsonl(tmp_path / "other.jsonl", ROWS[:1])  # not matched
    assert load_source(str(tmp_path / "train-*.parquet")) == WANT
    write_parquet(tmp_path / "train-00001.parquet", [*ROWS[2:4], {**ROWS[4], "answer": None}])
    with pytest.raises(ValueError, match=rf"^{tmp_path}/train-00001.parquet: row 3: 'answer' must be"):
        load_source(str(tmp_path / "train-*.parquet"))
    with pytest.raises(ValueError, match=r"^path: .*nothing-\*.parquet matches no file"):
        load_source(str(tmp_path / "nothing-*.parquet"))


def test_records_of_shards_are_placed_in_their_shard(tmp_path):
    """The place of a record in a glob or folder of shards (what the prompt-length check and
    critic=builtin name): its shard and line (jsonl, blank lines skipped) or row (parquet)."""
    write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    (tmp_path / "b.jsonl").write_text("\n" + json.dumps(ROWS[2]) + "\n\n" + json.dumps(ROWS[3]) + "\n")
    write_parquet(tmp_path / "c.parquet", ROWS[4:])
    assert load_source(str(tmp_path)) == WANT
    want = [f"{tmp_path}/b.jsonl:4", f"{tmp_path}/a.jsonl:1", f"{tmp_path}/c.parquet (row 2)"]
    assert record_places(str(tmp_path), [3, 0, 5]) == want
    assert record_places(str(tmp_path / "*.jsonl"), [2]) == [f"{tmp_path}/b.jsonl:2"]


def test_an_empty_folder_and_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"no .parquet or .jsonl shards, and no datasets.save_to_disk folder"):
        load_source(str(tmp_path))
    with pytest.raises(ValueError, match=r"^path: .*missing.jsonl does not exist"):
        load_source(str(tmp_path / "missing.jsonl"))


def test_a_jsonl_file_needs_no_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    assert load_source(str(write_jsonl(tmp_path / "q.jsonl", ROWS))) == WANT
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    with pytest.raises(ValueError, match=r"needs the datasets package.*fastsd\[datasets\]"):
        load_source(str(tmp_path / "saved"))


def test_a_save_to_disk_folder_its_splits_and_a_bad_row_named_by_arrow_shard(tmp_path):
    datasets = pytest.importorskip("datasets")
    one = datasets.Dataset.from_list(ROWS)
    one.save_to_disk(str(tmp_path / "one"), num_shards=2)
    assert load_source(str(tmp_path / "one")) == WANT
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]), "test": datasets.Dataset.from_list(ROWS[4:])})
    both.save_to_disk(str(tmp_path / "both"))
    assert load_source(str(tmp_path / "both")) == WANT[:4]
    assert load_source(str(tmp_path / "both"), split="test") == WANT[4:]
    with pytest.raises(ValueError, match=r"^data.eval_path: .*both has no split 'dev' \(data.eval_split\); "
                                         r"it has \['test', 'train'\]"):
        load_data(load_config(overrides=[f"data.eval_path={tmp_path / 'both'}", "data.eval_split=dev"]))
    bad = [*ROWS[:4], {**ROWS[4], "question": "  "}, ROWS[5]]
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"), num_shards=2)
    with pytest.raises(ValueError, match=r"^.*bad/data-00001-of-00002.arrow: row 2: 'question' is empty"):
        load_source(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"no column 'problem' \(data.fields.question\)"):
        load_data(load_config(overrides=[f"data={tmp_path / 'one'}", "data.fields.question=problem"]))


def cache_hub_dataset(cache: Path, name: str, splits: dict[str, list[dict]], subset: str = "default") -> None:
    """Put `name` in a datasets cache as a download of it from the hub would leave it."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    files = {}
    for split, rows in splits.items():
        files[split] = [str(write_jsonl(cache.parent / f"{subset}-{split}.jsonl", rows))]
    owner, short = name.split("/")
    builder = Json(cache_dir=str(cache / "build"), dataset_name=short, config_name=subset, hash="0" * 16,
                   data_files=DataFilesDict.from_patterns(files))
    builder.download_and_prepare()
    built = Path(builder.cache_dir).parents[1]  # build/NAME/<subset>-<id>/0.0.0/<hash>: arrow files NAME-SPLIT.arrow
    (cache / f"{owner}___{short}").mkdir(exist_ok=True)
    built.rename(cache / f"{owner}___{short}" / subset)  # where a download from the hub is cached


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "datasets"
    cache.mkdir(parents=True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_name_from_the_local_cache_offline_with_split_and_subset(offline_cache):
    cache_hub_dataset(offline_cache, "fastsd-tests/arith", {"train": ROWS[:4], "test": ROWS[4:]})
    cache_hub_dataset(offline_cache, "fastsd-tests/levels", {"train": ROWS[1:2]}, subset="tiny")
    cfg = load_config(overrides=["data=fastsd-tests/arith", "data.eval_path=fastsd-tests/arith"])
    assert load_data(cfg) == (WANT[:4], WANT[4:])
    assert load_source("fastsd-tests/levels", subset="tiny") == WANT[1:2]
    with pytest.raises(ValueError, match=r"^data.path: .*split nope.*see data.subset and data.split"):
        load_data(load_config(overrides=["data=fastsd-tests/arith", "data.split=nope"]))


def test_a_hub_name_offline_and_not_cached_is_an_error_saying_so(offline_cache):
    with pytest.raises(ValueError, match=r"^data.eval_path: fastsd-tests/absent is no local file or folder, .*"
                                         r"the hub is offline here \(HF_HUB_OFFLINE=1\) and it is not in the datasets "
                                         rf"cache \({offline_cache}\)"):
        load_data(load_config(overrides=["data.eval_path=fastsd-tests/absent"]))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
