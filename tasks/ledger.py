"""The request ledger: deletion requests, batches, quarantined lines and tombstones.

Subject ids are stored only as HMAC-SHA256 hashes. SQLite in the embedded default,
any SQLAlchemy URL (PostgreSQL in production) otherwise.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Enum, ForeignKey, Integer, String, Text, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class RequestState(str, enum.Enum):
    PENDING = "pending"
    IN_BATCH = "in_batch"
    COMPLETED = "completed"
    NO_DATA_HELD = "no_data_held"

    @property
    def is_closed(self) -> bool:
        return self in (RequestState.COMPLETED, RequestState.NO_DATA_HELD)


class BatchState(str, enum.Enum):
    OPEN = "open"
    CANDIDATE = "candidate"
    ROLLED_BACK = "rolled_back"
    COMMITTED = "committed"
    REGISTERED = "registered"
    RETIRED = "retired"
    ACKNOWLEDGED = "acknowledged"

    @property
    def before_commit(self) -> bool:
        """A crash in this state is rolled back: the data version was not committed."""
        return self in (BatchState.OPEN, BatchState.CANDIDATE)

    @property
    def after_commit(self) -> bool:
        """A crash in this state is finished by the next run: the erasure is permanent."""
        return self in (BatchState.COMMITTED, BatchState.REGISTERED, BatchState.RETIRED)


class DeletionRequest(Base):
    __tablename__ = "requests"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    subject_hash: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[str] = mapped_column(String(64))
    source_ref: Mapped[str] = mapped_column(String(512))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deadline: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    state: Mapped[RequestState] = mapped_column(Enum(RequestState, native_enum=False, length=16))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.batch_id"), nullable=True)
    rows_removed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Batch(Base):
    __tablename__ = "batches"

    batch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[BatchState] = mapped_column(Enum(BatchState, native_enum=False, length=16))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    request_count: Mapped[int] = mapped_column(Integer, default=0)
    subject_count: Mapped[int] = mapped_column(Integer, default=0)
    rows_removed: Mapped[int] = mapped_column(Integer, default=0)
    subject_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    data_md5_before: Mapped[str | None] = mapped_column(String(64), nullable=True)
    data_md5_after: Mapped[str | None] = mapped_column(String(64), nullable=True)
    git_rev_after: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version_before: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model_version_after: Mapped[str | None] = mapped_column(String(32), nullable=True)
    method: Mapped[str | None] = mapped_column(String(64), nullable=True)
    candidate_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    candidate_model_uri: Mapped[str | None] = mapped_column(String(512), nullable=True)
    # relpath -> md5 of the old shard objects that held a batch subject, deleted at retire.
    affected_objects: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    certificate_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class QuarantinedLine(Base):
    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source_ref: Mapped[str] = mapped_column(String(512))
    line_number: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    quarantined_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Tombstone(Base):
    __tablename__ = "tombstones"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.batch_id"))
    object_md5: Mapped[str] = mapped_column(String(64))
    relpath: Mapped[str] = mapped_column(String(512))
    stores: Mapped[list] = mapped_column(JSON)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LedgerInfo(Base):
    """Key-value facts about the ledger itself, such as the id a workspace checks on every open."""

    __tablename__ = "ledger_info"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


LEDGER_ID = "ledger_id"


# Columns each journal entry snapshots: what an auditor compares with the live rows.
AUDITED_COLUMNS = {
    "requests": ("subject_hash", "source", "source_ref", "received_at", "deadline", "state", "batch_id",
                 "rows_removed", "completed_at"),
    "batches": ("state", "request_count", "subject_count", "rows_removed", "subject_digest", "data_md5_before",
                "data_md5_after", "git_rev_after", "model_version_before", "model_version_after", "method",
                "certificate_digest", "finished_at"),
    "quarantine": ("source_ref", "line_number", "reason"),
    "tombstones": ("batch_id", "object_md5", "relpath", "stores"),
}


def audited_snapshot(row: Base) -> tuple[str, str, dict]:
    """Return (kind, subject, payload) of the journal entry that records this row's state."""
    table = row.__tablename__
    payload = {}
    for column in AUDITED_COLUMNS[table]:
        value = getattr(row, column)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, datetime):
            # Naive UTC, whatever zone the database session returns aware values in.
            if value.tzinfo is not None:
                value = value.astimezone(UTC).replace(tzinfo=None)
            value = value.isoformat(timespec="seconds")
        payload[column] = value
    subject = {"requests": lambda: row.request_id, "batches": lambda: row.batch_id,
               "quarantine": lambda: f"{row.source_ref}#{row.line_number}",
               "tombstones": lambda: f"{row.batch_id}:{row.object_md5}"}[table]()
    return table, subject, payload


def _journal_changes(session: Session, flush_context, instances) -> None:
    """Append a journal entry for every audited row this flush inserts or changes."""
    from tasks.chain import append

    rows = [r for r in list(session.new) + list(session.dirty)
            if getattr(r, "__tablename__", None) in AUDITED_COLUMNS and session.is_modified(r)]
    with session.no_autoflush:
        for row in rows:
            kind, subject, payload = audited_snapshot(row)
            append(session, kind, subject, payload)


class Ledger:
    """Session factory over one ledger database; creates the tables on first use.

    Every insert or change of a request, batch, quarantined line or tombstone also
    appends an entry to the hash-chained journal, in the same transaction.
    """

    def __init__(self, url: str) -> None:
        import tasks.chain  # noqa: F401 - registers the journal table on Base.metadata
        import tasks.lock  # noqa: F401 - registers the run-lock table

        self.url = url
        self.engine = create_engine(url)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._sessions, "before_flush", _journal_changes)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session that commits on success and rolls back on any exception."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

    def ledger_id(self) -> str | None:
        """Return the id that `assign_id` gave this ledger, or None for a ledger that has none yet."""
        with self.session() as s:
            info = s.get(LedgerInfo, LEDGER_ID)
            return info.value if info else None

    def assign_id(self) -> str:
        """Give the ledger a random id unless it has one, and return the id."""
        with self.session() as s:
            info = s.get(LedgerInfo, LEDGER_ID)
            if info is None:
                info = LedgerInfo(key=LEDGER_ID, value=uuid.uuid4().hex)
                s.add(info)
            return info.value

    def pending_requests(self) -> list[DeletionRequest]:
        with self.session() as s:
            return list(s.scalars(select(DeletionRequest).where(DeletionRequest.state == RequestState.PENDING)))

    def get_batch(self, batch_id: str) -> Batch | None:
        with self.session() as s:
            return s.get(Batch, batch_id)
