"""The local queue under its former module name; the queue sources live in tasks.sources."""

from tasks.sources.local import LocalQueue
from tasks.sources.records import QuarantineRecord, QueuedRequest

__all__ = ["LocalQueue", "QuarantineRecord", "QueuedRequest"]
