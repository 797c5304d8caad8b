"""Materialized data: deterministic shards, by-subject split and shard alignment."""

from __future__ import annotations

import hashlib

import pyarrow.parquet as pq

from tasks import versioning
from tasks.dataset import SPLIT, SUBJECT_KEY
from tasks.settings import DataSettings
from tasks.shards import materialize, read_all, shard_paths
from tasks.workspace import Workspace


def digests(directory):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in shard_paths(directory)}


def test_materialize_is_byte_identical(tmp_path):
    materialize(tmp_path / "a", DataSettings())
    materialize(tmp_path / "b", DataSettings())
    assert len(digests(tmp_path / "a")) == 8
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


def test_dvc_md5_is_reproducible(tmp_path):
    md5s = []
    for name in ("one", "two"):
        ws = Workspace(tmp_path / name)
        ws.make_dirs()
        versioning.init_repository(ws)
        materialize(ws.data_dir, DataSettings())
        md5s.append(versioning.add_data(ws))
    assert md5s[0] == md5s[1]


def test_split_and_shard_are_per_subject(tmp_path):
    materialize(tmp_path, DataSettings())
    frame = read_all(tmp_path)
    assert len(frame) == 20190
    assert frame[SUBJECT_KEY].nunique() == 5912
    assert (frame.groupby(SUBJECT_KEY)[SPLIT].nunique() == 1).all()
    shard_sets = [set(pq.read_table(p, columns=[SUBJECT_KEY]).column(0).to_pylist()) for p in shard_paths(tmp_path)]
    assert sum(len(s) for s in shard_sets) == 5912
    test_share = (frame.drop_duplicates(SUBJECT_KEY)[SPLIT] == "test").mean()
    assert 0.17 < test_share < 0.23
