"""Where data.path and data.eval_path point: a file, shards, a `datasets` folder, a hub name.

    a .jsonl or .parquet file        read by `fastsd.tasks.data` (file-and-line, file-and-row errors)
    a glob (*, ?, [...])             its files in name order, each a jsonl or parquet shard
    a folder of shards               its *.parquet and *.jsonl files in name order
    a datasets.save_to_disk folder   (dataset_info.json or dataset_dict.json in it) through
                                     datasets.load_from_disk; a DatasetDict's split is data.split
                                     (data.eval_path: data.eval_split)
    a hub dataset name (owner/name)  through datasets.load_dataset(name, data.subset, split=...)
                                     and its cache; offline (HF_HUB_OFFLINE=1, no network) and not
                                     cached is an error saying so

Every record goes through the same checks (`fastsd.tasks.data._example`); a bad one is named by
its shard and line or row: `SHARD:LINE` (jsonl), `SHARD: row N` (parquet, a datasets arrow file).
The `datasets` package (extra fastsd[datasets]) is imported only for the last two.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

__all__ = ["load_source", "shard_files", "shard_places"]

SHARDS = (".parquet", ".jsonl")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_source(path: str, read, record, wanted, *, split: str = "train", subset: str = "",
                split_key: str = "data.split") -> list:
    """The questions at `path` (module docstring); ValueError("path: ...") or naming the shard.
    The checks are the caller's (`fastsd.tasks.data.load_questions`): `read(file)` reads a jsonl or
    parquet file, `record(row, where)` checks one row of a dataset, `wanted(column_names, where)`
    the columns to read (an error for a missing one)."""
    p = Path(path)
    if p.is_file():
        return read(p)
    shards = shard_files(path)
    if shards is not None:
        if not shards:
            raise ValueError(f"path: {p} is a folder with no .parquet or .jsonl shards, and no datasets.save_to_disk "
                             "folder (no dataset_info.json or dataset_dict.json)" if p.is_dir()
                             else f"path: {path} matches no file")
        return [ex for shard in shards for ex in read(shard)]
    if p.is_dir():
        ds = _datasets(path).load_from_disk(str(p))
        return _arrow(_split(ds, split, split_key, str(p)), str(p), record, wanted)
    if HUB_NAME.fullmatch(path) and not path.lower().endswith((*SHARDS, ".json")):
        return _arrow(_hub(path, split, subset, split_key), path, record, wanted)
    raise ValueError(f"path: {path} does not exist")


def shard_files(path: str) -> list[str] | None:
    """The shards of a folder of shards or a glob, in name order; None: `path` is neither."""
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            return None  # a datasets.save_to_disk folder
        return sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in SHARDS)
    if not p.exists() and any(c in path for c in "*?["):
        return sorted(f for f in glob.glob(path) if os.path.isfile(f))
    return None


def shard_places(shards: list[str], indices: list[int], places) -> list[str]:
    """Where the records at `indices` of the shards read one after another are: `places(shard,
    indices in it)` (`fastsd.tasks.data.record_places`) for each, counting each shard's records."""
    import pyarrow.parquet as pq

    found, start = {}, 0
    for shard in shards:
        if shard.lower().endswith(".parquet"):
            n = pq.ParquetFile(shard).metadata.num_rows
        else:
            with open(shard, "rb") as f:
                n = sum(1 for raw in f if raw.strip())
        mine = [i for i in indices if start <= i < start + n]
        found.update(zip(mine, places(shard, [i - start for i in mine])))
        start += n
    return [found.get(i, f"question {i + 1} of {len(shards)} shards") for i in indices]


def _datasets(path: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"path: {path} needs the datasets package, not installed: pip install 'fastsd[datasets]' "
                         "(or pip install datasets)") from None
    return datasets


def _split(ds, split: str, split_key: str, where: str):
    """A Dataset as is; a DatasetDict's `split`."""
    if not hasattr(ds, "keys"):
        return ds
    if split not in ds:
        raise ValueError(f"path: {where} has no split {split!r} ({split_key}); it has {sorted(ds)}")
    return ds[split]


def _hub(name: str, split: str, subset: str, split_key: str):
    datasets = _datasets(name)
    what = f"{name}" + (f" (data.subset {subset})" if subset else "") + f", split {split}"
    try:
        ds = datasets.load_dataset(name, subset or None, split=split)
    except ConnectionError as e:
        offline = "the hub is offline here (HF_HUB_OFFLINE=1)" if datasets.config.HF_HUB_OFFLINE else \
            "the hub cannot be reached (no network)"
        raise ValueError(f"path: {name} is no local file or folder, and as a Hugging Face dataset {what} it cannot be "
                         f"loaded: {offline} and it is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}); "
                         f"load it once with network, or give a local path ({e})") from None
    except Exception as e:  # noqa: BLE001 - not found, gated, a bad split or subset: told with the key
        raise ValueError(f"path: {name} is no local file or folder, and datasets cannot load the Hugging Face "
                         f"dataset {what} ({type(e).__name__}: {e}); see data.subset and {split_key}") from None
    return ds


def _arrow(ds, where: str, record, wanted) -> list:
    """The records of a datasets.Dataset, each named by its arrow shard and row (or `where`: row N)."""
    from datasets import Dataset

    columns = wanted(set(ds.column_names), where)
    parts = [(f["filename"], Dataset.from_file(f["filename"])) for f in ds.cache_files]
    if not parts or sum(len(part) for _, part in parts) != len(ds) or ds._indices is not None:
        parts = [(where, ds)]  # in memory, or rows selected out of its files: rows counted in the dataset
    return [record(row, f"{shard}: row {i}") for shard, part in parts
            for i, row in enumerate(part.select_columns(columns), start=1)]
