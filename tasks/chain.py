"""The append-only, hash-chained journal of the ledger.

Every change to a request or batch is also appended here. Each entry's hash covers
its content and the previous entry's hash, so editing, inserting or deleting an entry
breaks the chain from that point on, and `verify_chain` reports where.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import DateTime, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from tasks.ledger import Base, utcnow

GENESIS = "0" * 64


class LedgerEntry(Base):
    __tablename__ = "ledger_entries"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(128), index=True)
    payload: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))


def canonical(value: object) -> str:
    """Serialise to JSON with sorted keys and no whitespace: the bytes that are hashed and signed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def entry_digest(seq: int, recorded_at: str, kind: str, subject: str, payload: str, prev_hash: str) -> str:
    body = canonical({"seq": seq, "recorded_at": recorded_at, "kind": kind, "subject": subject,
                      "payload": payload, "prev_hash": prev_hash})
    return hashlib.sha256(body.encode()).hexdigest()


def _timestamp(value: datetime) -> str:
    """Format as naive UTC: SQLite returns naive UTC, PostgreSQL aware values in the session's zone."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds")


def append(session: Session, kind: str, subject: str, payload: dict) -> LedgerEntry:
    """Append one entry after the current head, inside the caller's transaction.

    Runs inside the session's before_flush hook, so it must not flush. The head of
    entries added earlier in this session is kept in `session.info`. Callers hold the
    run lock, so there is one writer. On PostgreSQL the head row is also locked
    (FOR UPDATE), and the primary key on `seq` rejects a concurrent twin.
    """
    head = session.info.get("chain_head")
    if head is None:
        last = session.scalars(select(LedgerEntry).order_by(LedgerEntry.seq.desc()).limit(1).with_for_update()).first()
        head = (last.seq, last.entry_hash) if last else (0, GENESIS)
    seq, prev_hash = head[0] + 1, head[1]
    recorded_at = utcnow()
    body = canonical(payload)
    entry = LedgerEntry(seq=seq, recorded_at=recorded_at, kind=kind, subject=subject, payload=body,
                        prev_hash=prev_hash,
                        entry_hash=entry_digest(seq, _timestamp(recorded_at), kind, subject, body, prev_hash))
    session.add(entry)
    session.info["chain_head"] = (seq, entry.entry_hash)
    return entry


@dataclass(frozen=True)
class ChainProblem:
    seq: int
    message: str


def verify_chain(session: Session) -> tuple[int, list[ChainProblem]]:
    """Recompute every hash in order; return the entry count and the problems found."""
    problems: list[ChainProblem] = []
    expected_prev = GENESIS
    expected_seq = 1
    count = 0
    for entry in session.scalars(select(LedgerEntry).order_by(LedgerEntry.seq)):
        count += 1
        if entry.seq != expected_seq:
            problems.append(ChainProblem(entry.seq, f"entry {expected_seq} is missing (next present is {entry.seq})"))
        if entry.prev_hash != expected_prev:
            problems.append(ChainProblem(entry.seq, "prev_hash does not match the previous entry: an entry was removed or changed"))
        digest = entry_digest(entry.seq, _timestamp(entry.recorded_at), entry.kind, entry.subject, entry.payload, entry.prev_hash)
        if digest != entry.entry_hash:
            problems.append(ChainProblem(entry.seq, "content does not match its hash: the entry was edited"))
        expected_prev = entry.entry_hash
        expected_seq = entry.seq + 1
    return count, problems


def latest_payloads(session: Session, kind: str) -> dict[str, dict]:
    """Latest payload per subject for one kind, merged in order: the state the chain vouches for."""
    state: dict[str, dict] = {}
    for entry in session.scalars(select(LedgerEntry).where(LedgerEntry.kind == kind).order_by(LedgerEntry.seq)):
        state.setdefault(entry.subject, {}).update(json.loads(entry.payload))
    return state
