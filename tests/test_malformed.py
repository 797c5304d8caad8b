"""Malformed deletion requests through the real local queue and ingest.

Each malformed line must end up in queue/quarantine/ with a reason that names the
field and rule but never the submitted value, or be normalised to its canonical
form, while the valid lines of the same file are still processed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from tasks.chain import LedgerEntry, verify_chain
from tasks.hashing import SubjectHasher
from tasks.ingest import ingest
from tasks.ledger import Batch, DeletionRequest, Ledger, QuarantinedLine, RequestState
from tasks.queue import LocalQueue
from tasks.requests import MAX_LINE_BYTES
from tasks.workspace import Workspace
from tests.helpers import request, train_subjects, write_requests

# A subject id that occurs in no rule text, so finding it in a reason means the value leaked.
SECRET_ID = "987654321"
RECEIVED = "2026-01-30T10:00:00Z"
VALID = {"request_id": "r-x", "subject_id": SECRET_ID, "received_at": RECEIVED, "source": "web"}
FILE_NAME = "batch.jsonl"
# The valid lines written before and after each case line; both must survive.
BEFORE = json.dumps({**VALID, "request_id": "ok-1", "subject_id": "125024"}).encode()
AFTER = json.dumps({**VALID, "request_id": "ok-2", "subject_id": "125026"}).encode()


def line(**changes) -> bytes:
    """Return VALID as one JSON line with the given fields changed. A field given as ... is removed."""
    payload = {**VALID, **changes}
    return json.dumps({k: v for k, v in payload.items() if v is not ...}).encode()


def raw_line(**changes) -> bytes:
    """Like line(), but non-ASCII characters are written raw instead of as \\u escapes."""
    payload = {**VALID, **changes}
    return json.dumps({k: v for k, v in payload.items() if v is not ...}, ensure_ascii=False).encode()


def padded_to(size: int) -> bytes:
    """A valid request line padded with trailing spaces to exactly `size` bytes."""
    text = line(request_id="r-pad")
    return text + b" " * (size - len(text))


def in_hours(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Quarantined:
    """A line the queue must quarantine, the reason fragment, and a value the reason must not contain."""

    line: bytes
    reason: str
    secret: str | None = SECRET_ID


def case(name: str, text: bytes, reason: str, secret: str | None = SECRET_ID, bug: str | None = None):
    """Build one row of QUARANTINED; `bug` describes a known product bug and marks the row as a strict xfail."""
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(Quarantined(text, reason, secret), id=name, marks=marks)


OVERFLOW_BUG = ("astimezone(UTC) raises OverflowError, which parse_lines does not catch, "
                "so read_pending crashes and the valid lines are not processed")
UNIX_TIME_BUG = ("pydantic's lax mode reads a number or a string of digits as Unix time (large numbers as "
                 "milliseconds), but the documented format is ISO 8601 with a time zone")
SPLITLINES_BUG = ("decode_file uses str.splitlines(), which also splits at 0x0B, 0x0C, 0x1C-0x1E, U+0085, U+2028 "
                  "and U+2029, so one line becomes two quarantine records and the line numbers after it shift")
SUBJECT_RULE = "must be a decimal integer of 1 to 18 digits"
REQUEST_RULE = "must be 1 to 128 characters of letters, digits"
SOURCE_RULE = "must be 1 to 64 printable ASCII characters"


QUARANTINED = [
    # Not JSON, or not a JSON object.
    case("invalid JSON", b"{not json", "invalid JSON", None),
    case("truncated object", line()[:-20], "invalid JSON"),
    case("JSON array", b"[1, 2]", "expected a JSON object, got list", None),
    case("JSON string", b'"987654321"', "expected a JSON object, got str"),
    case("JSON number", b"987654321", "expected a JSON object, got int"),
    case("JSON null", b"null", "expected a JSON object, got NoneType", None),
    case("raw NUL byte", line().replace(b'"request_id": "r-x"', b'"request_id": "r-x\x00"'),
         "invalid JSON: Invalid control character"),
    # A required field is missing.
    case("missing request_id", line(request_id=...), "request_id: Field required"),
    case("missing subject_id", line(subject_id=...), "subject_id: Field required", None),
    case("missing received_at", line(received_at=...), "received_at: Field required"),
    case("missing source", line(source=...), "source: Field required"),
    case("empty object", b"{}", "request_id: Field required; subject_id: Field required", None),
    # Extra fields.
    case("extra field", line(note="x"), "line: unexpected field"),
    case("extra field named by id", line(**{SECRET_ID: True}), "unexpected field"),
    # The request id is kept in the ledger for good, so it must not spell out the subject.
    case("request_id is subject_id", line(request_id=SECRET_ID), "request_id must not contain the subject_id"),
    case("request_id embeds subject_id", line(request_id=f"erase-{SECRET_ID}-1"), "request_id must not contain the subject_id"),
    # Wrong types.
    case("request_id number", line(request_id=5), "request_id: must be 1 to 128 characters"),
    case("subject_id null", line(subject_id=None), "subject_id: must be a decimal integer", None),
    case("subject_id list", line(subject_id=[int(SECRET_ID)]), "subject_id: must be a decimal integer"),
    case("subject_id object", line(subject_id={"id": SECRET_ID}), "subject_id: must be a decimal integer"),
    case("subject_id true", line(subject_id=True), "subject_id: must be a decimal integer", None),
    case("subject_id false", line(subject_id=False), "subject_id: must be a decimal integer", None),
    case("subject_id float", line(subject_id=987654321.0), "subject_id: must be a decimal integer"),
    case("subject_id fraction", line(subject_id=12.5), "subject_id: must be a decimal integer", "12.5"),
    case("received_at null", line(received_at=None), "received_at: must be an ISO 8601 string", None),
    case("received_at bool", line(received_at=True), "received_at: must be an ISO 8601 string", None),
    case("source number", line(source=7), "source: must be 1 to 64 printable", None),
    # Empty, blank, long and oddly shaped ids.
    case("empty subject_id", line(subject_id=""), f"subject_id: {SUBJECT_RULE}", None),
    case("blank subject_id", line(subject_id="   "), f"subject_id: {SUBJECT_RULE}", None),
    case("empty request_id", line(request_id=""), f"request_id: {REQUEST_RULE}"),
    case("blank request_id", line(request_id=" \t "), f"request_id: {REQUEST_RULE}"),
    case("subject_id 27 digits", line(subject_id=SECRET_ID * 3), f"subject_id: {SUBJECT_RULE}", SECRET_ID * 3),
    case("subject_id huge integer", line(subject_id=int(SECRET_ID * 3)), f"subject_id: {SUBJECT_RULE}", SECRET_ID * 3),
    case("request_id 129 characters", line(request_id="r" * 129), f"request_id: {REQUEST_RULE}", "r" * 129),
    case("source 65 characters", line(source="w" * 65), "source: must be 1 to 64 printable", "w" * 65),
    case("empty source", line(source=""), "source: must be 1 to 64 printable", None),
    # Control characters, escaped inside JSON strings.
    case("subject_id NUL", line(subject_id=SECRET_ID + "\x00"), f"subject_id: {SUBJECT_RULE}"),
    case("subject_id newline", line(subject_id="987\n654321"), f"subject_id: {SUBJECT_RULE}", "987\n654321"),
    case("request_id bell", line(request_id="r-\x07x"), f"request_id: {REQUEST_RULE}", "r-\x07x"),
    case("source escape", line(source="we\x1bb"), f"source: {SOURCE_RULE}", "we\x1bb"),
    case("lone surrogate", line(subject_id="\ud800"), "subject_id: must be a decimal integer", None),
    # Path-like ids.
    case("subject_id dot-dot", line(subject_id="../" + SECRET_ID), f"subject_id: {SUBJECT_RULE}", "../" + SECRET_ID),
    case("subject_id absolute path", line(subject_id="/etc/passwd"), f"subject_id: {SUBJECT_RULE}", "/etc/passwd"),
    case("subject_id drive path", line(subject_id="C:\\Windows\\" + SECRET_ID), f"subject_id: {SUBJECT_RULE}", "C:\\"),
    case("request_id dot-dot", line(request_id="../../etc/passwd"), f"request_id: {REQUEST_RULE}", "../"),
    # Numbers that are not canonical subject keys.
    case("negative integer", line(subject_id=-int(SECRET_ID)), f"subject_id: {SUBJECT_RULE}"),
    case("negative string", line(subject_id="-" + SECRET_ID), f"subject_id: {SUBJECT_RULE}"),
    case("plus sign", line(subject_id="+" + SECRET_ID), f"subject_id: {SUBJECT_RULE}"),
    case("decimal string", line(subject_id=SECRET_ID + ".0"), f"subject_id: {SUBJECT_RULE}"),
    case("exponent string", line(subject_id="9.87e8"), f"subject_id: {SUBJECT_RULE}", "9.87e8"),
    case("hex string", line(subject_id="0x3ade68b1"), f"subject_id: {SUBJECT_RULE}", "0x3ade68b1"),
    case("fullwidth digits", line(subject_id="９８７６５４３２１"), f"subject_id: {SUBJECT_RULE}", "９８７"),
    # Timestamps.
    case("far future", line(received_at="2999-01-01T00:00:00Z"), "received_at: timestamp is in the future"),
    case("two hours ahead", line(received_at=in_hours(2)), "timestamp is in the future"),
    case("no time zone", line(received_at="2026-01-30T10:00:00"), "timestamp must carry a time zone"),
    case("date only", line(received_at="2026-01-30"), "timestamp must carry a time zone"),
    case("day first", line(received_at="30/01/2026 10:00"), "received_at: must be an ISO 8601 string"),
    case("RFC 2822", line(received_at="Fri, 30 Jan 2026 10:00:00 GMT"), "received_at: must be an ISO 8601 string"),
    case("empty timestamp", line(received_at=""), "received_at: must be an ISO 8601 string"),
    case("before year 1 in UTC", line(received_at="0001-01-01T00:00:00+01:00"), "received_at"),
    case("after year 9999 in UTC", line(received_at="9999-12-31T23:30:00-01:00"), "received_at"),
    case("Unix seconds", line(received_at=1769767200), "received_at"),
    case("Unix milliseconds", line(received_at=1769767200000), "received_at"),
    case("Unix seconds as text", line(received_at="1769767200"), "received_at"),
    # Sizes and encodings.
    case("line one byte too long", padded_to(MAX_LINE_BYTES + 1), f"line longer than {MAX_LINE_BYTES} bytes"),
    case("line 5 kB", line(request_id="r-" + "x" * 5000), f"line longer than {MAX_LINE_BYTES} bytes"),
    case("Latin-1 byte", line().replace(b'"web"', b'"w\xe9b"'), "line is not valid UTF-8"),
    case("UTF-16 BOM bytes", b"\xff\xfe" + line(), "line is not valid UTF-8"),
    case("UTF-8 BOM inside file", b"\xef\xbb\xbf" + line(), "invalid JSON: Unexpected UTF-8 BOM"),
    # Ambiguous objects.
    case("duplicate key", line()[:-1] + b', "subject_id": "125027"}', "a field appears twice", "125027"),
    case("year 1900", line(received_at="1900-01-01T00:00:00Z"), "days in the past"),
    # Line separators that JSON Lines does not split on but str.splitlines() does.
    case("raw U+2028", raw_line(source="we\u2028b"), "source"),
    case("raw U+0085", raw_line(source="we\u0085b"), "source"),
    case("raw record separator", line().replace(b'"web"', b'"we\x1eb"'), "invalid JSON"),
]

NORMALISED = [
    pytest.param(line(subject_id="000" + SECRET_ID), "subject_id", SECRET_ID, id="leading zeros"),
    pytest.param(line(subject_id=f"  {SECRET_ID} "), "subject_id", SECRET_ID, id="surrounding spaces"),
    pytest.param(line(subject_id=f"\t{SECRET_ID}\u00a0"), "subject_id", SECRET_ID, id="tab and no-break space"),
    pytest.param(line(subject_id=int(SECRET_ID)), "subject_id", SECRET_ID, id="integer subject_id"),
    pytest.param(line(subject_id="0000"), "subject_id", "0", id="all zeros"),
    pytest.param(line(request_id="  r-x  "), "request_id", "r-x", id="request_id spaces"),
    pytest.param(line(source=" web "), "source", "web", id="source spaces"),
    pytest.param(line(received_at="2026-01-30T12:00:00+02:00"), "received_at",
                 datetime(2026, 1, 30, 10, tzinfo=UTC), id="offset to UTC"),
    pytest.param(line(received_at="2026-01-30t10:00:00z"), "received_at",
                 datetime(2026, 1, 30, 10, tzinfo=UTC), id="lowercase separators"),
    pytest.param(line(received_at="2026-01-30 10:00:00Z"), "received_at",
                 datetime(2026, 1, 30, 10, tzinfo=UTC), id="space separator"),
    pytest.param(padded_to(MAX_LINE_BYTES), "request_id", "r-pad", id="line at size limit"),
]


@pytest.fixture
def queue_ws(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    ws.make_dirs()
    return ws


def write_incoming(ws: Workspace, lines: list[bytes], name: str = FILE_NAME, newline: bytes = b"\n"):
    path = ws.incoming_dir / name
    path.write_bytes(b"".join(item + newline for item in lines))
    return path


def stored_quarantine(ws: Workspace, name: str = FILE_NAME) -> list[dict]:
    path = ws.quarantine_dir / name
    if not path.exists():
        return []
    return [json.loads(text) for text in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()]


def request_ids(requests) -> list[str]:
    return [item.request.request_id for item in requests]


@pytest.mark.parametrize("case", QUARANTINED)
def test_malformed_line_quarantined(queue_ws, case: Quarantined):
    ws = queue_ws
    path = write_incoming(ws, [BEFORE, case.line, AFTER])

    requests, records = LocalQueue(ws).read_pending()

    assert request_ids(requests) == ["ok-1", "ok-2"], "the valid lines of the file are still processed"
    assert [record.line_number for record in records] == [2]
    assert case.reason in records[0].reason
    if case.secret is not None:
        assert case.secret not in records[0].reason, "the reason must not contain the submitted value"

    stored = stored_quarantine(ws)
    assert [item["line"] for item in stored] == [2]
    assert stored[0]["reason"] == records[0].reason
    assert stored[0]["raw"].encode("utf-8", errors="surrogateescape") == case.line, "the raw line is kept"

    remaining = [json.loads(text)["request_id"] for text in path.read_text().splitlines()]
    assert remaining == ["ok-1", "ok-2"], "the incoming file keeps only the valid lines"


@pytest.mark.parametrize(("text", "field", "expected"), NORMALISED)
def test_odd_line_normalised(queue_ws, text: bytes, field: str, expected):
    ws = queue_ws
    write_incoming(ws, [BEFORE, text, AFTER])

    requests, records = LocalQueue(ws).read_pending()

    assert records == []
    assert not ws.quarantine_dir.joinpath(FILE_NAME).exists()
    assert len(requests) == 3
    assert getattr(requests[1].request, field) == expected


def test_utf8_bom_file_keeps_first_line(queue_ws):
    # Editors such as Notepad start a UTF-8 file with a byte order mark; the queue drops it.
    ws = queue_ws
    (ws.incoming_dir / FILE_NAME).write_bytes(b"\xef\xbb\xbf" + BEFORE + b"\n" + AFTER + b"\n")

    requests, records = LocalQueue(ws).read_pending()

    assert request_ids(requests) == ["ok-1", "ok-2"]
    assert records == []


def test_utf16_file_quarantines_every_line(queue_ws):
    ws = queue_ws
    text = (BEFORE + b"\n" + AFTER + b"\n").decode()
    (ws.incoming_dir / FILE_NAME).write_text(text, encoding="utf-16")

    requests, records = LocalQueue(ws).read_pending()

    assert requests == []
    # UTF-16 puts a NUL after each newline, so the last "line" is a single NUL.
    assert [(record.line_number, record.reason) for record in records] == [
        (1, "line is not valid UTF-8"),
        (2, "invalid JSON: Expecting value (column 1)"),
        (3, "invalid JSON: Expecting value (column 1)"),
    ]
    assert len(stored_quarantine(ws)) == 3


def test_crlf_line_endings_accepted(queue_ws):
    ws = queue_ws
    path = write_incoming(ws, [BEFORE, b"{broken", AFTER], newline=b"\r\n")

    requests, records = LocalQueue(ws).read_pending()

    assert request_ids(requests) == ["ok-1", "ok-2"]
    assert [record.line_number for record in records] == [2]
    assert stored_quarantine(ws)[0]["raw"] == "{broken", "the raw line is stored without its CR"
    assert b"\r" not in path.read_bytes()


def test_blank_lines_skipped_but_counted(queue_ws):
    ws = queue_ws
    write_incoming(ws, [b"", BEFORE, b"   ", b"\t", b"{broken", b"", AFTER, b""])

    requests, records = LocalQueue(ws).read_pending()

    assert request_ids(requests) == ["ok-1", "ok-2"]
    assert [record.line_number for record in records] == [5], "line numbers count the blank lines"


def test_empty_file_reads_nothing(queue_ws):
    ws = queue_ws
    write_incoming(ws, [])

    requests, records = LocalQueue(ws).read_pending()

    assert requests == []
    assert records == []


def test_50_mb_line_quarantined_whole(queue_ws):
    # The local queue has no limit on the file size: it reads the whole file into memory.
    # A 50 MB line is quarantined by its size, and its raw text is copied into quarantine.
    ws = queue_ws
    huge = b'{"request_id": "' + b"A" * (50 * 1024 * 1024) + b'"}'
    write_incoming(ws, [BEFORE, huge, AFTER])

    requests, records = LocalQueue(ws).read_pending()

    assert request_ids(requests) == ["ok-1", "ok-2"]
    assert [record.line_number for record in records] == [2]
    assert records[0].reason == f"line longer than {MAX_LINE_BYTES} bytes"
    quarantine = ws.quarantine_dir / FILE_NAME
    assert quarantine.stat().st_size > len(huge)
    quarantine.unlink()  # pytest keeps the temporary directories of recent sessions


def test_several_files_read_independently(queue_ws):
    ws = queue_ws
    write_incoming(ws, [BEFORE, b"{broken"], name="a.jsonl")
    write_incoming(ws, [b"[]", AFTER], name="b.jsonl")

    requests, records = LocalQueue(ws).read_pending()

    assert [(item.request.request_id, item.source_ref) for item in requests] == [("ok-1", "a.jsonl"),
                                                                                  ("ok-2", "b.jsonl")]
    assert [(record.source_ref, record.line_number) for record in records] == [("a.jsonl", 2), ("b.jsonl", 1)]
    assert [item["line"] for item in stored_quarantine(ws, "a.jsonl")] == [2]
    assert [item["line"] for item in stored_quarantine(ws, "b.jsonl")] == [1]


def test_enqueue_lines_splits_valid_invalid(queue_ws):
    ws = queue_ws
    lines = [BEFORE.decode(), line(subject_id="/etc/passwd").decode(), "", AFTER.decode(), "\udcff{}"]

    path, records, accepted = LocalQueue(ws).enqueue_lines(lines)

    assert accepted == 2
    assert [(record.line_number, record.source_ref) for record in records] == [(2, path.name), (5, path.name)]
    assert f"subject_id: {SUBJECT_RULE}" in records[0].reason
    assert records[1].reason == "line is not valid UTF-8"
    assert [json.loads(text)["request_id"] for text in path.read_text().splitlines()] == ["ok-1", "ok-2"]
    assert [item["line"] for item in stored_quarantine(ws, path.name)] == [2, 5]


def test_enqueue_lines_all_invalid(queue_ws):
    ws = queue_ws

    path, records, accepted = LocalQueue(ws).enqueue_lines(["{broken", "[]"])

    assert path is None
    assert accepted == 0
    assert list(ws.incoming_dir.iterdir()) == []
    assert len(records) == 2
    assert len(list(ws.quarantine_dir.glob("*.jsonl"))) == 1


# Duplicates are collapsed by ingest, against the ledger.

HASHER = SubjectHasher(b"malformed-test-key-0123456789")


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield ledger
    ledger.dispose()


def ledger_requests(ledger: Ledger) -> list[DeletionRequest]:
    with ledger.session() as s:
        return list(s.scalars(select(DeletionRequest).order_by(DeletionRequest.request_id)))


def json_line(request_id: str, subject_id: str) -> bytes:
    return line(request_id=request_id, subject_id=subject_id)


def test_duplicate_in_one_file_collapses(queue_ws, ledger):
    ws = queue_ws
    write_incoming(ws, [json_line("d-1", "125024"), json_line("d-2", "125026"), json_line("d-1", "125024")])

    result = ingest(ws, ledger, HASHER, 30)

    assert [r.request_id for r in ledger_requests(ledger)] == ["d-1", "d-2"]
    assert result.new_requests == 2
    assert result.duplicates == 1
    assert ledger.get_batch(result.batch_id).request_count == 2


def test_duplicate_across_files_collapses(queue_ws, ledger):
    ws = queue_ws
    write_incoming(ws, [json_line("d-1", "125024")], name="a.jsonl")
    write_incoming(ws, [json_line("d-1", "125024"), json_line("d-2", "125026")], name="b.jsonl")

    result = ingest(ws, ledger, HASHER, 30)

    stored = ledger_requests(ledger)
    assert [(r.request_id, r.source_ref) for r in stored] == [("d-1", "local:a.jsonl"), ("d-2", "local:b.jsonl")]
    assert result.duplicates == 1


def test_duplicate_after_close_collapses(queue_ws, ledger):
    ws = queue_ws
    write_incoming(ws, [json_line("d-1", "125024")], name="a.jsonl")
    first = ingest(ws, ledger, HASHER, 30)
    with ledger.session() as s:
        s.get(DeletionRequest, "d-1").state = RequestState.COMPLETED
    write_incoming(ws, [json_line("d-1", "125024")], name="b.jsonl")

    second = ingest(ws, ledger, HASHER, 30)

    # a.jsonl is still in incoming: only a committed batch acknowledges its files.
    assert len(ledger_requests(ledger)) == 1
    assert first.batch_id is not None
    assert second.batch_id is None
    assert second.already_closed == 2
    assert sorted(p.name for p in ws.done_dir.iterdir()) == ["a.jsonl", "b.jsonl"], "closed requests are acknowledged"
    assert list(ws.incoming_dir.iterdir()) == []


def test_conflicting_duplicate_not_dropped(queue_ws, ledger):
    ws = queue_ws
    write_incoming(ws, [json_line("d-1", "125024")], name="a.jsonl")
    write_incoming(ws, [json_line("d-1", "125026")], name="b.jsonl")

    ingest(ws, ledger, HASHER, 30)

    recorded = {r.subject_hash for r in ledger_requests(ledger)}
    with ledger.session() as s:
        quarantined = [(q.source_ref, q.line_number) for q in s.scalars(select(QuarantinedLine))]
    assert HASHER.hash("125026") in recorded or ("b.jsonl", 1) in quarantined


def test_same_subject_twice_one_batch(queue_ws, ledger):
    ws = queue_ws
    write_incoming(ws, [json_line("s-1", "125024"), json_line("s-2", "0125024"), json_line("s-3", "125026")])

    result = ingest(ws, ledger, HASHER, 30)

    stored = ledger_requests(ledger)
    assert [r.request_id for r in stored] == ["s-1", "s-2", "s-3"]
    assert stored[0].subject_hash == stored[1].subject_hash
    assert stored[0].subject_hash == HASHER.hash("125024")
    assert result.subject_hashes == sorted({HASHER.hash("125024"), HASHER.hash("125026")})
    batch = ledger.get_batch(result.batch_id)
    assert batch.request_count == 3
    assert batch.subject_count == 2


def test_ingest_records_quarantine_rows(queue_ws, ledger):
    ws = queue_ws
    write_incoming(ws, [BEFORE, line(subject_id="/etc/passwd"), b"{broken", AFTER])

    result = ingest(ws, ledger, HASHER, 30)

    with ledger.session() as s:
        quarantined = s.scalars(select(QuarantinedLine).order_by(QuarantinedLine.line_number))
        rows = [(q.source_ref, q.line_number, q.reason) for q in quarantined]
        count, problems = verify_chain(s)
        journal = s.scalar(select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == "quarantine"))
    assert result.quarantined == 2
    assert [(source_ref, number) for source_ref, number, _ in rows] == [(FILE_NAME, 2), (FILE_NAME, 3)]
    assert f"subject_id: {SUBJECT_RULE}" in rows[0][2]
    assert "/etc/passwd" not in rows[0][2]
    assert rows[1][2].startswith("invalid JSON")
    assert journal == 2, "each quarantine row has its journal entry"
    assert problems == []


# One run of the nightly flow over a file that mixes every kind of line.

@pytest.mark.usefixtures("prefect_harness")
def test_flow_survives_malformed_lines(workspace):
    from flows.nightly import nightly_deletion_run

    ws = workspace
    subjects = train_subjects(ws, 2)
    unknown = 999999999  # no subject of the dataset has this key
    malformed = [
        "{not json",
        json.dumps({"request_id": "m-1", "received_at": RECEIVED, "source": "web"}),
        json.dumps(request("m-2", "/etc/passwd")),
        json.dumps(request("m-3", f"{subjects[0]}x")),
        json.dumps({**request("m-4", subjects[1]), "received_at": "2999-01-01T00:00:00Z"}),
        json.dumps({**request("m-5", subjects[0]), "note": "extra"}),
        json.dumps({**request("m-6", subjects[1]), "received_at": "2026-01-30T10:00:00"}),
        "[1, 2, 3]",
    ]
    lines = [request("v-1", subjects[0]), *malformed[:4], request("u-1", unknown), "",
             *malformed[4:], request("v-2", str(subjects[1]))]
    write_requests(ws, "mixed.jsonl", lines)
    malformed_numbers = [2, 3, 4, 5, 8, 9, 10, 11]

    summary = nightly_deletion_run(workspace=str(ws.root))

    assert summary["status"] == "completed"
    assert summary["request_count"] == 3
    assert summary["subject_count"] == 3
    assert summary["no_data_held"] == 1

    ledger = Ledger(ws.ledger_url)
    with ledger.session() as s:
        states = {r.request_id: r.state for r in s.scalars(select(DeletionRequest))}
        rows = [(q.source_ref, q.line_number, q.reason)
                for q in s.scalars(select(QuarantinedLine).order_by(QuarantinedLine.line_number))]
        batch = s.get(Batch, summary["batch_id"])
        unknown_entries = [json.loads(e.payload) for e in s.scalars(
            select(LedgerEntry).where(LedgerEntry.subject == "u-1").order_by(LedgerEntry.seq))]
        _, problems = verify_chain(s)
    ledger.dispose()

    assert states == {"v-1": RequestState.COMPLETED, "v-2": RequestState.COMPLETED, "u-1": RequestState.NO_DATA_HELD}
    assert batch.request_count == 3
    assert unknown_entries[-1]["state"] == "no_data_held", "the unknown subject's closing is in the journal"
    assert problems == []

    assert [(ref, number) for ref, number, _ in rows] == [("mixed.jsonl", n) for n in malformed_numbers]
    assert all(reason for _, _, reason in rows)
    stored = stored_quarantine(ws, "mixed.jsonl")
    assert [(item["line"], item["reason"]) for item in stored] == [(number, reason) for _, number, reason in rows]
    for _, _, reason in rows:
        for value in (str(subjects[0]), str(subjects[1]), "/etc/passwd"):
            assert value not in reason, "a quarantine reason contains a submitted value"

    assert list(ws.incoming_dir.iterdir()) == []
    done = [json.loads(text) for text in (ws.done_dir / "mixed.jsonl").read_text().splitlines()]
    assert [item["request_id"] for item in done] == ["v-1", "u-1", "v-2"]
    assert all("subject_id" not in item for item in done)
