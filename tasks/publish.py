"""Record each pre-commit stage in the ledger and commit the new data version.

Everything a later stage needs is written to the batch row, so a run killed after
commit can be finished by the next run from the ledger alone.
"""

from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import versioning
from tasks.context import RunContext
from tasks.ledger import Batch, BatchState, DeletionRequest
from tasks.purge import PurgeResult
from tasks.registry import LoggedCandidate

log = logging.getLogger("lethe.publish")

COMMIT_SUBJECT = "Erase batch {batch_id}"


def set_batch(ctx: RunContext, batch_id: str, **fields) -> None:
    with ctx.ledger.session() as s:
        batch = s.get(Batch, batch_id)
        for key, value in fields.items():
            setattr(batch, key, value)


def record_purge(ctx: RunContext, batch_id: str, purged: PurgeResult) -> None:
    """Store the new data version and the rows removed per request."""
    with ctx.ledger.session() as s:
        batch = s.get(Batch, batch_id)
        batch.data_md5_before = purged.data_md5_before
        batch.data_md5_after = purged.data_md5_after
        batch.rows_removed = purged.rows_removed
        batch.affected_objects = dict(purged.affected_objects)
        for request in s.query(DeletionRequest).filter(DeletionRequest.batch_id == batch_id):
            request.rows_removed = purged.rows_per_subject.get(request.subject_hash, 0)


def record_candidate(ctx: RunContext, batch_id: str, logged: LoggedCandidate, method: str, summary: dict) -> None:
    """Store the logged candidate model and the gate results: the batch is ready to commit."""
    set_batch(ctx, batch_id, state=BatchState.CANDIDATE, candidate_run_id=logged.run_id,
              candidate_model_uri=logged.model_uri, method=method, summary=summary)


def committed_rev(ctx: RunContext, batch_id: str) -> str | None:
    """Return HEAD if it is this batch's erasure commit (a crash may have hit right after it)."""
    subject = versioning.git(ctx.ws, "log", "-1", "--format=%s")
    return versioning.head_rev(ctx.ws) if subject == COMMIT_SUBJECT.format(batch_id=batch_id) else None


def commit_data(ctx: RunContext, batch_id: str) -> str:
    """`git commit` data.dvc and `dvc push`: the point after which the erasure is not rolled back."""
    batch = ctx.ledger.get_batch(batch_id)
    if not batch.rows_removed:
        # No subject held data, so the data version is unchanged and there is nothing to commit.
        set_batch(ctx, batch_id, state=BatchState.COMMITTED, git_rev_after=versioning.head_rev(ctx.ws))
        return versioning.head_rev(ctx.ws)
    rev = committed_rev(ctx, batch_id)
    if rev is None:
        message = (
            f"{COMMIT_SUBJECT.format(batch_id=batch_id)}\n\n"
            f"{batch.request_count} requests for {batch.subject_count} subjects, {batch.rows_removed} rows removed.\n"
            f"Subject digest: {batch.subject_digest}\n"
        )
        rev = versioning.commit(ctx.ws, ["data.dvc"], message)
    set_batch(ctx, batch_id, state=BatchState.COMMITTED, git_rev_after=rev)
    log.info("Commit: data version %s at %s", batch.data_md5_after, rev[:12])
    return rev


def push_data(ctx: RunContext) -> int:
    """Upload the committed data version; idempotent, so a resumed batch pushes again."""
    pushed = versioning.push_data(ctx.ws)
    log.info("Commit: %d objects pushed to the DVC remote", pushed)
    return pushed


@task(name="commit", cache_policy=NO_CACHE, persist_result=False)
def commit_task(ctx: RunContext, batch_id: str) -> str:
    """Commit data.dvc and push the new data version."""
    rev = commit_data(ctx, batch_id)
    push_data(ctx)
    return rev
