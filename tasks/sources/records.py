"""Records that every queue source returns, and the JSON Lines it writes to quarantine and done/."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from tasks.hashing import SubjectHasher
from tasks.requests import QuarantinedLine, RequestLine


@dataclass(frozen=True)
class QueuedRequest:
    request: RequestLine
    source_ref: str


@dataclass(frozen=True)
class QuarantineRecord:
    source_ref: str
    line_number: int
    reason: str


def quarantine_jsonl(lines: Iterable[QuarantinedLine]) -> str:
    """Format invalid lines as JSON Lines of line number, reason and the raw line."""
    return "".join(json.dumps({"line": item.line_number, "reason": item.reason, "raw": item.raw}) + "\n" for item in lines)


def redacted_jsonl(requests: Iterable[RequestLine], hasher: SubjectHasher) -> str:
    """Format requests as JSON Lines with each subject_id replaced by its keyed hash in `subject_hash`."""
    redacted = []
    for request in requests:
        record = request.model_dump(mode="json")
        record["subject_hash"] = hasher.hash(record.pop("subject_id"))
        redacted.append(json.dumps(record) + "\n")
    return "".join(redacted)
