"""Helpers that inspect the stores a run writes, as an auditor would."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from tasks.dataset import SPLIT, SUBJECT_KEY
from tasks.shards import read_all


def train_subjects(ws, count: int, offset: int = 0) -> list[int]:
    """Pick real subjects of the training split, deterministically."""
    frame = read_all(ws.data_dir)
    subjects = frame.loc[frame[SPLIT] == "train", SUBJECT_KEY].drop_duplicates().tolist()
    return subjects[offset:offset + count]


def write_requests(ws, name: str, lines: list[str | dict]) -> Path:
    path = ws.incoming_dir / name
    path.write_text("".join((json.dumps(l) if isinstance(l, dict) else l) + "\n" for l in lines))
    return path


def request(request_id: str, subject_id, source: str = "test") -> dict:
    return {"request_id": request_id, "subject_id": subject_id,
            "received_at": datetime.now(UTC).isoformat(timespec="seconds"), "source": source}


def raw_id_hits(paths: list[Path], subject_ids: list[int]) -> list[tuple[str, int]]:
    """Find each subject id written as a standalone number in the bytes of the given files."""
    patterns = {sid: re.compile(rb"(?<![0-9])" + str(sid).encode() + rb"(?![0-9])") for sid in subject_ids}
    hits = []
    for path in paths:
        data = path.read_bytes()
        hits += [(str(path), sid) for sid, pattern in patterns.items() if pattern.search(data)]
    return hits


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def subjects_in_objects(roots: list[Path]) -> set[int]:
    """Every subject key found in any Parquet object stored under the given DVC cache or remote roots."""
    found: set[int] = set()
    for path in files_under(*roots):
        if path.name.endswith(".dir"):
            continue
        try:
            table = pq.read_table(path, columns=[SUBJECT_KEY])
        except Exception:  # noqa: BLE001 - not every DVC object is Parquet
            continue
        found |= set(table.column(SUBJECT_KEY).to_pylist())
    return found
