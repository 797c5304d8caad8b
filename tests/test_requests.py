"""Request parsing and the local queue: invalid lines are quarantined with a reason, never dropped."""

from __future__ import annotations

import json

import pytest

from tasks.hashing import SubjectHasher
from tasks.queue import LocalQueue
from tasks.requests import parse_line, parse_lines
from tasks.workspace import Workspace

VALID = {"request_id": "r-1", "subject_id": "125024", "received_at": "2026-11-30T10:00:00Z", "source": "web"}


def line(**changes) -> str:
    payload = {**VALID, **changes}
    return json.dumps({k: v for k, v in payload.items() if v is not ...})


def test_valid_line_is_normalised():
    parsed = parse_line(line(subject_id=" 0125024 "))
    assert parsed.subject_id == "125024"
    assert parsed.received_at.tzinfo is not None


def test_integer_subject_id_accepted():
    assert parse_line(line(subject_id=125024)).subject_id == "125024"


@pytest.mark.parametrize(("text", "reason"), [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (line(subject_id=""), "subject_id"),
    (line(subject_id="12ab"), "subject_id"),
    (line(subject_id="../../etc/passwd"), "subject_id"),
    (line(subject_id=True), "subject_id"),
    (line(subject_id="1" * 40), "subject_id"),
    (line(request_id=""), "request_id"),
    (line(request_id="a\x00b"), "request_id"),
    (line(received_at="yesterday"), "received_at"),
    (line(received_at="2026-11-30T10:00:00"), "time zone"),
    (line(received_at="2999-01-01T00:00:00Z"), "future"),
    (line(source=...), "source: Field required"),
    (line(extra="x"), "unexpected field"),
    ("{}" + " " * 5000, "longer than"),
])
def test_invalid_line_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_line(text)


def test_reason_never_contains_subject_id():
    with pytest.raises(ValueError) as info:
        parse_line(line(subject_id="98765x"))
    assert "98765" not in str(info.value)


def test_parse_lines_keeps_valid_and_numbers_invalid():
    valid, invalid = parse_lines([line(), "", "oops", line(request_id="r-2")])
    assert [r.request_id for r in valid] == ["r-1", "r-2"]
    assert [(q.line_number, q.raw) for q in invalid] == [(3, "oops")]


def test_queue_quarantines_and_redacts_on_ack(tmp_path):
    ws = Workspace(tmp_path)
    ws.make_dirs()
    queue = LocalQueue(ws)
    path, quarantined, accepted = queue.enqueue_lines([line(), "oops", "\udcff"])
    assert accepted == 1
    assert [q.line_number for q in quarantined] == [2, 3]
    assert "not valid UTF-8" in quarantined[1].reason
    stored = (ws.quarantine_dir / path.name).read_text(errors="surrogateescape").splitlines()
    assert [json.loads(s)["reason"] for s in stored][0].startswith("invalid JSON")

    hasher = SubjectHasher(b"k" * 32)
    assert queue.acknowledge({path.name}, hasher) == 1
    done = json.loads((ws.done_dir / path.name).read_text())
    assert "subject_id" not in done
    assert done["subject_hash"] == hasher.hash("125024")
    assert not path.exists()


def test_short_hmac_key_rejected():
    from tasks.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="at least 16"):
        SubjectHasher(b"short")
