"""A run lock kept in the ledger database, so two runs on one workspace cannot overlap.

A row in `run_locks` is the lock: inserting it succeeds for exactly one holder on
SQLite and PostgreSQL alike. A lock whose holder process is gone (same host, dead
pid) or whose heartbeat is older than the stale limit is taken over with a warning.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import DateTime, Integer, String, delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from tasks.errors import RunLockedError
from tasks.ledger import Base, Ledger, utcnow

log = logging.getLogger("lethe.lock")

# A nightly run on the default data takes about a minute, and runs renew the
# heartbeat between stages. A lock untouched for six hours belongs to a dead run.
DEFAULT_STALE_AFTER = timedelta(hours=6)


class RunLock(Base):
    __tablename__ = "run_locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes even for timezone-aware columns.
    return value if value.tzinfo else value.replace(tzinfo=utcnow().tzinfo)


def _is_stale(lock: RunLock, stale_after: timedelta) -> bool:
    if lock.host == socket.gethostname() and not _pid_alive(lock.pid):
        return True
    return utcnow() - _aware(lock.heartbeat_at) > stale_after


def acquire(ledger: Ledger, holder: str, name: str = "workspace", stale_after: timedelta = DEFAULT_STALE_AFTER) -> None:
    """Take the lock or raise RunLockedError naming the current holder."""
    Base.metadata.create_all(ledger.engine, tables=[RunLock.__table__])
    for _ in range(2):
        now = utcnow()
        try:
            with ledger.session() as s:
                s.add(RunLock(name=name, holder=holder, host=socket.gethostname(), pid=os.getpid(),
                              acquired_at=now, heartbeat_at=now))
            log.debug("Acquired run lock %s as %s", name, holder)
            return
        except IntegrityError:
            pass
        with ledger.session() as s:
            current = s.get(RunLock, name)
            if current is None:
                continue  # released between our insert and this read
            if not _is_stale(current, stale_after):
                raise RunLockedError(
                    f"Another run ({current.holder}, pid {current.pid} on {current.host}, started "
                    f"{_aware(current.acquired_at):%Y-%m-%d %H:%M:%S} UTC) holds the lock of this workspace. "
                    "Wait for it to finish; this run changed nothing."
                )
            log.warning("Taking over the stale run lock of %s (pid %d on %s)", current.holder, current.pid, current.host)
            s.execute(delete(RunLock).where(RunLock.name == name, RunLock.holder == current.holder))
    raise RunLockedError(f"Could not acquire the run lock {name}; another run took it first.")


def heartbeat(ledger: Ledger, holder: str, name: str = "workspace") -> None:
    """Refresh the lock's heartbeat, so a long run is not mistaken for a dead one."""
    with ledger.session() as s:
        lock = s.get(RunLock, name)
        if lock is not None and lock.holder == holder:
            lock.heartbeat_at = utcnow()


def release(ledger: Ledger, holder: str, name: str = "workspace") -> None:
    with ledger.session() as s:
        s.execute(delete(RunLock).where(RunLock.name == name, RunLock.holder == holder))
    log.debug("Released run lock %s", name)


@contextmanager
def run_lock(ledger: Ledger, holder: str, name: str = "workspace"):
    """Hold the lock for the duration of the block."""
    acquire(ledger, holder, name)
    try:
        yield
    finally:
        release(ledger, holder, name)
