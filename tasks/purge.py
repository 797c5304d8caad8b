"""Purge: remove the batch's subjects from data/ and make a new DVC data version.

Only the shards that hold a batch subject are read in full and rewritten. The forget
rows stay in memory for the unlearning step and are never persisted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import versioning
from tasks.dataset import SUBJECT_KEY
from tasks.hashing import SubjectHasher
from tasks.shards import shard_paths, write_shard
from tasks.workspace import Workspace

log = logging.getLogger("lethe.purge")


@dataclass
class PurgeResult:
    data_md5_before: str
    data_md5_after: str
    rows_before: int
    rows_removed: int
    forget_rows: pd.DataFrame
    # relpath -> md5 of the old shard objects that held a forgotten subject
    affected_objects: dict[str, str] = field(default_factory=dict)
    found_hashes: set[str] = field(default_factory=set)
    # hashed subject key -> rows removed for it
    rows_per_subject: dict[str, int] = field(default_factory=dict)

    @property
    def rows_after(self) -> int:
        return self.rows_before - self.rows_removed


def subject_hashes_of(keys: pd.Series, hasher: SubjectHasher) -> pd.Series:
    """Hash each distinct subject key once and map the hashes back onto the rows."""
    unique = keys.drop_duplicates()
    lookup = dict(zip(unique, hasher.hash_many(str(k) for k in unique)))
    return keys.map(lookup)


def purge(ws: Workspace, subject_hashes: list[str], hasher: SubjectHasher) -> PurgeResult:
    """Rewrite each shard that contains a batch subject without that subject's rows, then `dvc add`."""
    wanted = set(subject_hashes)
    md5_before = versioning.data_md5(ws)
    listing = versioning.dir_listing(ws, md5_before)

    rows_before = 0
    forget_parts = []
    affected: dict[str, str] = {}
    found: set[str] = set()
    for path in shard_paths(ws.data_dir):
        rows_before += pq.read_metadata(path).num_rows
        hashes = subject_hashes_of(pq.read_table(path, columns=[SUBJECT_KEY]).column(SUBJECT_KEY).to_pandas(), hasher)
        mask = hashes.isin(wanted).to_numpy()
        if not mask.any():
            continue
        frame = pq.read_table(path).to_pandas()
        forget_parts.append(frame[mask])
        found |= set(hashes[mask])
        affected[path.name] = listing[path.name]
        write_shard(frame[~mask], path)
        log.info("Purge: %s lost %d rows", path.name, int(mask.sum()))

    forget = pd.concat(forget_parts, ignore_index=True) if forget_parts else pd.DataFrame()
    md5_after = versioning.add_data(ws) if affected else md5_before
    rows_per_subject = subject_hashes_of(forget[SUBJECT_KEY], hasher).value_counts().to_dict() if len(forget) else {}
    result = PurgeResult(md5_before, md5_after, rows_before, len(forget), forget, affected, found,
                         {str(k): int(v) for k, v in rows_per_subject.items()})
    log.info("Purge: removed %d rows of %d subjects from %d shards; %d subjects held no data",
             result.rows_removed, len(found), len(affected), len(wanted - found))
    return result


@task(name="purge", cache_policy=NO_CACHE, persist_result=False)
def purge_task(ws: Workspace, subject_hashes: list[str], hasher: SubjectHasher) -> PurgeResult:
    """Write the new data version without the batch's subjects."""
    return purge(ws, subject_hashes, hasher)
