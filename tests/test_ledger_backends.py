"""The ledger, its journal, the run lock and the status queries on SQLite and PostgreSQL.

The PostgreSQL cases use a database created for this test session on 127.0.0.1:5432
and dropped at its end. They fail, not skip, when that server is not reachable,
because CI provides it.
"""

from __future__ import annotations

import logging
import os
import select as io_select
import socket
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, inspect, select, text

from tasks.chain import GENESIS, LedgerEntry, verify_chain
from tasks.errors import RunLockedError
from tasks.hashing import SubjectHasher
from tasks.ledger import (Base, Batch, BatchState, DeletionRequest, Ledger, QuarantinedLine, RequestState, Tombstone,
                          utcnow)
from tasks.lock import RunLock, acquire, release, run_lock
from tasks.status import near_deadline, open_requests, recently_completed
from tests import stores

REPO_ROOT = Path(__file__).resolve().parent.parent
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
BACKENDS = ["sqlite", "postgresql"]
HASHER = SubjectHasher(b"ledger-backend-test-key-0123456789")
HOST = socket.gethostname()
# Seconds to wait for the lock-holding child process to print READY.
CHILD_START_TIMEOUT = 60

# The child takes the lock as a separate process would, then sleeps until it is killed.
LOCK_HOLDER = """
import sys, time
from tasks.ledger import Ledger
from tasks.lock import acquire
acquire(Ledger(sys.argv[1]), "other-process")
print("READY", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="session")
def postgres_database():
    """Create a uniquely named PostgreSQL database for this session and drop it at the end."""
    with stores.postgres_database("lethe_test") as name:
        yield name


def empty_postgres_url(name: str, query: str = "") -> str:
    """Return the URL of the session database after dropping every ledger table in it."""
    url = PG_URL.format(name=name) + query
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    engine.dispose()
    return url


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def ledger_url(backend, request, tmp_path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return empty_postgres_url(request.getfixturevalue("postgres_database"))


@pytest.fixture
def ledger(ledger_url):
    ledger = Ledger(ledger_url)
    yield ledger
    ledger.dispose()


@contextmanager
def lock_holder_process(url: str):
    """Run a separate Python process that holds the run lock of `url`, and kill it by its pid on exit."""
    process = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, url], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = io_select.select([process.stdout], [], [], CHILD_START_TIMEOUT)
        first_line = process.stdout.readline().strip() if ready else ""
        if first_line != "READY":
            process.kill()
            _, errors = process.communicate(timeout=30)
            pytest.fail(f"The lock-holding process did not print READY within {CHILD_START_TIMEOUT} s "
                        f"(its first line was {first_line!r}). Its stderr:\n{errors}")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()


def dead_pid() -> int:
    """Return the pid of a process that has already exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def new_request(request_id: str, subject_id: str, **columns) -> DeletionRequest:
    now = utcnow()
    values = {"subject_hash": HASHER.hash(subject_id), "source": "test", "source_ref": "local:test.jsonl",
              "received_at": now, "deadline": now + timedelta(days=30), "state": RequestState.PENDING}
    return DeletionRequest(request_id=request_id, **{**values, **columns})


def journal(ledger: Ledger) -> list[LedgerEntry]:
    with ledger.session() as s:
        return list(s.scalars(select(LedgerEntry).order_by(LedgerEntry.seq)))


def chain_problems(ledger: Ledger) -> list[tuple[int, str]]:
    with ledger.session() as s:
        _, problems = verify_chain(s)
    return [(p.seq, p.message) for p in problems]


def record_batch_history(ledger: Ledger) -> None:
    """Write a batch's life as the pipeline does: open, requests, quarantine, tombstone, close."""
    with ledger.session() as s:
        s.add(Batch(batch_id="b-1", state=BatchState.OPEN, request_count=2, subject_count=2, subject_digest="d" * 64))
        s.flush()
        s.add(new_request("r-1", "125024", state=RequestState.IN_BATCH, batch_id="b-1"))
        s.add(new_request("r-2", "125026", state=RequestState.IN_BATCH, batch_id="b-1"))
        s.add(QuarantinedLine(source_ref="test.jsonl", line_number=3, reason="invalid JSON: Expecting value at column 1"))
    with ledger.session() as s:
        s.add(Tombstone(batch_id="b-1", object_md5="a" * 32, relpath="shard-00.parquet", stores=["cache", "remote"]))
        s.get(Batch, "b-1").state = BatchState.COMMITTED
    with ledger.session() as s:
        now = utcnow()
        for request_id in ("r-1", "r-2"):
            row = s.get(DeletionRequest, request_id)
            row.state = RequestState.COMPLETED
            row.rows_removed = 5
            row.completed_at = now
        s.get(Batch, "b-1").state = BatchState.ACKNOWLEDGED


# Creating the ledger and its journal.

def test_ledger_creates_every_table(ledger):
    tables = set(inspect(ledger.engine).get_table_names())

    assert {"requests", "batches", "quarantine", "tombstones", "ledger_entries", "run_locks"} <= tables


def test_ledger_reopens_existing_tables(ledger, ledger_url):
    record_batch_history(ledger)

    reopened = Ledger(ledger_url)
    try:
        with reopened.session() as s:
            assert s.get(DeletionRequest, "r-1").state == RequestState.COMPLETED
            assert s.get(Batch, "b-1").state == BatchState.ACKNOWLEDGED
    finally:
        reopened.dispose()


def test_changes_append_chained_entries(ledger):
    record_batch_history(ledger)

    entries = journal(ledger)

    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert entries[0].prev_hash == GENESIS
    for previous, entry in zip(entries, entries[1:]):
        assert entry.prev_hash == previous.entry_hash, f"entry {entry.seq} does not chain to {previous.seq}"
    assert Counter((e.kind, e.subject) for e in entries) == Counter({
        ("batches", "b-1"): 3, ("requests", "r-1"): 2, ("requests", "r-2"): 2,
        ("quarantine", "test.jsonl#3"): 1, ("tombstones", "b-1:" + "a" * 32): 1,
    })
    assert chain_problems(ledger) == []


def test_unchanged_flush_appends_nothing(ledger):
    record_batch_history(ledger)
    before = len(journal(ledger))

    with ledger.session() as s:
        s.get(DeletionRequest, "r-1").state = RequestState.COMPLETED  # the value it already has

    assert len(journal(ledger)) == before


def test_chain_survives_reconnect(ledger, ledger_url):
    # Timestamps are hashed as read back, so a fresh engine must read back the same values.
    record_batch_history(ledger)
    ledger.dispose()

    reopened = Ledger(ledger_url)
    try:
        with reopened.session() as s:
            count, problems = verify_chain(s)
    finally:
        reopened.dispose()
    assert count == len(journal(ledger))
    assert problems == []


CHAIN_TAMPERING = [
    pytest.param("UPDATE ledger_entries SET payload = payload || ' ' WHERE seq = 7",
                 (7, "content does not match its hash: the entry was edited"), id="edited payload"),
    pytest.param("UPDATE ledger_entries SET subject = 'r-9' WHERE seq = 2",
                 (2, "content does not match its hash: the entry was edited"), id="edited subject"),
    pytest.param("DELETE FROM ledger_entries WHERE seq = 4",
                 (5, "entry 4 is missing (next present is 5)"), id="deleted entry"),
    pytest.param("UPDATE ledger_entries SET prev_hash = entry_hash WHERE seq = 3",
                 (3, "prev_hash does not match the previous entry: an entry was removed or changed"), id="relinked entry"),
]


@pytest.mark.parametrize(("statement", "problem"), CHAIN_TAMPERING)
def test_chain_reports_tampered_entry(ledger, statement: str, problem: tuple[int, str]):
    record_batch_history(ledger)

    with ledger.engine.begin() as connection:
        connection.execute(text(statement))

    assert problem in chain_problems(ledger)


def test_chain_verifies_non_utc_session(postgres_database):
    url = empty_postgres_url(postgres_database, "?options=-c%20timezone%3DEurope/Berlin")
    ledger = Ledger(url)
    try:
        record_batch_history(ledger)
        problems = chain_problems(ledger)
    finally:
        ledger.dispose()

    assert problems == []


# The run lock.

def lock_row(ledger: Ledger) -> RunLock | None:
    with ledger.session() as s:
        return s.get(RunLock, "workspace")


def test_second_holder_raises(ledger):
    acquire(ledger, "holder-a")

    with pytest.raises(RunLockedError) as info:
        acquire(ledger, "holder-b")

    message = str(info.value)
    assert f"Another run (holder-a, pid {os.getpid()} on {HOST}, started " in message
    assert "holds the lock of this workspace" in message
    assert "this run changed nothing" in message
    assert info.value.exit_code == 3
    assert lock_row(ledger).holder == "holder-a"


def test_release_then_reacquire(ledger):
    acquire(ledger, "holder-a")
    release(ledger, "holder-a")

    acquire(ledger, "holder-b")

    assert lock_row(ledger).holder == "holder-b"


def test_release_by_other_holder_ignored(ledger):
    acquire(ledger, "holder-a")

    release(ledger, "holder-b")

    assert lock_row(ledger).holder == "holder-a"


def test_run_lock_releases_on_error(ledger):
    with pytest.raises(RuntimeError, match="stage failed"):
        with run_lock(ledger, "holder-a"):
            assert lock_row(ledger).holder == "holder-a"
            raise RuntimeError("stage failed")

    assert lock_row(ledger) is None


STALE_LOCKS = [
    # (host, pid: "dead", "alive" or a number, heartbeat age, taken over)
    pytest.param(HOST, "dead", timedelta(0), True, id="dead pid on this host"),
    pytest.param(HOST, "alive", timedelta(hours=7), True, id="old heartbeat on this host"),
    pytest.param(HOST, "alive", timedelta(hours=5), False, id="live pid on this host"),
    pytest.param("other-host.invalid", 1, timedelta(0), False, id="fresh lock on another host"),
    pytest.param("other-host.invalid", 1, timedelta(hours=7), True, id="old lock on another host"),
]


@pytest.mark.parametrize(("host", "pid", "age", "taken_over"), STALE_LOCKS)
def test_stale_lock_taken_over(ledger, caplog, monkeypatch, host: str, pid, age: timedelta, taken_over: bool):
    pid = {"dead": dead_pid, "alive": os.getpid}.get(pid, lambda: pid)()
    beat = utcnow() - age
    with ledger.session() as s:
        s.add(RunLock(name="workspace", holder="old-run", host=host, pid=pid, acquired_at=beat, heartbeat_at=beat))
    caplog.set_level(logging.WARNING, logger="lethe.lock")
    # The CLI's logging set-up stops `lethe` records from reaching caplog's root handler.
    monkeypatch.setattr(logging.getLogger("lethe"), "propagate", True)

    if taken_over:
        acquire(ledger, "new-run")
        assert lock_row(ledger).holder == "new-run"
        assert f"Taking over the stale run lock of old-run (pid {pid} on {host})" in caplog.text
    else:
        with pytest.raises(RunLockedError, match=f"old-run, pid {pid} on {host}"):
            acquire(ledger, "new-run")
        assert lock_row(ledger).holder == "old-run"


def test_live_process_blocks_run_lock(ledger, ledger_url):
    with lock_holder_process(ledger_url) as holder:
        with pytest.raises(RunLockedError) as info:
            with run_lock(ledger, "flow-run test"):
                pytest.fail("run_lock entered while another process holds the lock")
        assert f"Another run (other-process, pid {holder.pid} on {HOST}" in str(info.value)
        assert lock_row(ledger).pid == holder.pid

    # The holder was killed by its pid: its lock is now stale and taken over.
    with run_lock(ledger, "flow-run test"):
        assert lock_row(ledger).holder == "flow-run test"
    assert lock_row(ledger) is None


# Status queries.

def test_status_queries_select_rows(ledger):
    now = utcnow()
    with ledger.session() as s:
        s.add(Batch(batch_id="b-1", state=BatchState.OPEN))
        s.flush()
        s.add(new_request("open-later", "100001", deadline=now + timedelta(days=20)))
        s.add(new_request("open-soon", "100002", deadline=now + timedelta(days=1), state=RequestState.IN_BATCH,
                          batch_id="b-1"))
        s.add(new_request("open-overdue", "100003", deadline=now - timedelta(days=2)))
        s.add(new_request("done-yesterday", "100004", state=RequestState.COMPLETED, completed_at=now - timedelta(days=1)))
        s.add(new_request("nothing-held", "100005", state=RequestState.NO_DATA_HELD, completed_at=now - timedelta(days=2)))
        s.add(new_request("done-long-ago", "100006", state=RequestState.COMPLETED, completed_at=now - timedelta(days=30)))

    pending = open_requests(ledger)
    urgent = near_deadline(ledger)
    completed = recently_completed(ledger, days=7)

    assert [r.request_id for r in pending] == ["open-overdue", "open-soon", "open-later"], "oldest deadline first"
    assert [r.overdue for r in pending] == [True, False, False]
    assert [r.request_id for r in urgent] == ["open-overdue", "open-soon"]
    assert [r.request_id for r in completed] == ["done-yesterday", "nothing-held"], "latest completion first"
    assert [r.state for r in completed] == ["completed", "no_data_held"]
    assert [r.request_id for r in recently_completed(ledger, days=60)][-1] == "done-long-ago"


def test_status_rows_hash_subjects(ledger):
    with ledger.session() as s:
        s.add(new_request("open-1", "100001"))
        s.add(new_request("done-1", "100004", state=RequestState.COMPLETED, completed_at=utcnow()))

    rows = open_requests(ledger) + recently_completed(ledger)

    assert [(r.request_id, r.subject_hash) for r in rows] == [("open-1", HASHER.hash("100001")),
                                                              ("done-1", HASHER.hash("100004"))]
    for row in rows:
        text_without_hash = repr(row).replace(row.subject_hash, "")
        assert "100001" not in text_without_hash
        assert "100004" not in text_without_hash
        assert row.deadline.tzinfo is not None, "status rows carry aware UTC datetimes"


# `lethe run` while another process holds the lock.

@pytest.fixture
def restore_lethe_logger():
    """Undo the CLI's logging set-up, which replaces the handlers of the `lethe` logger."""
    logger = logging.getLogger("lethe")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers, logger.level, logger.propagate = saved[0], saved[1], saved[2]


def queue_snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.usefixtures("prefect_harness", "restore_lethe_logger")
def test_cli_run_locked_exits_3(backend, request, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks import versioning
    from tasks.bootstrap import commit_initial_data, create_workspace
    from tasks.settings import WorkspaceSettings
    from tasks.workspace import Workspace
    from tests.helpers import request as request_line
    from tests.helpers import write_requests

    if backend == "postgresql":
        url = empty_postgres_url(request.getfixturevalue("postgres_database"))
        monkeypatch.setenv("LETHE_LEDGER_URL", url)
    ws = Workspace(tmp_path / "ws")
    if backend == "sqlite":
        url = ws.ledger_url
    # The lock is taken before any stage reads data or models, so the workspace needs
    # its settings, keys, ledger and first data commit but no baseline model.
    settings = WorkspaceSettings()
    create_workspace(ws, settings)
    commit_initial_data(ws, settings)
    write_requests(ws, "waiting.jsonl", [request_line("w-1", 125024), "{broken"])
    head = versioning.head_rev(ws)
    queue = queue_snapshot(ws.queue_dir)
    # configure_environment would set PREFECT_HOME for the rest of the session,
    # so set it here and let monkeypatch undo it.
    monkeypatch.setenv("PREFECT_HOME", str(ws.prefect_home))

    with lock_holder_process(url) as holder:
        result = CliRunner().invoke(app, ["run", "--workspace", str(ws.root)])

    output = " ".join(result.output.split())
    assert result.exit_code == 3, result.output
    assert "holds the lock of this workspace" in output
    assert f"pid {holder.pid}" in output
    assert "this run changed nothing" in output
    assert versioning.head_rev(ws) == head
    assert queue_snapshot(ws.queue_dir) == queue
    ledger = Ledger(url)
    try:
        with ledger.session() as s:
            assert s.scalar(select(func.count()).select_from(DeletionRequest)) == 0
            assert s.scalar(select(func.count()).select_from(QuarantinedLine)) == 0
            assert s.scalar(select(func.count()).select_from(Batch)) == 0
    finally:
        ledger.dispose()
