"""Commit the new data version, register the candidate model, and acknowledge the requests at their sources."""

from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import registry, versioning
from tasks.context import RunContext
from tasks.ingest import IngestResult
from tasks.ledger import Batch, BatchState, DeletionRequest, RequestState, utcnow
from tasks.purge import PurgeResult
from tasks.sources import QueueSource, acknowledge_sources
from tasks.sources.local import LocalSource

log = logging.getLogger("lethe.publish")


def set_batch(ctx: RunContext, batch_id: str, **fields) -> None:
    with ctx.ledger.session() as s:
        batch = s.get(Batch, batch_id)
        for key, value in fields.items():
            setattr(batch, key, value)


def commit_data(ctx: RunContext, batch: IngestResult, purged: PurgeResult) -> str:
    """`git commit` data.dvc and `dvc push`: the point after which the erasure is not rolled back."""
    message = (
        f"Erase batch {batch.batch_id}\n\n"
        f"{len(batch.request_ids)} requests, {len(purged.found_hashes)} subjects with data, "
        f"{purged.rows_removed} rows removed.\nSubject digest: {batch.subject_digest}\n"
    )
    rev = versioning.commit(ctx.ws, ["data.dvc"], message)
    pushed = versioning.push_data(ctx.ws)
    set_batch(ctx, batch.batch_id, state=BatchState.COMMITTED, git_rev_after=rev,
              data_md5_before=purged.data_md5_before, data_md5_after=purged.data_md5_after,
              rows_removed=purged.rows_removed)
    log.info("Commit: data version %s at %s, %d objects pushed", purged.data_md5_after, rev[:12], pushed)
    return rev


def acknowledge(ctx: RunContext, batch: IngestResult, found_hashes: set[str], summary: dict,
                sources: list[QueueSource] | None = None) -> int:
    """Close the batch's requests in the ledger, then acknowledge each source ref at its own source.

    The default sources are the workspace's local queue.
    """
    now = utcnow()
    with ctx.ledger.session() as s:
        for request in s.query(DeletionRequest).filter(DeletionRequest.batch_id == batch.batch_id):
            has_data = request.subject_hash in found_hashes
            request.state = RequestState.COMPLETED if has_data else RequestState.NO_DATA_HELD
            request.completed_at = now
        b = s.get(Batch, batch.batch_id)
        b.state = BatchState.ACKNOWLEDGED
        b.finished_at = now
        b.summary = summary
    if sources is None:
        sources = [LocalSource(ctx.ws)]
    acknowledged = acknowledge_sources(sources, batch.source_refs, ctx.hasher)
    log.info("Acknowledge: %d requests closed, %d queue files, objects or messages acknowledged",
             len(batch.request_ids), acknowledged)
    return acknowledged


@task(name="commit", cache_policy=NO_CACHE, persist_result=False)
def commit_task(ctx: RunContext, batch: IngestResult, purged: PurgeResult) -> str:
    """Commit data.dvc and push the new data version."""
    return commit_data(ctx, batch, purged)


# NOTE: no retries: a retry after a partial registration would create a second version.
@task(name="register", cache_policy=NO_CACHE, persist_result=False)
def register_task(ctx: RunContext, candidate: registry.LoggedCandidate, tags: dict[str, str]) -> str:
    """Register the candidate in MLflow and move the champion alias to it."""
    return registry.register(ctx.ws, ctx.settings.model_name, candidate, tags)


@task(name="acknowledge", cache_policy=NO_CACHE, persist_result=False)
def acknowledge_task(ctx: RunContext, batch: IngestResult, found_hashes: set[str], summary: dict,
                     sources: list[QueueSource] | None = None) -> int:
    """Close the requests and acknowledge them at their queue sources."""
    return acknowledge(ctx, batch, found_hashes, summary, sources)
