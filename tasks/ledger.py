"""The request ledger: deletion requests, batches, quarantined lines and tombstones.

Subject ids are stored only as HMAC-SHA256 hashes. SQLite in the embedded default,
any SQLAlchemy URL (PostgreSQL in production) otherwise.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Enum, ForeignKey, Integer, String, Text, create_engine, select
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
    ROLLED_BACK = "rolled_back"
    COMMITTED = "committed"
    REGISTERED = "registered"
    RETIRED = "retired"
    ACKNOWLEDGED = "acknowledged"


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


class Ledger:
    """Session factory over one ledger database; creates the tables on first use."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session that commits on success and rolls back on any exception."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

    def pending_requests(self) -> list[DeletionRequest]:
        with self.session() as s:
            return list(s.scalars(select(DeletionRequest).where(DeletionRequest.state == RequestState.PENDING)))

    def requests_of(self, batch_id: str) -> list[DeletionRequest]:
        with self.session() as s:
            return list(s.scalars(select(DeletionRequest).where(DeletionRequest.batch_id == batch_id)))

    def open_batches(self) -> list[Batch]:
        """Batches a crash left before commit: they must be rolled back before a new run."""
        with self.session() as s:
            return list(s.scalars(select(Batch).where(Batch.state == BatchState.OPEN)))

    def get_batch(self, batch_id: str) -> Batch | None:
        with self.session() as s:
            return s.get(Batch, batch_id)
