"""Sharded Parquet storage of the training data under data/.

A subject lives in exactly one shard (stable hash of the subject key mod n_shards),
so erasing a subject rewrites one shard and leaves the other objects untouched.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.dataset import SPLIT, SUBJECT_KEY, assign_split, load_randhie, shard_of
from tasks.settings import DataSettings


def shard_name(index: int) -> str:
    return f"shard-{index:02d}.parquet"


def write_shard(frame: pd.DataFrame, path: Path) -> None:
    """Write one shard deterministically: same rows in, same bytes out."""
    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    pq.write_table(table, path, compression="zstd", write_statistics=True)


def materialize(data_dir: Path, settings: DataSettings) -> int:
    """Write the default dataset into data/ as shards with its by-subject split; return the row count."""
    frame = load_randhie()
    frame[SPLIT] = assign_split(frame[SUBJECT_KEY], settings.split_seed, settings.test_fraction, settings.val_fraction)
    shards = shard_of(frame[SUBJECT_KEY], settings.n_shards)
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob("shard-*.parquet"):
        stale.unlink()
    for index in range(settings.n_shards):
        write_shard(frame[shards == index], data_dir / shard_name(index))
    return len(frame)


def shard_paths(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("shard-*.parquet"))


def read_all(data_dir: Path) -> pd.DataFrame:
    """Read every shard into one frame ordered by subject and year."""
    frames = [pq.read_table(p).to_pandas() for p in shard_paths(data_dir)]
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values([SUBJECT_KEY, "year"], kind="stable").reset_index(drop=True)


def read_subject_keys(path: Path) -> pd.Series:
    return pq.read_table(path, columns=[SUBJECT_KEY]).column(SUBJECT_KEY).to_pandas()
