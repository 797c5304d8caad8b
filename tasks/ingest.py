"""Ingest: read deletion requests from the queue sources, quarantine invalid ones, record the rest.

Requests are acknowledged after their batch commits. The one exception: when no batch
opens, ingest acknowledges the requests that earlier batches already closed.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.hashing import SubjectHasher, digest_of_hashes
from tasks.ledger import Batch, BatchState, DeletionRequest, Ledger, QuarantinedLine, RequestState
from tasks.sources import QueueSource, acknowledge_sources, read_sources
from tasks.sources.local import LocalSource
from tasks.workspace import Workspace

log = logging.getLogger("lethe.ingest")


@dataclass
class IngestResult:
    """The batch to process, by hashed subject key; raw ids stay in the queue files."""

    batch_id: str | None
    request_ids: list[str] = field(default_factory=list)
    subject_hashes: list[str] = field(default_factory=list)
    source_refs: set[str] = field(default_factory=set)
    new_requests: int = 0
    duplicates: int = 0
    already_closed: int = 0
    quarantined: int = 0

    @property
    def subject_digest(self) -> str:
        return digest_of_hashes(self.subject_hashes)


def new_batch_id() -> str:
    return f"batch-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def ingest(ws: Workspace, ledger: Ledger, hasher: SubjectHasher, deadline_days: int,
           sources: list[QueueSource] | None = None) -> IngestResult:
    """Record queued requests in the ledger and open a batch over every pending request.

    Reads the sources in the order given; the default is the workspace's local queue.
    """
    if sources is None:
        sources = [LocalSource(ws)]
    queued, quarantined = read_sources(sources)
    result = IngestResult(batch_id=None, quarantined=len(quarantined))

    with ledger.session() as s:
        for record in quarantined:
            s.add(QuarantinedLine(source_ref=record.source_ref, line_number=record.line_number, reason=record.reason))
        for item in queued:
            request = item.request
            subject_hash = hasher.hash(request.subject_id)
            request_id = request.request_id
            existing = s.get(DeletionRequest, request_id)
            if existing is not None and existing.subject_hash != subject_hash:
                # A producer reused an id for another subject. Dropping it would lose an erasure,
                # so it is recorded under an id derived from both, which is stable across redeliveries.
                request_id = f"{request.request_id[:100]}~{subject_hash[:12]}"
                log.error("Request id %s was reused for a different subject; recorded as %s", request.request_id, request_id)
                existing = s.get(DeletionRequest, request_id)
            if existing is not None:
                # Same request delivered again: keep the first record, acknowledge the file later.
                result.duplicates += 1
                if existing.state.is_closed:
                    result.already_closed += 1
                    result.source_refs.add(item.source_ref)
                continue
            s.add(DeletionRequest(
                request_id=request_id,
                subject_hash=subject_hash,
                source=request.source,
                source_ref=item.source_ref,
                received_at=request.received_at,
                deadline=request.received_at + timedelta(days=deadline_days),
                state=RequestState.PENDING,
            ))
            s.flush()
            result.new_requests += 1

    pending = ledger.pending_requests()
    if not pending:
        # No batch will acknowledge these, and an undeleted SQS message would be delivered
        # again until a redrive policy moves it to the dead-letter queue.
        acknowledge_sources(sources, result.source_refs, hasher)
        log.info("Ingest: no pending requests (%d quarantined, %d already closed)", result.quarantined, result.already_closed)
        return result

    result.batch_id = new_batch_id()
    result.request_ids = [r.request_id for r in pending]
    result.subject_hashes = sorted({r.subject_hash for r in pending})
    result.source_refs |= {r.source_ref for r in pending if any(source.owns(r.source_ref) for source in sources)}
    with ledger.session() as s:
        s.add(Batch(batch_id=result.batch_id, state=BatchState.OPEN, request_count=len(pending),
                    subject_count=len(result.subject_hashes), subject_digest=result.subject_digest))
        s.flush()
        for request in s.query(DeletionRequest).filter(DeletionRequest.request_id.in_(result.request_ids)):
            request.state = RequestState.IN_BATCH
            request.batch_id = result.batch_id
    log.info("Ingest: batch %s with %d requests for %d subjects (%d new, %d duplicates, %d quarantined)",
             result.batch_id, len(pending), len(result.subject_hashes), result.new_requests,
             result.duplicates, result.quarantined)
    return result


@task(name="ingest", cache_policy=NO_CACHE, persist_result=False)
def ingest_task(ws: Workspace, ledger: Ledger, hasher: SubjectHasher, deadline_days: int,
                sources: list[QueueSource] | None = None) -> IngestResult:
    """Read the queue sources and open a batch."""
    return ingest(ws, ledger, hasher, deadline_days, sources)
